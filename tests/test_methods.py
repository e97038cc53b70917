"""Each method's defining property on small tensors (identities, algebra, hand-computed values)."""

import math

import pytest
import torch

from submerge.methods import TensorContext, get_method, list_methods


def run(name, tensors, base=None, seed=0, state=None, **params):
    m = get_method(name)
    n = len(tensors)
    full = {}
    for p in m.params:
        if p.name in params:
            v = params[p.name]
            full[p.name] = (v if isinstance(v, list) else [v] * n) if p.per_model else v
        elif p.required:
            raise AssertionError(f"test must set {p.name}")
        else:
            full[p.name] = [p.default] * n if p.per_model else p.default
    ctx = TensorContext("t", [t.clone() for t in tensors], None if base is None else base.clone(),
                        torch.Generator().manual_seed(seed), state)
    return m(ctx, **full)


@pytest.fixture
def tvs():
    torch.manual_seed(0)
    base = torch.randn(8, 16)
    fts = [base + 0.1 * torch.randn(8, 16) for _ in range(3)]
    return base, fts


def test_every_method_documents_paper_variant_and_defaults():
    for m in list_methods():
        assert m.paper and m.url.startswith("http") and "efault" in m.variant + "".join(
            p.help for p in m.params) or m.name == "slerp", m.name
        assert m.func.__module__.startswith("submerge.methods.")


def test_linear_identity_and_weighted_mean(tvs):
    base, fts = tvs
    assert torch.equal(run("linear", [fts[0]], weight=1.0), fts[0])
    out = run("linear", fts, weight=[1.0, 2.0, 1.0])
    assert torch.allclose(out, (fts[0] + 2 * fts[1] + fts[2]) / 4, atol=1e-6)
    out = run("linear", fts[:2], weight=[0.5, 0.25], normalize=False)
    assert torch.allclose(out, 0.5 * fts[0] + 0.25 * fts[1], atol=1e-6)


def test_task_arithmetic_algebra(tvs):
    base, fts = tvs
    # a model and its negation cancel to the base
    out = run("task_arithmetic", [fts[0], fts[0]], base, weight=[1.0, -1.0])
    assert torch.allclose(out, base, atol=1e-6)
    out = run("task_arithmetic", fts, base, weight=[0.3, 0.3, 0.3], **{"lambda": 2.0})
    expect = base + 2.0 * 0.3 * sum(f - base for f in fts)
    assert torch.allclose(out, expect, atol=1e-6)
    # normalize turns it into the weighted mean of task vectors
    out = run("task_arithmetic", fts, base, weight=[1.0, 1.0, 2.0], normalize=True)
    assert torch.allclose(out, base + (fts[0] + fts[1] + 2 * fts[2] - 4 * base) / 4, atol=1e-6)


def test_ties_by_hand():
    base = torch.zeros(5)
    a = torch.tensor([3.0, -1.0, 0.2, 2.0, -0.1])
    b = torch.tensor([-2.0, -4.0, 0.1, 1.0, 0.3])
    # density 0.6: keep 3 entries each -> a: [3, -1, 2] at 0,1,3 ; b: [-2, -4, 1] at 0,1,3
    out = run("ties", [a, b], base, weight=1.0, density=0.6)
    # idx0: 3 + -2 = 1 -> +, keep 3 -> 3; idx1: -5 -> -, mean(-1,-4) = -2.5; idx3: mean(2,1) = 1.5
    assert torch.allclose(out, torch.tensor([3.0, -2.5, 0.0, 1.5, 0.0]))


def test_ties_one_model_full_density_returns_that_model(tvs):
    base, fts = tvs
    out = run("ties", [fts[1]], base, weight=0.7, density=1.0)
    assert torch.allclose(out, fts[1], atol=1e-6)


