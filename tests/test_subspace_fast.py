"""The Gram route of the subspace kernels (``polar``, ``truncated_svd``) gives every subspace merge as the
exact float64 SVD path does, to 1e-10 relative (Frobenius), on flat, decaying, repeated, rank-deficient and
shared-direction spectra; where its bound fails it takes the SVD (the same code as before, so the same bits)."""

from __future__ import annotations

import pytest
import torch

from submerge.methods import subspace as S
from submerge.methods.esm import esm_merge_matrix, tsv_scaled_merge


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
    if kind == "repeated":  # ties inside the top k, and exactly at the cut k = s // T
        k = s // T
        sv = [3.0] * (k // 2) + [2.0] * (k - k // 2 + 2) + [1.0] * (s - k - 2)
        return [_with_spectrum(m, n, sv[:s], 10 + t) for t in range(T)]
    if kind == "rank_deficient":  # fewer directions than the k kept per task
        return [_with_spectrum(m, n, [1.0, 0.5], 20 + t) for t in range(T)]
    if kind == "tiny_tail":  # singular values down to 1e-12 of the top
        return [_with_spectrum(m, n, [10.0 ** (-12 * i / (s - 1)) for i in range(s)], 30 + t) for t in range(T)]
    if kind == "shared":  # every task mostly one common low-rank update: the stacked factors are ill-conditioned
        common = _with_spectrum(m, n, [5.0, 4.0, 3.0], 40)
        return [common + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)]
    raise ValueError(kind)


def _merges(deltas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    m, n = deltas[0].shape
    grams, counts = [], []
    g = torch.Generator().manual_seed(7)
    for _ in deltas:
        x = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, n, dtype=torch.float64)
        grams.append(x.T @ x)
        counts.append(3 * n)
    return {
        "tsv": S.tsv_merge([d.clone() for d in deltas]),
        "iso_cts": S.iso_cts_merge([d.clone() for d in deltas], 0.5),
        "tsv_scaled": tsv_scaled_merge([d.clone() for d in deltas]),
        "esm_polar": esm_merge_matrix([d.clone() for d in deltas], grams, counts),
        "esm_tsv": esm_merge_matrix([d.clone() for d in deltas], grams, counts, fusion="tsv"),
    }


@pytest.fixture
def svd_only(monkeypatch):
    """The kernels as they were: the Gram route's bounds made impossible."""
    def apply():
        monkeypatch.setattr(S, "POLAR_MIN_RATIO", 2.0)
        monkeypatch.setattr(S, "TOPK_MIN_RATIO", 2.0)
    return apply


@pytest.mark.parametrize("kind", ["flat", "decaying", "repeated", "rank_deficient", "tiny_tail", "shared"])
@pytest.mark.parametrize("m, n, T", [(24, 40, 2), (40, 24, 3), (32, 32, 4)])
def test_every_subspace_merge_equals_the_svd_path(svd_only, kind, m, n, T):
    deltas = _deltas(kind, m, n, T)
    before = dict(S.ROUTES)
    fast = _merges(deltas)
    gram_used = S.ROUTES["gram"] - before["gram"]
    svd_only()
    exact = _merges(deltas)
    for name in fast:
        ref = exact[name]
        err = float(torch.linalg.norm(fast[name] - ref) / torch.linalg.norm(ref).clamp(min=1e-300))
        assert err <= 1e-10, (name, err)
    if kind in ("flat", "decaying"):
        assert gram_used > 0  # the route is taken where it applies (the test is not vacuous)


def test_the_routes_bounds_decide():
    well = torch.linalg.qr(torch.randn(30, 10, dtype=torch.float64))[0] * torch.linspace(1, 5, 10,
                                                                                      dtype=torch.float64)
    before = dict(S.ROUTES)
    p, s = S.polar(well)
    assert S.ROUTES["gram"] == before["gram"] + 1
    torch.testing.assert_close(p.T @ p, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(s, torch.linalg.svdvals(well), rtol=1e-13, atol=0)
    ill = well.clone()
    ill[:, 0] = ill[:, 1] * (1 + 1e-9)  # κ ~ 1e9: the SVD decides
    S.polar(ill)
    assert S.ROUTES["svd"] == before["svd"] + 1
    tie = _with_spectrum(20, 30, [3.0, 2.0, 2.0, 1.0], 0)  # the cut at k = 2 splits a repeated value
    before = dict(S.ROUTES)
    S.truncated_svd(tie, 2)
    assert S.ROUTES["svd"] == before["svd"] + 1
    u, sv, vh = S.truncated_svd(tie, 1)
    torch.testing.assert_close(sv, torch.tensor([3.0], dtype=torch.float64), rtol=1e-13, atol=0)
    torch.testing.assert_close((u * sv) @ vh, torch.linalg.svd(tie)[0][:, :1] * 3.0 @ torch.linalg.svd(tie)[2][:1],
                               rtol=0, atol=1e-12)
