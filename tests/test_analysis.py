"""`submerge analyze`: each measurement against a value computed by hand or independently of the analysis code,
the report files, and bad input failing in one line before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from submerge.analysis.paths import barrier, ece, fit_scale, interpolate
from submerge.analysis.weights import WeightAnalyzer, effective_rank, energy_rank, subspace_overlap
from submerge.cli import main
from test_tune import cls_family, _accuracy, _load  # noqa: F401 (the fixture is used by name)


# ------------------------------------------------------------------------------------------ kernels
def test_effective_rank_energy_rank_and_overlap_by_hand():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([5.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert energy_rank(torch.tensor([8.0, 1.0, 1.0])) == 2  # 0.8 < 0.9 <= 0.9
    assert energy_rank(torch.tensor([9.5, 0.5])) == 1
    q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    assert subspace_overlap(q[:, :2], q[:, :2]) == pytest.approx(1.0)
    assert subspace_overlap(q[:, :2], q[:, 2:]) == pytest.approx(0.0, abs=1e-12)
    # half of a 2-D subspace shared: overlap 1/2
    assert subspace_overlap(q[:, :2], q[:, 1:3]) == pytest.approx(0.5)


def test_barrier_and_ece_by_hand():
    ts = [0, 0.5, 1]
    assert barrier([1.0, 1.5, 2.0], ts) == 0.0  # on the line
    assert barrier([1.0, 2.5, 2.0], ts) == pytest.approx(1.0)  # 2.5 − 1.5
    assert barrier([0.9, 0.5, 0.7], ts, higher_is_better=True) == pytest.approx(0.3)  # 0.8 − 0.5
    labels = torch.tensor([0, 0, 0, 0])
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]], dtype=torch.float64)
    # one bin at confidence 0.8 holding 2 right and 2 wrong: |0.5 − 0.8| = 0.3
    err, bins = ece(probs, labels)
    assert err == pytest.approx(0.3)
    assert sum(b["n"] for b in bins) == 4
    assert ece(torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64), torch.tensor([0, 0, 0]))[0] == pytest.approx(0.0)


def test_fit_scale_recovers_a_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=g)
    y = torch.multinomial(torch.softmax(7.0 * z, -1), 1, generator=g).squeeze(1)
    assert fit_scale(z, y) == pytest.approx(7.0, rel=0.1)


def test_interpolation_endpoints_and_midpoint():
    a = {"w": torch.tensor([1.0, 0.0]), "i": torch.tensor([3])}
    b = {"w": torch.tensor([0.0, 1.0]), "i": torch.tensor([4])}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.5)["w"], torch.tensor([0.5, 0.5]))
    s = interpolate(a, b, 0.5, "slerp")["w"]  # on the great circle: unit norm
    assert s.norm() == pytest.approx(1.0, abs=1e-6) and torch.equal(interpolate(a, b, 0.5)["i"], a["i"])


def test_weight_statistics_by_hand_and_chunking_changes_nothing():
    base = torch.zeros(2, 3)
    e1 = torch.tensor([[1.0, -2.0, 0.0], [0.0, 3.0, 1.0]])
    e2 = torch.tensor([[1.0, 2.0, 0.0], [4.0, -3.0, 0.0]])
    rs = []
    for chunk in (2, 1 << 20):
        wa = WeightAnalyzer(["a", "b"], topk=1 / 3, spectra=True, chunk=chunk)
        wa.set_names(["enc.0.w"])
        rs.append(wa.add("enc.0.w", base, [e1, e2]))
    r = rs[0]
    assert r.gram == rs[1].gram and r.sign_disagree == rs[1].sign_disagree and r.mask_inter == rs[1].mask_inter
    assert r.gram[0][1] == pytest.approx(1 - 4 - 9)
    assert r.norms[0] == pytest.approx(math.sqrt(15))
    # entries both touch: (0,0), (0,1), (1,1); opposite signs at (0,1) and (1,1)
    assert r.both_nonzero[0][1] == 3 and r.sign_disagree[0][1] == 2
    # elected sign sum: (0,0) +, (0,1) 0 (both disagree with it), (1,1) 0 -> contested 3 entries, 2 with conflict
    assert r.contested_entries == 3 and r.conflict_entries == 2
    # top-2 of 6 by magnitude: a keeps (1,1) and (0,1), b keeps (1,0) and (1,1): one shared, IoU 1/3
    assert r.mask_inter[0][0] == 2 and r.mask_inter[1][1] == 2 and r.mask_inter[0][1] == 1
    assert r.block == 0 and r.spectrum["k"] == 1
    s = wa.summary()
    assert s["cosine"][0][1] == pytest.approx(-12 / math.sqrt(15 * 30))
    assert s["sign_conflict"][0][1] == pytest.approx(2 / 3)
    assert s["topk_iou"][0][1] == pytest.approx(1 / 3)


def test_untouched_matrices_are_never_interference(tmp_path):
    """A matrix no task changed (a pooler never trained) has zero task vectors: it is listed as untouched, has
    no spectrum, and no pair overlap; a matrix only one task changed has no pair overlap either."""
    from submerge.analysis.report import write_report

    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(6, 5, generator=g) for n in ("enc.0.w", "pooler.w", "enc.1.w")}
    e1 = {n: v + (0.1 * torch.randn(6, 5, generator=g) if n != "pooler.w" else 0) for n, v in base.items()}
    e2 = {n: v + (0.1 * torch.randn(6, 5, generator=g) if n == "enc.0.w" else 0) for n, v in base.items()}
    e2["enc.1.w"] = base["enc.1.w"] + 1e-9 * torch.randn(6, 5, generator=g)  # negligible
    wa = WeightAnalyzer(["a", "b"], topk=0.2, spectra=True)
    wa.set_names(list(base))
    for n in base:
        wa.add(n, base[n], [e1[n], e2[n]])
    s = wa.summary()
    assert s["untouched"] == ["pooler.w"]
    by_name = {x["name"]: x for x in s["spectra"]}
    assert "pooler.w" not in by_name  # no spectrum of a zero matrix
    assert math.isnan(by_name["enc.1.w"]["overlap_left"])  # b left it untouched: no pair to compare
    assert 0 <= by_name["enc.0.w"]["overlap_left"] <= 1
    write_report({"config": "x", "tasks": ["a", "b"], "base": "b0", "merge_method": "task_arithmetic",
                  "weights": {**s, "seconds": 0.0}, "per_tensor": [r.__dict__ for r in wa.records],
                  "options": {"topk": 0.2}, "seconds": 0.0}, tmp_path)
    md = (tmp_path / "analysis.md").read_text()
    assert "Untouched by every task" in md and "`pooler.w`" in md
    assert "least:" not in md and "a/b: sign conflict" in md  # two tasks: one pair, said once
    assert "`enc.1.w`" not in md.split("Where tasks interfere most")[1].split("Untouched")[0]


# ------------------------------------------------------------------------------------------ end to end
def _analyze_config(root: Path, tmp: Path, with_eval: bool = True) -> Path:
    cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "parameters": {"lambda": 0.6},
           "models": [{"model": str(root / t), "parameters": {"weight": 1.0}} for t in ("sentiment", "animal")]}
    if with_eval:
        cfg["eval"] = {"scorer": "classification", "max_length": 16,
                       "tasks": {t: {"data": str(root / f"{t}.val.jsonl")} for t in ("sentiment", "animal")}}
    p = tmp / ("analyze.yaml" if with_eval else "analyze-free.yaml")
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def calib(cls_family, tmp_path_factory):
    from submerge.stats.gram import calibrate_model_dir

    out = tmp_path_factory.mktemp("calib")
    for t in ("sentiment", "animal"):
        calibrate_model_dir(cls_family / t, cls_family / f"{t}.calib.jsonl", out / t, n=16, max_length=16,
                            progress=False)
    return out


@pytest.fixture(scope="module")
def analysis(cls_family, calib, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    cfg = _analyze_config(cls_family, tmp)
    out = tmp / "out"
    r = CliRunner().invoke(main, ["analyze", str(cfg), str(out), "--calibration", str(calib / "sentiment"),
                                  "--calibration", str(calib / "animal"), "--points", "3", "-q"])
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "analysis.json").read_text())


def test_analysis_files_and_data_free_numbers_match_the_checkpoints(cls_family, analysis):
    out, res = analysis
    for f in ("analysis.json", "analysis.md", "task_vectors.png", "layers.png", "essential.png", "paths.png",
              "reliability.png"):
        assert (out / f).is_file(), f
    assert not (out / ".merged").exists()
    base, a, b = (_load(cls_family / n) for n in ("base", "sentiment", "animal"))
    keys = [k for k in base if base[k].is_floating_point() and k in a and k in b]
    ta = torch.cat([(a[k] - base[k]).flatten().double() for k in keys])
    tb = torch.cat([(b[k] - base[k]).flatten().double() for k in keys])
    w = res["weights"]
    assert w["cosine"][0][1] == pytest.approx(float(ta @ tb / (ta.norm() * tb.norm())), rel=1e-6)
    assert w["norm"][0] == pytest.approx(float(ta.norm()), rel=1e-6)
    both = (ta != 0) & (tb != 0)
    assert w["sign_conflict"][0][1] == pytest.approx(float(((ta.sign() != tb.sign()) & both).sum() / both.sum()))
    assert w["spectra"] and all(0 <= x["overlap_left"] <= 1 for x in w["spectra"])
    e = res["essential"]
    assert e["layers"] and {x["role"] for x in e["layers"]} >= {"q", "mlp_in", "mlp_out"}
    assert all(1 <= k <= 16 for x in e["layers"] for k in x["k90_essential"])
    assert "## ESM's view" in (out / "analysis.md").read_text()


def test_scored_numbers_match_independent_evaluation(cls_family, analysis):
    from submerge.api import merge_state_dicts

    _, res = analysis
    p = res["paths"]
    base, a, b = (_load(cls_family / n) for n in ("base", "sentiment", "animal"))
    merged = merge_state_dicts("task_arithmetic", base, [a, b], {"lambda": 0.6, "weight": 1.0})
    for t, expert in (("sentiment", a), ("animal", b)):
        acc_e = _accuracy(expert, cls_family, t)
        acc_m = _accuracy(merged, cls_family, t)
        assert p["scores"]["expert"][t] == pytest.approx(acc_e)
        assert p["scores"]["merge"][t] == pytest.approx(acc_m)
        assert p["retention"][t] == pytest.approx(acc_m / acc_e)
        cal = p["calibration"][t]
        assert 0 <= cal["merge"]["ece"] <= 1 and cal["logit_scale"] == 1.0  # a classifier's own logits
    rec = p["base_to_expert"][0]
    c = rec["tasks"]["sentiment"]
    assert rec["t"] == [0.0, 0.5, 1.0] and c["score"][-1] == pytest.approx(p["scores"]["expert"]["sentiment"])
    assert c["loss_barrier"] == pytest.approx(barrier(c["loss"], rec["t"]))
    assert {r["kind"] for r in p["pairs"]} == {"linear", "slerp"} and len(p["pairs"]) == 2


def test_data_free_only_without_eval_and_bad_input(cls_family, calib, tmp_path):
    free = _analyze_config(cls_family, tmp_path, with_eval=False)
    out = tmp_path / "free"
    r = CliRunner().invoke(main, ["analyze", str(free), str(out), "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "analysis.json").read_text())
    assert "paths" not in res and "essential" not in res and (out / "task_vectors.png").is_file()
    cases = [
        (["--scorer", "classification"], "no 'eval:' block"),
        (["--calibration", str(calib / "animal")], "1 folder(s) for 2 models"),
        (["--topk", "0"], "--topk"),
    ]
    for extra, want in cases:
        r = CliRunner().invoke(main, ["analyze", str(free), str(tmp_path / "x"), "-q", *extra])
        assert r.exit_code != 0 and want in r.output, (extra, r.output)
        assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["analyze", str(free), str(out), "-q"])
    assert r.exit_code != 0 and "already exists" in r.output


@pytest.mark.parametrize("shape", [(40, 70), (70, 40)])
def test_spectrum_from_the_smaller_gram_equals_the_svd(shape):
    from submerge.analysis.weights import _spectrum

    g = torch.Generator().manual_seed(0)
    ds = torch.randn(3, *shape, generator=g) * torch.linspace(3, 0.1, shape[1])
    sp = _spectrum(ds, 10**9, 256)
    k = sp["k"]
    assert k == min(shape) // 3
    for i, d in enumerate(ds):
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        assert torch.allclose(sp["s"][i][: len(s)], s, atol=1e-10)
        assert subspace_overlap(sp["u"][i], u[:, :k]) == pytest.approx(1.0, abs=1e-9)
        assert subspace_overlap(sp["v"][i], vh[:k].T) == pytest.approx(1.0, abs=1e-9)
    lr = torch.randn(3, shape[0], 5, generator=g) @ torch.randn(3, 5, shape[1], generator=g)  # rank 5
    low = _spectrum(lr, 10, 8)  # the svd_lowrank path for big matrices: exact on a low-rank update
    assert low["lowrank"] and torch.allclose(low["s"][0][:5], torch.linalg.svdvals(lr[0].double())[:5], rtol=1e-4)
