"""TSV-M, Iso-C and Iso-CTS on updates of lower rank than they keep (LoRA experts): the papers' rules pick
null-space directions arbitrarily; ``rank_tol`` drops them and leaves full-rank updates untouched."""

from __future__ import annotations

import pytest
import torch

from submerge.api import merge_state_dicts
from submerge.methods.subspace import iso_c_merge, iso_cts_merge, tsv_merge

RULES = {"tsv": tsv_merge, "iso_c": iso_c_merge, "iso_cts": iso_cts_merge}


def low_rank(T: int, m: int, n: int, r: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
            for _ in range(T)]


def perturbed(deltas: list[torch.Tensor], seed: int, rel: float = 1e-15) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [d + rel * d.abs().max() * torch.randn(d.shape, generator=g, dtype=torch.float64) for d in deltas]


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("name", list(RULES))
def test_papers_rules_move_with_rounding_noise_on_low_rank_updates_and_rank_tol_does_not(name):
    rule = RULES[name]
    deltas = low_rank(T=6, m=96, n=72, r=4, seed=0)  # TSV-M keeps k = 12 > 4 per task; the sum has rank 24 < 72
    ref, ref_tol = rule(deltas), rule(deltas, rank_tol=1e-8)
    moved = max(rel_change(rule(perturbed(deltas, s)), ref) for s in (1, 2))
    moved_tol = max(rel_change(rule(perturbed(deltas, s), rank_tol=1e-8), ref_tol) for s in (1, 2))
    assert moved > 1e-3       # the null-space basis the SVD happens to return changes the answer
    assert moved_tol < 1e-10  # well-posed once it is dropped


@pytest.mark.parametrize("name", list(RULES))
def test_rank_tol_leaves_full_rank_updates_bit_for_bit(name):
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(40, 30, generator=g, dtype=torch.float64) for _ in range(3)]
    assert torch.equal(RULES[name](deltas, rank_tol=1e-8), RULES[name](deltas))


def test_rank_aware_tsv_sums_updates_with_orthogonal_subspaces_at_the_default_rank():
    """TSV-M's defining case: tasks in mutually orthogonal subspaces merge to their sum.  With rank 3 < k = 6 the
    paper's rule does not give it (null directions enter the polar factors); rank_tol does, with k left as is."""
    g = torch.Generator().manual_seed(2)
    q_out, _ = torch.linalg.qr(torch.randn(32, 12, generator=g, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(24, 12, generator=g, dtype=torch.float64))
    deltas = [(q_out[:, 3 * t:3 * t + 3] * (torch.rand(3, generator=g, dtype=torch.float64) + 0.5))
              @ q_in[:, 3 * t:3 * t + 3].T for t in range(4)]
    assert torch.allclose(tsv_merge(deltas, rank_tol=1e-8), sum(deltas), atol=1e-12)
    assert not torch.allclose(tsv_merge(deltas), sum(deltas), atol=1e-3)


def test_rank_aware_iso_c_flattens_only_the_sums_own_spectrum():
    deltas = low_rank(T=3, m=30, n=20, r=2, seed=3)  # the sum has rank 6 of 20
    out = iso_c_merge(deltas, rank_tol=1e-8)
    total = sum(deltas)
    s_total = torch.linalg.svdvals(total)
    s_out = torch.linalg.svdvals(out)
    assert torch.allclose(s_out[:6], torch.full((6,), float(s_total[:6].mean()), dtype=torch.float64), atol=1e-12)
    assert float(s_out[6:].max()) < 1e-12 * float(s_out[0])
    u, _, _ = torch.linalg.svd(total, full_matrices=False)
    assert torch.allclose(u[:, :6] @ (u[:, :6].T @ out), out, atol=1e-12)  # inside the sum's column space
    assert float(torch.linalg.svdvals(iso_c_merge(deltas))[6:].min()) > 0.1 * float(s_total[:6].mean()) / 6  # paper


def test_rank_aware_iso_cts_drops_the_residual_of_a_task_inside_the_common_space():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(24, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g, dtype=torch.float64)
    deltas = [a, 2 * a, low_rank(1, 24, 16, 2, seed=5)[0]]
    out = iso_cts_merge(deltas, rank_tol=1e-8)
    assert int((torch.linalg.svdvals(out) > 1e-10 * float(torch.linalg.norm(out))).sum()) == 4  # 2 + 2, no noise
    assert torch.isfinite(out).all()
    assert torch.equal(iso_cts_merge([torch.zeros(8, 6, dtype=torch.float64)] * 2, rank_tol=1e-8),
                       torch.zeros(8, 6, dtype=torch.float64))


@pytest.mark.parametrize("name", list(RULES))
def test_rank_tol_is_a_method_parameter(name):
    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(24, 16, generator=g), "b": torch.randn(16, generator=g)}
    experts = [{"w": base["w"] + d.float(), "b": base["b"] + 0.1} for d in low_rank(3, 24, 16, 2, seed=7)]
    out = merge_state_dicts(name, base, experts, {"alpha": 1.0, "rank_tol": 1e-5})
    expect = RULES[name]([e["w"] - base["w"] for e in experts], rank_tol=1e-5)
    assert torch.allclose(out["w"], base["w"] + expect.float(), atol=1e-6)
    assert torch.allclose(out["b"], base["b"] + 0.1, atol=1e-6)


def _grams(T: int, d_in: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(lambda x: x.T @ x)(torch.randn(200, d_in, generator=g, dtype=torch.float64)) for _ in range(T)]


@pytest.mark.parametrize("fusion", ["tsv", "polar"])
@pytest.mark.parametrize("shape", [(96, 72), (72, 96)])  # both branches of the essential subspace
def test_esm_on_low_rank_updates_is_well_posed_with_rank_tol(fusion, shape):
    from submerge.methods.esm import esm_merge_matrix

    m, n = shape
    deltas = low_rank(T=6, m=m, n=n, r=4, seed=8)
    grams = _grams(6, n, seed=9)
    kw = dict(eig_power=0.0, task_power=0.0, column_power=0.0, factor=1.0, fusion=fusion)
    ref, ref_tol = esm_merge_matrix(deltas, grams, [200] * 6, **kw), \
        esm_merge_matrix(deltas, grams, [200] * 6, rank_tol=1e-8, **kw)
    moved = max(rel_change(esm_merge_matrix(perturbed(deltas, s), grams, [200] * 6, **kw), ref) for s in (1, 2))
    moved_tol = max(rel_change(esm_merge_matrix(perturbed(deltas, s), grams, [200] * 6, rank_tol=1e-8, **kw), ref_tol)
                    for s in (1, 2))
    assert moved_tol < 1e-9
    if fusion == "tsv":  # the default recipe's fusion: the authors' rule moves with the null basis
        assert moved > 1e-3


def test_esm_rank_tol_leaves_full_rank_updates_bit_for_bit():
    from submerge.methods.esm import esm_merge_matrix, tsv_scaled_merge

    g = torch.Generator().manual_seed(10)
    deltas = [torch.randn(24, 20, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = _grams(3, 20, seed=11)
    for fusion in ("tsv", "polar"):
        assert torch.equal(esm_merge_matrix(deltas, grams, [200] * 3, fusion=fusion, rank_tol=1e-8),
                           esm_merge_matrix(deltas, grams, [200] * 3, fusion=fusion))
    assert torch.equal(tsv_scaled_merge(deltas, rank_tol=1e-8), tsv_scaled_merge(deltas))