def test_ties_global_scope_matches_reference_code():
    """topk_scope=global reproduces the TIES reference: one kthvalue over the flattened model."""
    from submerge.methods.task_arithmetic import _ties_global_thresholds
    from submerge.methods.registry import ModelPass

    torch.manual_seed(5)
    names = ["w1", "w2"]
    base = {n: torch.randn(6, 7) for n in names}
    fts = [{n: base[n] + torch.randn(6, 7) * (1 + i) for n in names} for i in range(3)]
    density = 0.3
    params = {"density": [density] * 3}
    mp = ModelPass(names, lambda n: ([f[n].clone() for f in fts], base[n].clone()), lambda n: params,
                   ["a", "b", "c"])
    thresholds = _ties_global_thresholds(mp, {})
    # reference (ties-merging repo): flatten, kthvalue(n - int(n*K)), keep >= ; elect; disjoint mean
    flat = torch.stack([torch.cat([(f[n] - base[n]).reshape(-1) for n in names]) for f in fts])
    n = flat.shape[1]
    kth = flat.abs().kthvalue(n - int(n * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = 1
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    ref = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    got = []
    for name in names:
        out = run("ties", [f[name] for f in fts], base[name], state=thresholds, weight=1.0,
                  density=density, topk_scope="global")
        got.append((out - base[name]).reshape(-1))
    assert torch.allclose(torch.cat(got), ref, atol=1e-6)
    assert thresholds == [v.item() for v in kth.reshape(-1)]


def test_dare_full_density_is_task_arithmetic_and_seeded(tvs):
    base, fts = tvs
    ta = run("task_arithmetic", fts, base, weight=0.5)
    assert torch.allclose(run("dare_linear", fts, base, weight=0.5, density=1.0), ta, atol=1e-6)
    a = run("dare_ties", fts, base, weight=0.5, density=0.3, seed=7)
    b = run("dare_ties", fts, base, weight=0.5, density=0.3, seed=7)
    c = run("dare_ties", fts, base, weight=0.5, density=0.3, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_drops_at_the_rate_and_rescales():
    torch.manual_seed(0)
    base = torch.zeros(200, 200)
    ft = torch.randn(200, 200)
    out = run("dare_linear", [ft], base, weight=1.0, density=0.25, rescale_norm="density")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.allclose(out[kept], ft[kept] / 0.25)  # the paper's 1/(1-p)
    out = run("dare_linear", [ft], base, weight=1.0, density=0.25)  # mergekit: l1 preserved
    assert math.isclose(out.abs().sum().item(), ft.abs().sum().item(), rel_tol=1e-4)


def test_breadcrumbs_keeps_the_middle_band():
    base = torch.zeros(100)
    ft = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    out = run("breadcrumbs", [ft], base, weight=1.0, density=0.5, gamma=0.1)
    kept = out != 0
    assert torch.equal(ft.abs()[kept], torch.arange(41, 91, dtype=torch.float32))
    assert torch.equal(out[kept], ft[kept])


def test_della_density_window_and_seed(tvs):
    base, fts = tvs
    from submerge.errors import ConfigError

    with pytest.raises(ConfigError, match="density ± epsilon"):
        run("della", fts, base, weight=1.0, density=0.1, epsilon=0.2)
    a = run("della_linear", fts, base, weight=1.0, density=0.5, epsilon=0.1, seed=3)
    b = run("della_linear", fts, base, weight=1.0, density=0.5, epsilon=0.1, seed=3)
    assert torch.equal(a, b)
    # large entries survive more often than small ones
    torch.manual_seed(0)
    x = torch.randn(1, 4000)
    keep = torch.zeros_like(x)
    for s in range(20):
        keep += (run("della_linear", [x], torch.zeros_like(x), weight=1.0, density=0.5, epsilon=0.4,
                     seed=s, rescale=False) != 0).float()
    order = x.abs().argsort(dim=1)
    assert keep[0, order[0, -400:]].mean() > 0.8 * 20 and keep[0, order[0, :400]].mean() < 0.2 * 20


def test_slerp_endpoints_and_great_circle():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("slerp", [e2], e1, t=0.0), e1)
    assert torch.allclose(run("slerp", [e2], e1, t=1.0), e2, atol=1e-7)
    mid = run("slerp", [e2], e1, t=0.5)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # collinear: plain interpolation
    assert torch.allclose(run("slerp", [3 * e1], e1, t=0.25), 1.5 * e1)


def test_model_stock_extremes(tvs):
    base, fts = tvs
    # identical fine-tunes: cos = 1 -> t = 1 -> the fine-tune itself
    assert torch.allclose(run("model_stock", [fts[0], fts[0]], base), fts[0], atol=1e-6)
    # orthogonal task vectors: cos = 0 -> t = 0 -> the base
    b = torch.zeros(4)
    out = run("model_stock", [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])], b)
    assert torch.allclose(out, b)
    # cos = 0.5 with 2 models: t = 2*0.5/(1+0.5) = 2/3
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    out = run("model_stock", [u, v], torch.zeros(2))
    assert torch.allclose(out, (2 / 3) * (u + v) / 2, atol=1e-6)


