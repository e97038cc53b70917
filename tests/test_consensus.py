"""TALL masks and Consensus merging (Wang et al., ICML 2024): hand-computed masks, the k = 0 / k > T identities,
the TIES variant's disjoint sum, and the compressed multi-task folder with task-id reconstruction."""

from __future__ import annotations

import pytest
import torch

import submerge
from submerge.api import merge_state_dicts
from submerge.methods.consensus import consensus_mask, multitask_vector, tall_masks
from submerge.routing.tall import TallMasks, task_state

from conftest import load_dir


def _toy(n_models: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    names = ["emb.weight", "enc.layer.0.w", "enc.layer.1.w"]
    base = {n: torch.randn(6, 4, generator=g) for n in names}
    models = [{n: base[n] + 0.1 * torch.randn(6, 4, generator=g) for n in names} for _ in range(n_models)]
    return base, models


def test_tall_masks_and_consensus_by_hand():
    deltas = torch.tensor([[1.0, 0.1, 0.0], [-1.0, 0.5, 0.2]])
    merged = deltas.sum(0)  # [0, 0.6, 0.2]
    m = tall_masks(deltas, merged, [0.5, 0.5])
    # task 0: 1 > 0.5*|0-1| yes; 0.1 > 0.5*0.5 no; 0 > 0.5*0.2 no.  task 1: 1 > 0.5 yes; 0.5 > 0.05 yes; 0.2 > 0 yes
    assert m.tolist() == [[True, False, False], [True, True, True]]
    assert consensus_mask(m, 2).tolist() == [True, False, False]
    assert consensus_mask(m, 1).tolist() == [True, True, True]
    # strict: an entry exactly at the threshold is dropped
    assert not tall_masks(torch.tensor([[1.0]]), torch.tensor([3.0]), [0.5]).item()
    # task by task (bounded memory) = the broadcast formula, bit for bit, in every float dtype
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        d = torch.randn(5, 7, 9, generator=g).to(dtype)
        tau = d.sum(0)
        lams = [0.2, 0.3, 0.4, 0.5, 0.6]
        lam = torch.tensor(lams, dtype=dtype).reshape(-1, 1, 1)
        assert torch.equal(tall_masks(d, tau, lams), d.abs() > lam * (tau.unsqueeze(0) - d).abs())


def test_consensus_ta_k0_is_task_arithmetic_and_k_above_T_is_the_base():
    base, models = _toy()
    ta = merge_state_dicts("task_arithmetic", base, models, {"weight": 1.0, "lambda": 0.7})
    c0 = merge_state_dicts("consensus_ta", base, models, {"k": 0, "lambda": 0.7})
    c4 = merge_state_dicts("consensus_ta", base, models, {"k": 4, "lambda": 0.7})
    for n in base:
        torch.testing.assert_close(c0[n], ta[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(c4[n], base[n], rtol=0, atol=0)
    # k = 2, hand-built: the summed task vector where at least two tasks' masks agree
    c2 = merge_state_dicts("consensus_ta", base, models, {"k": 2, "lambda": 0.7}, [{"tall_lambda": 0.3},
                                                                                {"tall_lambda": 0.5}, {}])
    for n in base:
        d = torch.stack([m[n] - base[n] for m in models])
        tau = d.sum(0)
        count = sum((d[i].abs() > lam * (tau - d[i]).abs()).int() for i, lam in enumerate([0.3, 0.5, 0.4]))
        torch.testing.assert_close(c2[n], base[n] + 0.7 * tau * (count >= 2), rtol=0, atol=1e-6)


def test_consensus_ties_k0_is_ties_with_a_disjoint_sum():
    base, models = _toy()
    ties = merge_state_dicts("ties", base, models, {"weight": 1.0, "density": 0.3, "normalize": False,
                                                    "lambda": 0.5})
    c0 = merge_state_dicts("consensus_ties", base, models, {"k": 0, "density": 0.3, "lambda": 0.5})
    for n in base:
        torch.testing.assert_close(c0[n], ties[n], rtol=0, atol=1e-6)
    d = torch.stack([m["enc.layer.0.w"] - base["enc.layer.0.w"] for m in models])
    tau = multitask_vector(d, [1, 1, 1], [0.3, 0.3, 0.3])
    assert (tau != 0).float().mean() < 0.75  # the trim left most entries of each task out


def test_tall_masks_folder_rebuilds_each_task_model(family, tmp_path):
    base_dir, fts = family
    lams = [0.2, 0.4, 0.6]
    cfg = {"merge_method": "tall_masks", "base_model": str(base_dir),
           "models": [{"model": str(p), "parameters": {"tall_lambda": lam}} for p, lam in zip(fts, lams)]}
    res = submerge.merge(cfg, tmp_path / "out", quiet=True)
    out = tmp_path / "out"
    merged = {k: v for k, v in load_dir(out).items() if not k.startswith("tall_mask.")}
    base = load_dir(base_dir)
    experts = [load_dir(p) for p in fts]
    ta = merge_state_dicts("task_arithmetic", base, experts, {"weight": 1.0})
    masks = TallMasks.load(out)
    assert masks.tasks == [p.name for p in fts] and masks.lambdas == lams
    for n in ta:
        torch.testing.assert_close(merged[n], ta[n], rtol=0, atol=1e-6)
    for i in range(3):
        state = task_state(merged, base, masks, masks.tasks[i])
        for n in masks.shapes:
            d = torch.stack([e[n] - base[n] for e in experts])
            m = d[i].abs() > lams[i] * (d.sum(0) - d[i]).abs()
            assert torch.equal(masks.mask(n, i), m)
            torch.testing.assert_close(state[n], torch.where(m, merged[n], base[n]), rtol=0, atol=0)
    kept = masks.kept_fraction()
    assert 0 < min(kept.values()) and max(kept.values()) < 1
    # bits, not bytes: the mask file is about n_params * T / 8 bytes
    assert (out / "tall_masks.safetensors").stat().st_size < masks.n_params * 3 / 8 + 64 * len(masks.shapes) + 4096
    assert any("TALL masks" in note for note in res.notes)
    with pytest.raises(submerge.errors.ConfigError, match="unknown task"):
        masks.mask(next(iter(masks.shapes)), "nope")


def test_bench_tall_task_models_equal_the_masks_of_the_method():
    """The bench scores each task's TALL model θ_0 + m_t ⊙ τ_MTL at every threshold from magnitudes computed
    once, in reused buffers: bit for bit the model tall_masks gives."""
    from types import SimpleNamespace

    from submerge.bench.adaptive import _TallTask

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    S = SimpleNamespace(base=base, experts=experts)
    tau = {k: multitask_vector(torch.stack([e[k] - b for e in experts]), [1.0] * 3) for k, b in base.items()}
    mtl = {k: b + tau[k] for k, b in base.items()}
    for i in range(3):
        task = _TallTask(S, tau, mtl, i)
        for lam in (0.2, 0.4, 0.6):
            got = task.state(lam)
            for k, b in base.items():
                keep = tall_masks(torch.stack([e[k] - b for e in experts]), tau[k], [lam] * 3)[i]
                assert torch.equal(got[k], torch.where(keep, b + tau[k], b)), (i, lam, k)
