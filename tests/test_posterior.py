"""Posterior merging (fisher, posterior: isotropic / diagonal / mixture) and the diagonal Fisher."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from submerge.api import merge_state_dicts
from submerge.errors import ConfigError
from submerge.stats.fisher import FisherReader, FisherStats, fisher_diagonal
from submerge.methods import ModelPass
from submerge.methods.posterior import _mixture_prepare

torch.set_default_dtype(torch.float32)


def _family(n_models=3, shapes=((5, 4), (7,)), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)}
    models = [{k: v + 0.5 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in base.items()}
              for _ in range(n_models)]
    fishers = [FisherStats({k: torch.rand(v.shape, generator=g, dtype=dtype) * 3 + 0.1 for k, v in base.items()})
               for _ in models]
    return base, models, fishers


def test_equal_isotropic_precisions_is_task_arithmetic():
    base, models, _ = _family()
    alphas = [0.3, 0.5, 0.9]
    got = merge_state_dicts("posterior", base, models, {"family": "isotropic", "prior_precision": 2.0},
                            [{"weight": a, "precision": 2.0} for a in alphas])
    ta = merge_state_dicts("task_arithmetic", base, models, None, [{"weight": a} for a in alphas])
    for k in base:
        assert torch.allclose(got[k], ta[k], atol=1e-6)
    # sharper posteriors pull towards their own model: precision 10x on model 0, one task, weight 1
    one = merge_state_dicts("posterior", base, models[:1], {"family": "isotropic", "prior_precision": 1.0},
                            [{"weight": 1.0, "precision": 10.0}])
    assert torch.allclose(one["t0"], models[0]["t0"], atol=1e-6)


def test_one_task_returns_that_expert_for_every_rule():
    base, models, fishers = _family(n_models=1)
    for method, params in [("fisher", {}), ("posterior", {"family": "diagonal"}),
                           ("posterior", {"family": "mixture", "em_steps": 2}),
                           ("posterior", {"family": "isotropic", "prior_precision": 1.0})]:
        out = merge_state_dicts(method, base, models, params, stats=fishers)
        for k in base:
            assert torch.allclose(out[k], models[0][k], atol=1e-5), (method, params, k)


def _quadratic_setup(seed=1):
    g = torch.Generator().manual_seed(seed)
    d = 6
    H = [torch.rand(d, generator=g) * 4 + 0.2 for _ in range(2)]
    m = [torch.randn(d, generator=g) for _ in range(2)]
    return d, H, m


def _minimise(loss_fn, d):
    x = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


def test_fisher_merging_of_quadratics_is_the_weighted_sum_minimiser():
    d, H, m = _quadratic_setup()
    alphas = [0.3, 0.7]
    out = merge_state_dicts("fisher", None, [{"w": mi} for mi in m], {"epsilon": 0.0},
                            [{"weight": a} for a in alphas], stats=[FisherStats({"w": h}) for h in H])["w"]
    truth = _minimise(lambda x: sum(a * 0.5 * (h.double() * (x - mi.double()) ** 2).sum()
                                    for a, h, mi in zip(alphas, H, m)), d)
    assert torch.allclose(out.double(), truth, atol=1e-5)


def test_diagonal_posterior_with_prior_is_the_map_of_the_weighted_problem():
    d, H, m = _quadratic_setup(2)
    theta0 = torch.randn(d)
    rel = 0.5
    p0 = rel * float(sum(h.mean() for h in H) / 2)
    # each expert = the posterior mean of prior + its own quadratic likelihood
    thetas = [(p0 * theta0 + h * mi) / (p0 + h) for h, mi in zip(H, m)]
    alphas = [1.0, 0.4]
    out = merge_state_dicts("posterior", {"w": theta0}, [{"w": t} for t in thetas],
                            {"family": "diagonal", "prior_precision": rel}, [{"weight": a} for a in alphas],
                            stats=[FisherStats({"w": h}) for h in H])["w"]
    truth = _minimise(lambda x: sum(a * 0.5 * (h.double() * (x - mi.double()) ** 2).sum()
                                    for a, h, mi in zip(alphas, H, m))
                      + 0.5 * p0 * ((x - theta0.double()) ** 2).sum(), d)
    assert torch.allclose(out.double(), truth, atol=1e-5)


def _mixture_pass(base, models, fishers, weights, tasks):
    names = list(base)
    return ModelPass(names, lambda n: ([m[n].clone() for m in models], base[n].clone()),
                     lambda n: {"weight": weights, "task": tasks}, [str(i) for i in range(len(models))],
                     stats=lambda n: [f.lookup(n) for f in fishers])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_never_lowers_the_objective(seed):
    base, models, fishers = _family(n_models=5, seed=seed, dtype=torch.float64)  # float64: exact monotonicity
    tasks = ["a", "a", "b", "b", "b"]
    st = _mixture_pass(base, models, fishers, [0.6, 0.6, 0.4, 0.4, 0.4], tasks)
    state = _mixture_prepare(st, {"prior_precision": 0.1, "em_steps": 8, "family": "mixture"})
    h = state.history
    assert len(h) == 9
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(h, h[1:])), h
    r = state.resp
    assert torch.allclose(r[:2].sum(), torch.tensor(1.0, dtype=r.dtype)) and torch.allclose(r[2:].sum(), torch.tensor(1.0, dtype=r.dtype))


def test_mixture_components_of_one_task_need_one_weight():
    base, models, fishers = _family(n_models=2)
    with pytest.raises(ConfigError, match="same weight"):
        merge_state_dicts("posterior", base, models, {"family": "mixture"},
                          [{"weight": 1.0, "task": "a"}, {"weight": 0.5, "task": "a"}], stats=fishers)


def test_fisher_needs_fisher_statistics_not_grams():
    from submerge.stats.gram import CalibrationStats

    base, models, _ = _family(n_models=2)
    with pytest.raises(ConfigError, match="fisher statistics"):
        merge_state_dicts("fisher", None, models, stats=[CalibrationStats({}), CalibrationStats({})])


def test_true_and_empirical_fisher_of_softmax_regression_match_closed_form():
    torch.manual_seed(0)
    C, d, n = 3, 4, 20
    lin = nn.Linear(d, C, bias=False)
    X = torch.randn(n, d)
    y = torch.randint(0, C, (n,))
    fs = fisher_diagonal(lin, list(X), lambda mod, x: torch.log_softmax(mod(x), -1), kind="true", progress=False)
    fe = fisher_diagonal(lin, list(X), lambda mod, x: torch.log_softmax(mod(x), -1), kind="empirical",
                         labels=y.tolist(), progress=False)
    with torch.no_grad():
        P = torch.softmax(X @ lin.weight.T, -1)  # [n, C]
        true = torch.zeros(C, d)
        emp = torch.zeros(C, d)
        for c in range(C):  # grad of log p_c wrt W = (e_c - p) x^T
            g = ((torch.eye(C)[c] - P)[:, :, None] * X[:, None, :]) ** 2  # [n, C, d]
            true += (P[:, c, None, None] * g).sum(0)
            emp += g[y == c].sum(0)
    assert torch.allclose(fs.tensors["weight"], true / n, atol=1e-6)
    assert torch.allclose(fe.tensors["weight"], emp / n, atol=1e-6)
    assert all(p.requires_grad for p in lin.parameters())  # flags restored
    # the sampled Fisher is an unbiased estimate of the true one: many draws per input approach it
    many = fisher_diagonal(lin, list(X) * 400, lambda mod, x: torch.log_softmax(mod(x), -1), kind="sampled",
                           progress=False)
    assert torch.allclose(many.tensors["weight"], true / n, rtol=0.1, atol=2e-3)


class _Bag(nn.Module):
    """Token ids -> embedding lookup (with a padding row) -> mean -> class logits; ``tied``: the logits also
    read the embedding table (a weight used beside its lookup)."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(50, 6, padding_idx=0)
        self.out = nn.Linear(6, 3)
        self.tied = tied

    def forward(self, ids):
        h = self.emb(ids).mean(0)
        logits = self.out(h)
        if self.tied:
            logits = logits + (self.emb.weight[:3] @ h)
        return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("tied", [False, True])
