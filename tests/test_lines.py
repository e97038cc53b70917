"""LiNeS (layer-increasing scaling of a merged update): its defining formula, the auto alpha rule, the
streamed executor against the in-memory API, the beta search, and bad configs."""

from __future__ import annotations

import math

import pytest
import torch

import submerge
from submerge.api import merge_state_dicts
from submerge.errors import ConfigError
from submerge.methods.lines import Lines, auto_alpha, block_depths
from submerge.search import search_alpha

from conftest import load_dir


def _toy(n_models: int = 3, blocks: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    names = ["emb.weight"] + [f"enc.layer.{i}.w" for i in range(blocks)] + ["head.norm"]
    base = {n: torch.randn(5, 3, generator=g) for n in names}
    models = [{n: base[n] + 0.1 * torch.randn(5, 3, generator=g) for n in names} for _ in range(n_models)]
    return base, models


def test_block_depths_follow_the_numbered_stack():
    depths, n = block_depths(["emb.weight", "enc.layer.0.w", "enc.layer.10.w", "enc.layer.2.b", "pooler.w"])
    assert n == 11
    assert depths == {"emb.weight": None, "enc.layer.0.w": 0.0, "enc.layer.10.w": 1.0, "enc.layer.2.b": 0.2,
                      "pooler.w": None}
    with pytest.raises(ConfigError, match="numbered block"):
        block_depths(["a.weight", "b.weight"])


def test_lines_on_task_arithmetic_is_the_layer_increasing_formula():
    base, models = _toy()
    a, b = 0.25, 0.6
    out = merge_state_dicts("task_arithmetic", base, models, {"weight": 1.0}, lines={"alpha": a, "beta": b})
    for n in base:
        tau = sum(m[n] - base[n] for m in models)
        depth = int(n.split(".")[2]) / 3 if n.startswith("enc.") else None
        scale = a if depth is None else a + b * depth
        torch.testing.assert_close(out[n], base[n] + scale * tau, rtol=0, atol=1e-6)


def test_auto_alpha_makes_the_shallow_end_the_average_whatever_the_method_scale():
    base, models = _toy()
    out = merge_state_dicts("task_arithmetic", base, models, {"weight": 1.0}, lines={"beta": 0.0})
    mean = {n: sum(m[n] for m in models) / 3 for n in base}
    for n in base:  # beta 0: every tensor at alpha = ||sum tau|| / (T ||sum tau||) = 1/T
        torch.testing.assert_close(out[n], mean[n], rtol=0, atol=1e-6)
    # the method's own scale cancels in alpha * tau: TIES at lambda 1 and 3 give the same LiNeS merge
    p = {"weight": 1.0, "density": 0.5}
    one = merge_state_dicts("ties", base, models, {**p, "lambda": 1.0}, lines={"beta": 0.4})
    three = merge_state_dicts("ties", base, models, {**p, "lambda": 3.0}, lines={"beta": 0.4 / 3})
    for n in base:
        torch.testing.assert_close(one[n], three[n], rtol=1e-5, atol=1e-6)
    assert auto_alpha(4.0, 1.0, 2) == 1.0 and auto_alpha(1.0, 0.0, 4) == 0.25


def test_streamed_merge_with_lines_equals_the_in_memory_api(family, tmp_path):
    base_dir, fts = family
    cfg = {"merge_method": "ties", "base_model": str(base_dir),
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts],
           "lines": {"beta": 0.7}}
    res = submerge.merge(cfg, tmp_path / "out", quiet=True)
    got = load_dir(tmp_path / "out")
    want = merge_state_dicts("ties", load_dir(base_dir), [load_dir(p) for p in fts],
                             {"weight": 1.0, "density": 0.5}, lines={"beta": 0.7})
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    assert any("LiNeS" in note for note in res.notes)
    assert "LiNeS" in (tmp_path / "out" / "README.md").read_text()
    # a given alpha merges in one pass and is the formula
    cfg["lines"] = {"beta": 0.7, "alpha": 0.3}
    submerge.merge(cfg, tmp_path / "out2", quiet=True)
    got2 = load_dir(tmp_path / "out2")
    want2 = merge_state_dicts("ties", load_dir(base_dir), [load_dir(p) for p in fts],
                              {"weight": 1.0, "density": 0.5}, lines=Lines(0.7, 0.3))
    for n in want2:
        torch.testing.assert_close(got2[n], want2[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "linear"}, "makes none"),
    ({"lines": {"beta": 0.5, "alpha": "big"}}, "alpha"),
    ({"lines": {"alpha": 0.5}}, "beta"),
    ({"lines": {"beta": 0.5, "gamma": 1}}, "gamma"),
])
def test_bad_lines_configs_are_one_line_errors(family, tmp_path, change, message):
    base_dir, fts = family
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base_dir),
           "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in fts], "lines": {"beta": 0.5}}
    cfg.update(change)
    with pytest.raises(ConfigError, match=message):
        submerge.merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_search_over_beta_returns_the_lines_merge_at_the_best_beta():
    base, models = _toy()
    target = merge_state_dicts("task_arithmetic", base, models, {"weight": 1.0}, lines={"beta": 0.5})

    def score(sd):  # highest at beta = 0.5
        return -sum(float((sd[n] - target[n]).square().sum()) for n in target)

    found = search_alpha("task_arithmetic", base, models, score, {"weight": 1.0}, lines=True,
                         patience=None)
    assert found.scale_param == "beta" and found.alpha == 0.5
    assert math.isclose(found.lines_alpha, 1 / 3, rel_tol=1e-6)
    for n in target:
        torch.testing.assert_close(found.state[n], target[n], rtol=0, atol=1e-6)
