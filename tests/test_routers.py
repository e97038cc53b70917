"""ESM++ routers beside the cosine rule: the shared-covariance Gaussian rule from calibration statistics and a
router trained on unlabeled per-task inputs; routing where cosine cannot tell tasks apart; save/load."""

from __future__ import annotations

import pytest
import torch

from submerge.stats.gram import CalibrationStats, LayerStats
from submerge.errors import ConfigError
from submerge.routing import RoutingRecorder, attach, build_experts, load, save
from submerge.routing.routers import fit_linear, gaussian_router, train_router

from test_routing import _Wrap, _run, _sd, _static, _toy_layer, bert  # noqa: F401 (fixture)


def _stats(mu: torch.Tensor, var: float, n: int = 1000) -> CalibrationStats:
    d = mu.numel()
    gram = n * (var * torch.eye(d, dtype=torch.float64) + torch.outer(mu.double(), mu.double()))
    return CalibrationStats({"lin": LayerStats(gram, mu.float(), n)})


def test_gaussian_rule_separates_tasks_that_point_the_same_way():
    # two tasks whose mean inputs point the same way: cosine to the prototypes cannot tell them apart
    mus = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    base, experts = _toy_layer(mus)
    model = _Wrap(base)
    x = torch.stack([mus[1] + 0.05 * torch.randn(4, 3), mus[0] + 0.05 * torch.randn(4, 3)])
    router = attach(model, experts, rule="cosine")
    with router.recording() as rec:
        model(x)
    assert rec["lin"][0].tolist() == [0, 0]  # both samples go to the first of two equal cosines
    router.detach()
    gaussian_router(experts, [_stats(m, 0.1) for m in mus], shrinkage=0.0)
    # by hand: shared covariance 0.1 I, so w_t = 10 mu_t and b_t = -5 |mu_t|^2
    e = experts.layers["lin"]
    torch.testing.assert_close(e.router_w, 10 * mus, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.router_b, -5 * (mus * mus).sum(-1), rtol=1e-5, atol=1e-4)
    router = attach(model, experts)  # rule auto: the layer's linear router
    with router.recording() as rec:
        model(x)
    assert rec["lin"][0].tolist() == [1, 0]
    # shrinkage towards the scaled identity leaves an isotropic covariance as it is
    gaussian_router(experts, [_stats(m, 0.1) for m in mus], shrinkage=0.5)
    torch.testing.assert_close(e.router_w, 10 * mus, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="shrinkage"):
        gaussian_router(experts, [_stats(m, 0.1) for m in mus], shrinkage=2)
    router.detach()
    plain = _toy_layer(mus)[1]
    router = attach(_Wrap(base), plain, rule="linear")
    with pytest.raises(ConfigError, match="no router"):
        router.model(x)


def test_fit_linear_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 5, generator=g) + 3 * torch.eye(5)[i] for i in range(3)])
    y = torch.arange(3).repeat_interleave(40)
    w, b = fit_linear(x * 100 + 7, y, 3)  # scale and offset do not matter (standardised inside)
    assert ((x * 100 + 7) @ w.T + b).argmax(-1).eq(y).float().mean() > 0.95


def test_trained_and_gaussian_routers_on_a_bert_route_their_tasks_and_round_trip(bert, tmp_path):
    root, tok, base, fts, stats = bert
    model, merged = _static(bert)
    # three tasks whose inputs differ (this tiny vocabulary tokenizes every word to [UNK]: by length); the
    # task of an input is where it came from
    texts = [[" ".join(["cat"] * (2 + 4 * t + i % 2)) for i in range(24)] for t in range(3)]
    batches = [[dict(tok(tt[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 24, 8)] for tt in texts]
    experts = build_experts(merged, [_sd(m) for m in fts], stats, rank=4)
    train_router(model, experts, batches)
    assert experts.info["router"]["kind"] == "trained" and experts.info["router"]["n_inputs"] == 72
    router = attach(model, experts)
    rec = RoutingRecorder(router)
    for t, bs in enumerate(batches):
        for b in bs:
            with rec.batch(t):
                _run(model, b)
    assert rec.report().accuracy > 0.9  # on its own training inputs
    batch = batches[0][0]
    before = _run(model, batch)
    save(tmp_path / "pp", model, experts)
    loaded = load(tmp_path / "pp")
    assert loaded.submerge_router.layers and all(l.router_w is not None for l in loaded.submerge_router.layers.values())
    assert torch.equal(_run(loaded, batch), before)
    model.submerge_router.detach()  # save() re-attached a router of its own
    gaussian_router(experts, stats)
    assert experts.info["router"]["kind"] == "gaussian"
    router = attach(model, experts)
    rec = RoutingRecorder(router)
    with rec.batch(0):
        _run(model, batch)
    assert 0.0 <= rec.report().accuracy <= 1.0