def test_fisher_of_an_embedding_table_touches_its_rows_and_equals_the_dense_gradient(tied):
    """Embedding tables take a row-sparse gradient in the Fisher (only the looked-up rows are squared and
    added): bit for bit the dense computation, with repeated tokens and the padding row in the inputs."""
    torch.manual_seed(0)
    model = _Bag(tied)
    examples = [torch.tensor([5, 7, 5, 0, 12, 5]), torch.tensor([3, 3, 49]), torch.tensor([0, 0, 7])]
    got = fisher_diagonal(model, examples, lambda m, x: m(x), kind="true", progress=False)
    assert not model.emb.sparse  # switched back
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in examples:
        lp = model(x)
        for c, w in enumerate(lp.detach().exp().tolist()):
            grads = torch.autograd.grad(lp[c], list(model.parameters()), retain_graph=True)
            for (n, _), g in zip(model.named_parameters(), grads):
                want[n].addcmul_(g, g, value=w)
    for n in want:
        assert torch.equal(got.tensors[n], want[n].div_(len(examples))), n
    untouched = [r for r in range(50) if r not in (3, 5, 7, 12, 49)]
    if not tied:
        assert torch.equal(got.tensors["emb.weight"][untouched], torch.zeros(len(untouched), 6))


def test_cli_fisher_then_yaml_posterior_merge(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "bad", "fine", "awful", "movie", "plot", "the", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"text": f"the {words[i % 4]} movie", "label": i % 2} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runner = CliRunner()
    from submerge.cli import main

    fis = []
    for i in range(2):
        m = BertForSequenceClassification(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        m.save_pretrained(tmp_path / f"ft{i}")
        tok.save_pretrained(tmp_path / f"ft{i}")
        args = ["fisher", str(tmp_path / f"ft{i}"), str(tmp_path / "data.jsonl"), str(tmp_path / f"fisher{i}"),
                "-n", "8", "-q"] + (["--kind", "empirical", "--label-field", "label"] if i else [])
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
        fis.append(tmp_path / f"fisher{i}")
    f0 = FisherReader(fis[0])
    assert f0.info["kind"] == "true" and f0.info["n_examples"] == 8
    assert (f0.lookup("classifier.weight") > 0).any()
    config = {"merge_method": "posterior", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / f"ft{i}"), "calibration": str(fis[i]),
                          "parameters": {"weight": w}} for i, w in enumerate([0.7, 0.3])],
              "parameters": {"family": "diagonal"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    res = runner.invoke(main, ["merge", str(tmp_path / "p.yaml"), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    from conftest import load_dir

    got = load_dir(tmp_path / "out")
    want = merge_state_dicts("posterior", {k: v for k, v in base.state_dict().items()},
                             [dict(BertForSequenceClassification.from_pretrained(tmp_path / f"ft{i}").state_dict())
                              for i in range(2)], {"family": "diagonal"}, [{"weight": 0.7}, {"weight": 0.3}],
                             stats=[str(f) for f in fis])
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=1e-6), k
    # a Gram calibration folder where a Fisher is needed: a clear error before merging
    config["models"][0]["calibration"] = str(tmp_path / "nope")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    res = runner.invoke(main, ["merge", str(tmp_path / "bad.yaml"), str(tmp_path / "out2"), "-q"])
    assert res.exit_code != 0 and "nope" in res.output and not (tmp_path / "out2").exists()
