"""The subspace kernels' one speed-up, and its exactness: the per-task SVDs of one matrix run as one batched SVD,
which gives each matrix the bits of its own SVD, so every subspace merge is bit for bit what it was (per-matrix
SVDs), on flat, decaying, tied, rank-deficient, 1e-12-tail and shared-direction spectra."""

from __future__ import annotations

import pytest
import torch

from submerge.methods import esm as E
from submerge.methods import subspace as S


def _with_spectrum(m: int, n: int, sv: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0][:, :len(sv)]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0][:, :len(sv)]
    return (u * torch.tensor(sv, dtype=torch.float64)) @ v.T


def _deltas(kind: str, m: int, n: int, T: int) -> list[torch.Tensor]:
    s = min(m, n)
    g = torch.Generator().manual_seed(hash((kind, m, n, T)) % 2**31)
    if kind == "flat":
        return [torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)]
    if kind == "decaying":
        return [_with_spectrum(m, n, [0.85 ** i for i in range(s)], t) for t in range(T)]
    if kind == "tied":  # ties inside the top k, and exactly at the cut k = s // T
        k = s // T
        sv = [3.0] * (k // 2) + [2.0] * (k - k // 2 + 2) + [1.0] * (s - k - 2)
        return [_with_spectrum(m, n, sv[:s], 10 + t) for t in range(T)]
    if kind == "rank_deficient":
        return [_with_spectrum(m, n, [1.0, 0.5], 20 + t) for t in range(T)]
    if kind == "tiny_tail":
        return [_with_spectrum(m, n, [10.0 ** (-12 * i / (s - 1)) for i in range(s)], 30 + t) for t in range(T)]
    if kind == "shared":
        common = _with_spectrum(m, n, [5.0, 4.0, 3.0], 40)
        return [common + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)]
    raise ValueError(kind)


def _merges(deltas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"tsv": S.tsv_merge([d.clone() for d in deltas]),
            "iso_cts": S.iso_cts_merge([d.clone() for d in deltas], 0.5),
            "tsv_scaled": E.tsv_scaled_merge([d.clone() for d in deltas])}


@pytest.mark.parametrize("kind", ["flat", "decaying", "tied", "rank_deficient", "tiny_tail", "shared"])
@pytest.mark.parametrize("m, n, T", [(24, 40, 2), (40, 24, 3), (32, 32, 4)])
def test_batched_svds_leave_every_subspace_merge_bit_for_bit(monkeypatch, kind, m, n, T):
    deltas = _deltas(kind, m, n, T)
    batched = _merges(deltas)
    one_by_one = lambda xs, k: [S.truncated_svd(x, k) for x in xs]  # noqa: E731 (the kernels as they were)
    monkeypatch.setattr(S, "truncated_svds", one_by_one)
    monkeypatch.setattr(E, "truncated_svds", one_by_one)
    for name, ref in _merges(deltas).items():
        assert torch.equal(batched[name], ref), name


@pytest.mark.parametrize("m, n", [(24, 40), (40, 24), (33, 33)])
def test_a_batched_svd_gives_each_matrix_the_bits_of_its_own_svd(m, n):
    xs = [torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    u, s, vh = torch.linalg.svd(torch.stack(xs), full_matrices=False)
    for i, x in enumerate(xs):
        u1, s1, vh1 = torch.linalg.svd(x, full_matrices=False)
        assert torch.equal(u[i], u1) and torch.equal(s[i], s1) and torch.equal(vh[i], vh1)
    mixed = S.truncated_svds([xs[0], xs[1][:, :-1]], 3)  # shapes differ: one SVD each
    assert mixed[1][0].shape == (m, 3) and torch.equal(mixed[0][1], S.truncated_svd(xs[0], 3)[1])
