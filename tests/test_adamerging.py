"""AdaMerging (Yang et al., ICLR 2024): the identity at zero steps, entropy going down, clamping, task-wise
sharing, AdaMerging++'s TIES-processed vectors, and the registered method from a coefficients file."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import submerge
from submerge.errors import ConfigError
from submerge.methods.adamerging import (Coefficients, TaskVectors, entropy, learn, merge_with, ties_keep,
                                         ties_task_vectors)

from conftest import load_dir


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = [{k: v + 0.3 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    heads = [torch.randn(8, 4) for _ in range(3)]
    inputs = [[torch.randn(16, 6) for _ in range(4)] for _ in range(3)]

    def logits(forward, t, batch):
        return forward(batch) @ heads[t]

    return model, base, experts, inputs, logits


def test_entropy_by_hand():
    assert float(entropy(torch.zeros(5, 4))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([[100.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_zero_steps_is_task_arithmetic_at_the_initial_coefficient():
    model, base, experts, inputs, logits = _setup()
    coef = learn(model, base, experts, inputs, logits, steps=0, init=0.3)
    assert coef.values.shape == (3, len(base)) and torch.allclose(coef.values, torch.full((3, len(base)), 0.3, dtype=torch.float64))
    ta = submerge.merge_state_dicts("task_arithmetic", base, experts, {"weight": 1.0, "lambda": 0.3})
    got = merge_with(base, experts, coef)
    for n in base:
        torch.testing.assert_close(got[n], ta[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_learning_lowers_the_entropy_and_keeps_coefficients_in_range(granularity):
    model, base, experts, inputs, logits = _setup()
    coef = learn(model, base, experts, inputs, logits, steps=60, lr=0.05, granularity=granularity)
    assert coef.history[-1] < coef.history[0]
    assert float(coef.values.min()) >= 0 and float(coef.values.max()) <= 1
    if granularity == "task":  # one coefficient per task, shared by every tensor
        assert torch.all(coef.values == coef.values[:, :1])
    else:
        assert not torch.all(coef.values == coef.values[:, :1])
    # the learned merge is what the loss saw: its entropy is the last steps' level, below the start
    merged = merge_with(base, experts, coef)
    model.load_state_dict(merged)
    with torch.no_grad():
        final = sum(float(entropy(logits(model, t, inputs[t][0]))) for t in range(3))
    assert final < coef.history[0]


def test_one_step_follows_the_gradient_of_the_summed_entropy():
    """The coefficients' gradient is accumulated task by task (each task's graph freed by its own backward); one
    Adam step from it equals one step from the gradient of the whole summed entropy, built in one graph here."""
    from torch.func import functional_call

    model, base, experts, inputs, logits = _setup()
    names = list(base)
    coef = learn(model, base, experts, inputs, logits, steps=1, lr=0.05, granularity="layer", names=names)
    raw = torch.full((3, len(names)), 0.3, requires_grad=True)
    lam = raw.clamp(0.0, 1.0)
    params = {n: base[n] + torch.tensordot(lam[:, p], torch.stack([e[n] - base[n] for e in experts]), dims=1)
              for p, n in enumerate(names)}
    order = [torch.randperm(len(b), generator=g).tolist() for g in [torch.Generator().manual_seed(0)]
             for b in inputs]
    total = sum(entropy(logits(lambda *a, **k: functional_call(model, params, a, k), t, inputs[t][order[t][0]]))
                for t in range(3))
    opt = torch.optim.Adam([raw], lr=0.05)
    total.backward()
    opt.step()
    assert coef.history[0] == pytest.approx(float(total), rel=1e-6)
    torch.testing.assert_close(coef.values.float(), raw.detach().clamp(0.0, 1.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_task_vectors_formed_on_the_fly_are_the_stacked_ones(ties):
    """``TaskVectors`` (τ_t formed from the experts' own tensors, no stacked copy kept) gives ``θ_0 + c · τ`` and
    the coefficients' gradient ``<G, τ_t>`` of the stacked task vectors (AdaMerging++: TIES' kept entries)."""
    g = torch.Generator().manual_seed(3)
    theta0 = torch.randn(5, 7, dtype=torch.float64, generator=g)
    thetas = [theta0 + torch.randn(5, 7, dtype=torch.float64, generator=g) for _ in range(3)]
    deltas = torch.stack([x - theta0 for x in thetas])
    taus = ties_task_vectors(deltas, 0.4) if ties else deltas
    tv = TaskVectors(theta0, thetas, ties_keep(deltas, 0.4) if ties else None)
    coef = torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64)
    scratch = torch.empty_like(theta0)
    torch.testing.assert_close(tv.merged(coef.tolist(), scratch), theta0 + torch.tensordot(coef, taus, dims=1),
                               rtol=0, atol=1e-12)
    w = torch.randn(5, 7, dtype=torch.float64, generator=g)
    torch.testing.assert_close(tv.dots(w, scratch), (taus * w).sum((1, 2)), rtol=1e-12, atol=1e-12)


def test_tensors_no_expert_changes_keep_their_initial_coefficient():
    model, base, experts, inputs, logits = _setup()
    for e in experts:
        e["0.bias"] = base["0.bias"].clone()
    coef = learn(model, base, experts, inputs, logits, steps=5, lr=0.05, granularity="layer", names=list(base))
    p = list(base).index("0.bias")
    assert torch.all(coef.values[:, p].float() == 0.3) and not torch.all(coef.values.float() == 0.3)
    # merged: that tensor is the base's values in a tensor of its own (no task vector is formed for it, so no
    # expert-sized scratch either); the others are the formula's, AdaMerging++'s too
    for ties in (None, 0.5):
        c = Coefficients(coef.tasks, coef.names, torch.rand(coef.values.shape, dtype=torch.float64), "layer", ties,
                         [0.0])
        got = merge_with(base, experts, c)
        assert torch.equal(got["0.bias"], base["0.bias"]) and got["0.bias"] is not base["0.bias"]
        for q, n in enumerate(c.names):
            d = torch.stack([e[n] - base[n] for e in experts])
            d = ties_task_vectors(d, ties) if ties else d
            torch.testing.assert_close(got[n], base[n] + torch.tensordot(c.values[:, q].float(), d, dims=1),
                                       rtol=0, atol=1e-6)


def test_adamerging_plus_plus_uses_ties_processed_vectors():
    d = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-4.0, 1.0, 0.2, 1.0]])
    # top-50% per task: [3, 0, 0, 2] and [-4, 1, 0, 0]; elected sign of the sum [-1, 1, 0, 2] -> [-, +, +, +]
    out = ties_task_vectors(d, 0.5)
    assert out.tolist() == [[0.0, 0.0, 0.0, 2.0], [-4.0, 1.0, 0.0, 0.0]]
    model, base, experts, inputs, logits = _setup()
    coef = learn(model, base, experts, inputs, logits, steps=0, ties=True, ties_density=0.5)
    got = merge_with(base, experts, coef)
    for n in base:
        deltas = torch.stack([e[n] - base[n] for e in experts])
        want = base[n] + 0.3 * ties_task_vectors(deltas, 0.5).sum(0)
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ties", [None, 0.5])
def test_registered_method_merges_with_a_coefficients_file(family, tmp_path, ties):
    base_dir, fts = family
    base = load_dir(base_dir)
    experts = [load_dir(p) for p in fts]
    names = [k for k, v in base.items() if v.is_floating_point()]
    g = torch.Generator().manual_seed(1)
    coef = Coefficients([p.name for p in fts], names, torch.rand(3, len(names), generator=g, dtype=torch.float64),
                        ties_density=ties)
    path = coef.save(tmp_path / "coef.json")
    cfg = {"merge_method": "adamerging", "base_model": str(base_dir), "models": [{"model": str(p)} for p in fts],
           "parameters": {"coefficients": str(path)}}
    submerge.merge(cfg, tmp_path / "out", quiet=True)
    got = load_dir(tmp_path / "out")
    want = merge_with(base, experts, Coefficients.load(path))
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    assert coef.heatmap(tmp_path / "coef.png").stat().st_size > 1000
    # the wrong number of models, or a tensor without a coefficient: one clear error, nothing written
    cfg2 = dict(cfg, models=cfg["models"][:2])
    with pytest.raises(ConfigError, match="3 tasks"):
        submerge.merge(cfg2, tmp_path / "out2", quiet=True)
    Coefficients(coef.tasks, names[1:], coef.values[:, 1:]).save(tmp_path / "short.json")
    cfg3 = dict(cfg, parameters={"coefficients": str(tmp_path / "short.json")})
    with pytest.raises(ConfigError, match="no coefficients for tensor"):
        submerge.merge(cfg3, tmp_path / "out3", quiet=True)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
