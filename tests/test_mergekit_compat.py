"""A mergekit YAML runs unchanged in submerge and gives the same tensors as mergekit 0.1.5."""

from __future__ import annotations

import json

import pytest
import torch

import submerge
from conftest import load_dir

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402


def _cases(base, fts):
    b, f = str(base), [str(p) for p in fts]
    gradient_t = [{"filter": "self_attn", "value": [0, 0.7]}, {"filter": "mlp", "value": [1, 0.3]}, {"value": 0.5}]
    return {
        "linear": dict(models=[{"model": f[0], "parameters": {"weight": 0.3}},
                               {"model": f[1], "parameters": {"weight": [0.2, 0.9]}}]),
        "linear_unnormalized": dict(merge_method="linear", parameters={"normalize": False},
                                    models=[{"model": f[0], "parameters": {"weight": 0.6}},
                                            {"model": f[2], "parameters": {"weight": 0.5}}]),
        "task_arithmetic": dict(base_model=b, parameters={"lambda": 0.8},
                                models=[{"model": p, "parameters": {"weight": 0.5 + 0.1 * i}} for i, p in enumerate(f)]),
        "ties": dict(base_model=b, parameters={"normalize": True, "int8_mask": True},
                     models=[{"model": p, "parameters": {"weight": [{"filter": "mlp", "value": 0.6}, {"value": 1.0}],
                                                         "density": [0.2, 0.7]}} for p in f]),
        "breadcrumbs": dict(base_model=b, models=[{"model": p, "parameters": {"weight": 0.7, "density": 0.8, "gamma": 0.05}} for p in f]),
        "breadcrumbs_ties": dict(base_model=b, parameters={"normalize": True},
                                 models=[{"model": p, "parameters": {"weight": 0.7, "density": 0.6, "gamma": 0.02}} for p in f]),
        "slerp": dict(base_model=b, models=[{"model": b}, {"model": f[0]}], parameters={"t": gradient_t}),
        "model_stock": dict(base_model=b, models=[{"model": p} for p in f]),
        "nearswap": dict(base_model=b, models=[{"model": b}, {"model": f[0]}], parameters={"t": 0.004}),
        "sce": dict(base_model=b, models=[{"model": p} for p in f]),
        "sce_topk": dict(merge_method="sce", base_model=b, parameters={"select_topk": 0.4}, models=[{"model": p} for p in f]),
        "nuslerp": dict(models=[{"model": f[0], "parameters": {"weight": 0.3}},
                                {"model": f[1], "parameters": {"weight": 0.9}}]),
        "nuslerp_base_rows": dict(merge_method="nuslerp", base_model=b,
                                  parameters={"nuslerp_flatten": False},
                                  models=[{"model": f[0], "parameters": {"weight": [0.2, 1.0]}},
                                          {"model": f[2], "parameters": {"weight": 0.5}}]),
        "nuslerp_row_wise": dict(merge_method="nuslerp", base_model=b,
                                 parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                 models=[{"model": f[1], "parameters": {"weight": 0.4}},
                                         {"model": f[2], "parameters": {"weight": 0.6}}]),
        "multislerp": dict(models=[{"model": p, "parameters": {"weight": w}} for p, w in zip(f, [0.2, 0.5, 0.3])]),
        "multislerp_base": dict(merge_method="multislerp", base_model=b,
                                parameters={"normalize_weights": False},
                                models=[{"model": p, "parameters": {"weight": w}} for p, w in zip(f, [0.6, 0.3, 0.4])]),
        "karcher": dict(models=[{"model": p} for p in f]),
        "karcher_base": dict(merge_method="karcher", base_model=b, parameters={"max_iter": 25, "tol": 1e-6},
                             models=[{"model": p} for p in f[:2]]),
        "arcee_fusion": dict(base_model=b, models=[{"model": b}, {"model": f[1]}]),
        "ram": dict(base_model=b, parameters={"epsilon": 2e-3}, models=[{"model": p} for p in f]),
        "ramplus_tl": dict(base_model=b, parameters={"epsilon": 2e-3, "r": 0.5, "alpha": 0.7},
                           models=[{"model": p} for p in f]),
        "passthrough": dict(slices=[{"sources": [{"model": f[0], "layer_range": [0, 3]}]},
                                    {"sources": [{"model": f[1], "layer_range": [1, 4],
                                                  "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                                           {"filter": "down_proj", "value": [0.5, 1]},
                                                                           {"value": 1.0}]}}]},
                                    {"sources": [{"model": b, "layer_range": [3, 4]}]}]),
        "model_stock_filter_wise": dict(merge_method="model_stock", base_model=b, parameters={"filter_wise": True},
                                        models=[{"model": p} for p in f]),
        "task_arithmetic_slices": dict(
            merge_method="task_arithmetic", base_model=b,
            slices=[{"sources": [{"model": b, "layer_range": [0, 2]},
                                 {"model": f[1], "layer_range": [0, 2], "parameters": {"weight": 0.4}}]},
                    {"sources": [{"model": b, "layer_range": [3, 4]},
                                 {"model": f[2], "layer_range": [3, 4], "parameters": {"weight": 0.9}}],
                     "parameters": {"lambda": 0.5}}]),
    }


def _run_both(cfg, tmp_path, **opts):
    mk, sm = tmp_path / "mk", tmp_path / "sm"
    run_merge(MergeConfiguration.model_validate(cfg), str(mk),
              options=MergeOptions(quiet=True, copy_tokenizer=False))
    submerge.merge(cfg, sm, quiet=True, **opts)
    return mk, sm


