"""Memory-lean kernels give the same bits as the straightforward formulas they replace.

RAM, SCE, Multi-SLERP and Model Stock run their per-entry steps in column blocks and stack task vectors
while releasing the inputs (kernels.stack_released): here each is checked, bit for bit, against the plain
whole-tensor formula (the code they replaced), with blocks forced small so every tensor spans many."""

from __future__ import annotations

import pytest
import torch

from submerge.api import merge_state_dicts
from submerge.methods import kernels


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 1)  # the minimum block: 4096 columns


def _family(T: int, shape=(97, 211), seed: int = 0, sparse: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(T):
        d = 0.05 * torch.randn(shape, generator=g)
        if sparse:
            d = d * (torch.rand(shape, generator=g) > sparse)
        models.append(base + d)
    return base, models


def _merge(method, base, models, params=None):
    return merge_state_dicts(method, {"w": base}, [{"w": m} for m in models], params or {})["w"]


def _ram_reference(deltas, epsilon, r=0.0, alpha=0.0):
    T = deltas.shape[0]
    flat = deltas.reshape(T, -1)
    changed = flat.abs() > epsilon
    count = changed.sum(0)
    shared, unique = changed & (count > 1), changed & (count == 1)
    zero = torch.zeros((), dtype=flat.dtype)
    merged = torch.where(shared, flat, zero).sum(0) / count.clamp(min=1).to(flat.dtype)
    only = torch.where(unique, flat, zero)
    if r != 0.0:
        rho = shared.sum(1).to(flat.dtype) / unique.sum(1).to(flat.dtype).clamp(min=epsilon)
        only = only * (1 + r * rho.clamp(min=0, max=alpha))[:, None]
    return merged.add_(only.sum(0)).reshape(deltas.shape[1:])


@pytest.mark.parametrize("T", [1, 3, 8])
def test_ram_in_blocks_is_the_whole_tensor_formula(T):
    base, models = _family(T, sparse=0.6)
    deltas = torch.stack([m - base for m in models])
    assert torch.equal(_merge("ram", base, models), _ram_reference(deltas, 1e-5).add_(base))
    assert torch.equal(_merge("ramplus_tl", base, models, {"r": 0.5, "alpha": 0.7}),
                       _ram_reference(deltas, 1e-5, 0.5, 0.7).add_(base))


def _sce_reference(deltas, select_topk):
    from submerge.methods.sce import variance_across

    T = deltas.shape[0]
    if select_topk < 1:
        var = variance_across(deltas)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        deltas = deltas * kernels.rank_window_mask(var.abs(), var.numel() - k, var.numel())
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    w = deltas.square().reshape(T, -1).mean(1)
    w = w / float(w.sum())
    weights = (deltas.sign() == sign).to(deltas.dtype).mul_(w.reshape((T,) + (1,) * (deltas.dim() - 1)))
    return (deltas * weights).sum(0).div_(weights.sum(0).clamp_(min=1e-6))


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_in_blocks_is_the_whole_tensor_formula(select_topk):
    base, models = _family(5)
    deltas = torch.stack([m - base for m in models])
    assert torch.equal(_merge("sce", base, models, {"select_topk": select_topk}),
                       _sce_reference(deltas, select_topk).add_(base))


def _multislerp_reference(x, w, eps):
    flat = x.reshape(x.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / torch.linalg.vector_norm(mean)
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    t_res = (tangent * w[:, None]).sum(0)
    t_norm = torch.linalg.vector_norm(t_res) + eps
    out = mean * torch.cos(t_norm) + t_res * (torch.sin(t_norm) / t_norm)
    return (out * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])


@pytest.mark.parametrize("T", [2, 3, 8])
def test_multislerp_in_blocks_is_the_whole_tensor_formula(T):
    base, models = _family(T)
    w = torch.linspace(1.0, 2.0, T)
    got = merge_state_dicts("multislerp", {"w": base}, [{"w": m} for m in models], {"normalize_weights": False},
                            [{"weight": float(v)} for v in w])["w"]
    want = _multislerp_reference(torch.stack([m - base for m in models]), w, 1e-8).add_(base)
    assert torch.equal(got, want)


def _model_stock_reference(base, models, filter_wise):
    w0 = (base if base.dim() > 1 else base.unsqueeze(0)).reshape(base.shape[0], -1) if filter_wise \
        else base.reshape(1, -1)
    n = len(models)
    offsets = torch.stack([x.reshape(w0.shape) - w0 for x in models])
    average = torch.stack([x.reshape(w0.shape) for x in models]).mean(dim=0)
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    gram = torch.einsum("irc,jrc->ijr", offsets, offsets)
    iu = torch.triu_indices(n, n, offset=1)
    cos = gram[iu[0], iu[1]] / (norms[iu[0]] * norms[iu[1]]).clamp(min=1e-6)
    cos = cos.clamp(-1, 1).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    return (t * average + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("T", [2, 8])
def test_model_stock_lean_is_the_whole_tensor_formula(T, filter_wise):
    base, models = _family(T)
    assert torch.equal(_merge("model_stock", base, models, {"filter_wise": filter_wise}),
                       _model_stock_reference(base, models, filter_wise))


def test_stack_released_drops_the_inputs_and_matches_stack():
    xs = [torch.randn(3, 4) for _ in range(3)]
    b = torch.randn(3, 4)
    want = torch.stack([x - b for x in xs])
    held = list(xs)
    got = kernels.stack_released(held, b)
    assert torch.equal(got, want) and held == [None, None, None]


def test_fisher_merge_in_blocks_is_the_whole_tensor_formula():
    from submerge.stats.fisher import FisherStats

    base, models = _family(3)
    g = torch.Generator().manual_seed(5)
    fishers = [FisherStats({"w": torch.rand(base.shape, generator=g)}) for _ in models]
    fishers[1] = FisherStats({})  # a model without a Fisher for this tensor
    got = merge_state_dicts("fisher", None, [{"w": m} for m in models], {"epsilon": 1e-3},
                            [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], stats=fishers)["w"]
    H = [f.tensors.get("w") for f in fishers]
    floor = 1e-3 * float(sum(float(h.mean()) for h in H if h is not None) / 2)
    num = torch.zeros_like(base, dtype=torch.float64)
    den = torch.zeros_like(num)
    for t, h, w in zip(models, H, [1.0, 2.0, 0.5]):
        f = (h.double() if h is not None else torch.zeros_like(num)) + floor
        num.add_(f * t.double(), alpha=w)
        den.add_(f, alpha=w)
    assert torch.equal(got, (num / den).to(base.dtype))