def test_magnitude_prune_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([4.0, -1.0, 0.5, -3.0])
    b = torch.tensor([1.0, 2.0, -5.0, 0.1])
    out = run("magnitude_prune", [a, b], base, weight=1.0, density=0.5)
    assert torch.allclose(out, torch.tensor([4.0, 2.0, -5.0, -3.0]))


def test_ties_fused_path_equals_mask_path_with_heavy_ties():
    """The chunked CPU path (threshold + tie budget) equals whole-tensor masks, ties included."""
    from submerge.methods import kernels

    torch.manual_seed(4)
    base = torch.zeros(50, 40)
    fts = [torch.round(torch.randn(50, 40) * 4) / 4 for _ in range(3)]  # few distinct magnitudes
    weights, density = [1.0, 0.5, 2.0], 0.3
    got = run("ties", fts, base, weight=weights, density=density)
    masked = torch.stack([f * kernels.magnitude_mask(f, density) * w for f, w in zip(fts, weights)])
    expect = kernels.disjoint_merge(masked, torch.tensor(weights), kernels.elect_sign(masked), True)
    assert torch.equal(got, expect)
    for f in fts:  # exactly k kept, earliest positions win among equal magnitudes
        m = kernels.magnitude_mask(f, density)
        assert m.sum().item() == int(density * f.numel())
    rules = [kernels.magnitude_threshold(f, density) for f in fts]
    assert any(r.budget is not None for r in rules)
    small = kernels.consensus_merge_chunked([f.clone() for f in fts], rules, weights, True,
                                            torch.empty(50, 40), chunk=7)
    rules = [kernels.magnitude_threshold(f, density) for f in fts]
    large = kernels.consensus_merge_chunked([f.clone() for f in fts], rules, weights, True,
                                            torch.empty(50, 40))
    assert torch.equal(small, expect) and torch.equal(large, expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_models", [1, 2, 3, 6])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_fused_kernel_is_bitwise_the_mask_path(dtype, n_models, normalize):
    """The fused chunk kernel (hardshrink trim, copysign election) equals trim-by-mask + elect_sign +
    disjoint_merge bit for bit: negative and zero weights, no-trim and trim-all rules, ties at the
    threshold split by the cutoff inside a chunk, and exact cancellations (a total of 0 elects +)."""
    from submerge.methods import kernels

    g = torch.Generator().manual_seed(n_models)
    shape = (37, 29)
    fts = [(torch.randint(-6, 7, shape, generator=g) / 4).to(dtype) for _ in range(n_models)]
    if n_models >= 2:
        fts[1].view(-1)[:50] = -fts[0].view(-1)[:50]  # exact cancellations
    weights = [1.0, -0.5, 0.0, 2.0, 0.25, 1.0][:n_models]
    densities = [0.3, 1.0, 0.0, 0.5, 0.7, 0.2][:n_models]
    rules, masks = [], []
    for f, dens in zip(fts, densities):
        if dens >= 1:
            rules.append(None)
            masks.append(torch.ones(shape, dtype=torch.bool))
        elif dens <= 0:
            rules.append(kernels.TopK(float("inf")))
            masks.append(torch.zeros(shape, dtype=torch.bool))
        else:
            rules.append(kernels.magnitude_threshold(f, dens))
            masks.append(kernels.magnitude_mask(f, dens))
    assert any(r is not None and r.budget for r in rules)  # a tie cutoff is exercised
    stacked = torch.stack([f * m * w for f, m, w in zip(fts, masks, weights)])
    w = torch.tensor(weights, dtype=dtype)
    expect = kernels.disjoint_merge(stacked, w, kernels.elect_sign(stacked), normalize)
    for chunk in (1, 64, 1 << 18):
        got = kernels.consensus_merge_chunked(fts, rules, weights, normalize, torch.empty(shape, dtype=dtype),
                                              chunk=chunk)
        assert torch.equal(got, expect), chunk


def test_nearswap_by_hand():
    base = torch.tensor([0.0, 1.0, 2.0, 3.0])
    other = torch.tensor([0.001, 1.5, 2.0, 13.0])
    out = run("nearswap", [other], base, t=0.1)
    # |diff| = 0.001 (w = 1: other), 0.5 (w = 0.2), 0 (w = 1), 10 (w = 0.01)
    assert torch.allclose(out, torch.tensor([0.001, 1.1, 2.0, 3.1]))
    assert torch.equal(run("nearswap", [other], base, t=0.0), base)


def test_sce_by_hand_and_identities():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 0.0, 4.0]), torch.tensor([3.0, 2.0, 1.0, -1.0])
    # weights ∝ mean square: a 21/4, b 15/4 -> 21/36, 15/36; summed signs +, +, +, + (3, 0 -> +, 1, 3)
    wa, wb = 21 / 36, 15 / 36
    want = torch.tensor([(wa * 1 + wb * 3) / (wa + wb), 2.0, 1.0, 4.0])
    assert torch.allclose(run("sce", [a, b], base, select_topk=1.0), want)
    # one model: the model itself; select_topk keeps the highest-variance entries only
    assert torch.allclose(run("sce", [a], base, select_topk=1.0), a)
    kept = run("sce", [a, b], base, select_topk=0.5)  # variances 1, 4, 0.25, 6.25 -> keep entries 1 and 3
    assert torch.count_nonzero(kept[[0, 2]]) == 0 and torch.count_nonzero(kept[[1, 3]]) == 2