@pytest.mark.parametrize("case", ["linear", "linear_unnormalized", "task_arithmetic", "ties", "breadcrumbs",
                                  "breadcrumbs_ties", "slerp", "model_stock", "model_stock_filter_wise",
                                  "task_arithmetic_slices", "nearswap", "sce", "sce_topk", "nuslerp",
                                  "nuslerp_base_rows", "nuslerp_row_wise", "multislerp", "multislerp_base", "karcher",
                                  "karcher_base", "arcee_fusion", "ram", "ramplus_tl", "passthrough"])
def test_fp32_same_tensors_as_mergekit(case, family, tmp_path):
    base, fts = family
    cfg = dict(_cases(base, fts)[case])
    cfg.setdefault("merge_method", case)
    cfg["dtype"] = "float32"
    mk, sm = _run_both(cfg, tmp_path)
    a, b = load_dir(mk), load_dir(sm)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
    ca, cb = json.loads((mk / "config.json").read_text()), json.loads((sm / "config.json").read_text())
    assert ca["num_hidden_layers"] == cb["num_hidden_layers"]


def _ulps(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    mag = torch.maximum(x.abs(), y.abs()).clamp_min(1e-38)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * 2.0**-7
    return ((x - y).abs() / ulp).max().item()


@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "slerp", "model_stock", "task_arithmetic_slices"])
def test_bf16_within_one_ulp_of_mergekit(case, family_bf16, tmp_path):
    """bf16 checkpoints, fp32 math in both tools, bf16 output: at most one ulp apart."""
    base, fts = family_bf16
    cfg = dict(_cases(base, fts)[case])
    cfg.setdefault("merge_method", case)
    cfg.update(dtype="float32", out_dtype="bfloat16")
    mk, sm = _run_both(cfg, tmp_path)
    a, b = load_dir(mk), load_dir(sm)
    for k in a:
        assert b[k].dtype == torch.bfloat16
        assert _ulps(a[k], b[k]) <= 1.0, k


# Where submerge reproduces mergekit's `dtype: bfloat16` tensors bit for bit on a bf16 family (README, "dtypes"):
# with --compute-dtype bfloat16 (mergekit computes these in bf16) or with the default float32 math (mergekit
# promotes these to float32 itself).  The other methods round in another order and differ by a few bf16 ulps
# in up to a third of the entries; the README lists them.
BF16_EXACT = [("task_arithmetic", "bfloat16"), ("task_arithmetic_slices", "bfloat16"), ("sce", "bfloat16"),
              ("multislerp", "bfloat16"), ("multislerp_base", "bfloat16"), ("ram", "bfloat16"),
              ("passthrough", "bfloat16"), ("linear_unnormalized", "float32"), ("passthrough", "float32")]


@pytest.mark.parametrize("case, compute", BF16_EXACT, ids=[f"{c}-{d}" for c, d in BF16_EXACT])
def test_bf16_configs_reproduce_mergekit_bit_for_bit_where_the_readme_says(case, compute, family_bf16, tmp_path):
    base, fts = family_bf16
    cfg = dict(_cases(base, fts)[case])
    cfg.setdefault("merge_method", case)
    cfg["dtype"] = "bfloat16"
    mk, sm = _run_both(cfg, tmp_path, compute_dtype=compute)
    a, b = load_dir(mk), load_dir(sm)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k


def test_default_fp32_math_is_correctly_rounded(family_bf16, tmp_path):
    """By default submerge rounds once: within half an ulp of the exact (float64) merge."""
    base, fts = family_bf16
    cfg = dict(_cases(base, fts)["task_arithmetic"], merge_method="task_arithmetic", dtype="bfloat16")
    submerge.merge(cfg, tmp_path / "sm", quiet=True)
    out, b0 = load_dir(tmp_path / "sm"), load_dir(base)
    ft = [load_dir(p) for p in fts]
    for k in out:
        exact = b0[k].double() + 0.8 * sum((0.5 + 0.1 * i) * (ft[i][k].double() - b0[k].double()) for i in range(3))
        assert _ulps(out[k], exact) <= 0.5 + 1e-9, k


def test_passthrough_bf16_copies_bytes_and_casts_on_request(family_bf16, tmp_path):
    """An unscaled passthrough tensor is the input's bytes; with out_dtype it is cast (and scale still applies)."""
    base, fts = family_bf16
    cfg = dict(merge_method="passthrough",
               slices=[{"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
                       {"sources": [{"model": str(fts[1]), "layer_range": [2, 4],
                                     "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}]}}]}])
    submerge.merge(cfg, tmp_path / "same", quiet=True)
    out, a, b = load_dir(tmp_path / "same"), load_dir(fts[0]), load_dir(fts[1])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.2.self_attn.o_proj.weight"],
                       (b["model.layers.2.self_attn.o_proj.weight"].float() * 0.5).bfloat16())
    submerge.merge(dict(cfg, out_dtype="float32"), tmp_path / "f32", quiet=True)
    out32 = load_dir(tmp_path / "f32")
    assert all(v.dtype == torch.float32 for v in out32.values())
    assert torch.equal(out32["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"].float())


def test_every_mergekit_method_is_registered_under_its_name():
    from mergekit.merge_methods import registered_methods

    from submerge.methods import list_methods

    listed = registered_methods()
    theirs = {m.spec.name for m in (listed.values() if isinstance(listed, dict) else listed)}
    assert len(theirs) == 20
    assert theirs <= {m.name for m in list_methods()}