def test_nuslerp_endpoints_great_circle_and_rows():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # t = w2 / (w1 + w2); endpoints give the inputs
    assert torch.allclose(run("nuslerp", [a, b], weight=[1.0, 0.0]), a, atol=1e-6)
    assert torch.allclose(run("nuslerp", [a, b], weight=[0.0, 1.0]), b, atol=1e-6)
    # per row (no flattening): rows are orthogonal pairs of equal norm -> the midpoint keeps the norm
    mid = run("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False)
    s = math.sqrt(0.5)
    assert torch.allclose(mid, torch.tensor([[s, s], [2 * s, 2 * s]]), atol=1e-6)
    # row_wise slerps along the first dimension: the same as slerping the transposes per row
    rw = run("nuslerp", [a, b], weight=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    ref = run("nuslerp", [a.T.contiguous(), b.T.contiguous()], weight=[1.0, 3.0], nuslerp_flatten=False).T
    assert torch.allclose(rw, ref)
    # with a base: base + slerp of the task vectors; colinear task vectors interpolate linearly
    base = torch.full((2, 2), 5.0)
    out = run("nuslerp", [base + a, base + 2 * a], base, weight=[1.0, 1.0])
    assert torch.allclose(out, base + 1.5 * a)
    # weights summing to ~0: t = 0.5
    assert torch.allclose(run("nuslerp", [a, b], weight=[1.0, -1.0]), run("nuslerp", [a, b], weight=[1.0, 1.0]))


def test_multislerp_properties():
    torch.manual_seed(1)
    x = torch.randn(3, 5)
    # one model: returned as it is; two orthonormal unit vectors at equal weight: the normalised midpoint
    assert torch.equal(run("multislerp", [x[0]], weight=1.0), x[0])
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("multislerp", [e0, e1], weight=[1.0, 1.0]), torch.tensor([1.0, 1.0]) / math.sqrt(2),
                          atol=1e-6)
    # identical inputs give the input back (any weights); scaling the weights changes nothing when normalised
    assert torch.allclose(run("multislerp", [x[0], x[0], x[0]], weight=[0.2, 0.3, 0.5]), x[0], atol=1e-5)
    assert torch.allclose(run("multislerp", list(x), weight=[1.0, 2.0, 3.0]),
                          run("multislerp", list(x), weight=[2.0, 4.0, 6.0]), atol=1e-6)
    # the result's norm is the weighted mean norm
    w = torch.tensor([0.2, 0.3, 0.5])
    out = run("multislerp", list(x), weight=w.tolist())
    assert math.isclose(out.norm().item(), (x.norm(dim=1) * w).sum().item(), rel_tol=1e-5)
    # with a base: translation invariant
    base = torch.randn(5)
    shifted = run("multislerp", [base + v for v in x], base, weight=w.tolist())
    assert torch.allclose(shifted, base + out, atol=1e-5)
    # antipodal pair at equal weight: linear fallback (zero); three cancelling inputs: a clear error
    assert torch.allclose(run("multislerp", [e0, -e0], weight=[1.0, 1.0]), torch.zeros(2))
    from submerge.errors import ConfigError
    with pytest.raises(ConfigError, match="mean direction"):
        run("multislerp", [e0, -e0, e0, -e0], weight=[1.0, 1.0, 1.0, 1.0])
    # every input equal to the base (a tensor no LoRA expert adapts): the base, whatever the number of models
    # (the result is scaled by the zero mean norm; mergekit 0.1.5 raises here); without a base, zeros
    assert torch.equal(run("multislerp", [base.clone() for _ in range(4)], base, weight=[0.1, 0.2, 0.3, 0.4]), base)
    assert torch.equal(run("multislerp", [torch.zeros(5)] * 3, weight=[1.0, 1.0, 1.0]), torch.zeros(5))


def test_karcher_mean_on_the_circle():
    # unit vectors at angles 0 and 90 degrees, norms 1 and 3: the Karcher mean direction is at 45 degrees
    # (the geodesic midpoint), scaled by the mean norm 2
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    out = run("karcher", [a, b], max_iter=50, tol=1e-9)
    assert torch.allclose(out, torch.tensor([math.sqrt(2), math.sqrt(2)]), atol=1e-5)
    # three directions at 0, 30, 90 degrees: the Karcher mean minimises the summed squared angles,
    # i.e. it lies at the mean angle 40 degrees (on a circle the intrinsic mean is the mean angle)
    ang = torch.tensor([0.0, 30.0, 90.0]) * math.pi / 180
    vs = [torch.stack([torch.cos(t), torch.sin(t)]) for t in ang]
    out = run("karcher", vs, max_iter=100, tol=1e-9)
    assert math.isclose(math.atan2(out[1].item(), out[0].item()) * 180 / math.pi, 40.0, abs_tol=1e-3)
    # zero inputs take no part in the direction but count in the norm average; all zero gives zero
    z = torch.zeros(2)
    assert torch.allclose(run("karcher", [a, z]), 0.5 * a)
    assert torch.equal(run("karcher", [z, z]), z)


def test_arcee_fusion_keeps_only_outlier_changes():
    base = torch.zeros(1, 101)
    model = base.clone()
    model[0, :100] = 0.01 * torch.arange(1, 101) / 100  # small, graded changes
    model[0, 100] = 5.0  # one outlier
    out = run("arcee_fusion", [model], base)
    # the importance is |change| * (one KL per row): the threshold median + 1.5 IQR of |change| keeps the
    # outlier and nothing else
    assert out[0, 100] == 5.0 and torch.count_nonzero(out[0, :100]) == 0
    # identical models: the base back
    assert torch.equal(run("arcee_fusion", [base.clone()], base), base)


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0, 1e-6])
    b = torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0])
    # entry 0 changed by both: mean 2; 1 only by a; 2 only by b; 3 by none; 4 below epsilon
    want = torch.tensor([2.0, 2.0, 4.0, 0.0, 0.0])
    assert torch.equal(run("ram", [a, b], base, epsilon=1e-5), want)
    # RAM+: each model shares 1 entry and owns 1 -> rho = 1, lambda = 1 + r * min(rho, alpha)
    out = run("ramplus_tl", [a, b], base, epsilon=1e-5, r=0.5, alpha=0.4)
    assert torch.allclose(out, torch.tensor([2.0, 2.0 * 1.2, 4.0 * 1.2, 0.0, 0.0]))
    assert torch.equal(run("ramplus_tl", [a, b], base, r=0.0), want)
    # one model: its task vector unchanged
    assert torch.equal(run("ram", [a], base), torch.where(a.abs() > 1e-5, a, base))


def test_passthrough_copies_or_scales():
    x = torch.randn(3, 4)
    assert torch.equal(run("passthrough", [x], scale=[None]), x)
    assert torch.equal(run("passthrough", [x], scale=[0.5]), x * 0.5)


def test_sce_variance_is_bitwise_torch_var():
    from submerge.methods.sce import variance_across

    torch.manual_seed(3)
    for shape in [(3, 5, 7), (2, 70000), (5, 3), (1, 4)]:
        for dt in (torch.float32, torch.float64):
            x = torch.randn(*shape, dtype=dt) * 0.01
            assert torch.equal(variance_across(x, chunk=1000), x.var(dim=0, unbiased=False))
