"""ESM++ experts and the routing runtime (submerge.routing) on tiny models built here."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from submerge.api import merge_state_dicts
from submerge.stats.gram import collect_stats
from submerge.cli import main
from submerge.errors import ConfigError
from submerge.routing import ExpertSet, LayerExperts, RoutingRecorder, attach, build_experts, load, save

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "far", "a", "big", "small", "red", "blue", "fast"]
TEXTS = [" ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(2 + i % 7)) for i in range(48)]


def _perturb(model: nn.Module, seed: int, biases: bool = True) -> None:
    """A fine-tune that changes only the linear layers (weights, and biases if asked)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if w is not None and w.dim() == 2 and "embeddings" not in name and "wte" not in name and "wpe" not in name:
                w.add_(0.2 * torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
                if biases and getattr(mod, "bias", None) is not None:
                    mod.bias.add_(0.05 * torch.randn(mod.bias.shape, generator=g))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("esmpp")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    fts = []
    for i in range(3):
        m = BertModel(cfg).eval()
        m.load_state_dict(base.state_dict())
        _perturb(m, 10 + i)
        m.save_pretrained(root / f"ft{i}")
        tok.save_pretrained(root / f"ft{i}")
        fts.append(m)
    batch = dict(tok(TEXTS[:24], padding=True, return_tensors="pt"))
    stats = [collect_stats(m, [batch], progress=False, info={"task": f"t{i}"}) for i, m in enumerate(fts)]
    return root, tok, base, fts, stats


def _sd(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _static(bert, method="task_arithmetic", params=None):
    root, tok, base, fts, stats = bert
    from transformers import BertModel

    params = params or {"weight": 1 / 3}
    merged = merge_state_dicts(method, _sd(base), [_sd(m) for m in fts], params,
                               stats=stats if method.startswith("esm") else None)
    model = BertModel(base.config).eval()
    model.load_state_dict(merged)
    return model, merged


def test_oracle_full_rank_reproduces_each_finetuned_model(bert):
    root, tok, base, fts, stats = bert
    model, merged = _static(bert)
    experts = build_experts(merged, [_sd(m) for m in fts], stats, rank=64, routed="all")
    assert len(experts.layers) == 12  # six linears x two layers
    router = attach(model, experts)
    batch = dict(tok(TEXTS[24:32], padding=True, return_tensors="pt"))
    static = None
    for t, ft in enumerate(fts):
        with router.oracle([t] * 8):
            got = _run(model, batch)
        want = _run(ft, batch)
        assert torch.allclose(got, want, atol=1e-4), (t, (got - want).abs().max())
    with router.mode("base"):
        static = _run(model, batch)
    assert not torch.allclose(static, _run(fts[0], batch), atol=1e-3)
    router.detach()
    assert torch.equal(_run(model, batch), static)  # detach restores the static model


def test_low_rank_expert_is_the_essential_projection_of_the_residual(bert):
    root, tok, base, fts, stats = bert
    _, merged = _static(bert)
    name = "encoder.layer.1.intermediate.dense"
    experts = build_experts(merged, [_sd(m) for m in fts], stats, rank=4, routed="mlp_in", bias=False)
    e = experts.layers[name]
    assert e.B.shape == (3, 48, 4) and e.A.shape == (3, 4, 32) and e.bias is None
    for t in range(3):
        B = e.B[t].double()
        assert torch.allclose(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-5)  # orthonormal directions
        delta = _sd(fts[t])[name + ".weight"].double() - merged[name + ".weight"].double()
        assert torch.allclose(e.A[t].double(), B.T @ delta, atol=1e-5)
        st = stats[t].lookup(name + ".weight")
        assert torch.allclose(e.prototypes[t].double(), st.mean.double(), atol=1e-6)
        # the kept output-shift energy is the top-4 eigenvalue sum of delta G delta^T
        cov = delta @ st.gram @ delta.T
        kept = torch.trace(B.T @ cov @ B)
        assert torch.isclose(kept, torch.linalg.eigvalsh(cov)[-4:].sum(), rtol=1e-6)
    # prototypes from other statistics (e.g. collected in the merged model): only the prototypes change
    other = build_experts(merged, [_sd(m) for m in fts], stats, rank=4, routed="mlp_in", bias=False,
                          prototype_stats=stats[::-1])
    assert torch.equal(other.layers[name].A, e.A)
    assert torch.allclose(other.layers[name].prototypes[0], stats[2].lookup(name + ".weight").mean.float())


def _toy_layer(prototypes: torch.Tensor, d_out: int = 3, rank: int = 2):
    T, d_in = prototypes.shape
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(d_in, d_out)
    e = LayerExperts(torch.randn(T, d_out, rank, generator=g), torch.randn(T, rank, d_in, generator=g),
                     prototypes.clone(), torch.randn(T, d_out, generator=g))
    return base, ExpertSet([f"t{i}" for i in range(T)], rank, {"lin": e})


class _Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x, attention_mask=None):
        return self.lin(x)


def test_routing_picks_the_expert_whose_prototype_the_input_matches():
    protos = torch.eye(4)[:3] * 5.0  # three tasks, orthogonal prototypes in d_in=4
    base, experts = _toy_layer(protos)
    model = _Wrap(base)
    router = attach(model, experts)
    e = experts.layers["lin"]
    x = torch.stack([protos[2] + 0.1 * torch.randn(5, 4), protos[0] + 0.1 * torch.randn(5, 4)])  # [2, 5, 4]
    with router.recording() as rec:
        y = model(x)
    assert rec["lin"][0].tolist() == [2, 0]
    for b, t in enumerate([2, 0]):
        want = base(x[b]) + x[b] @ (e.B[t] @ e.A[t]).T + e.bias[t]
        assert torch.allclose(y[b], want, atol=1e-5)
    # top-k soft routing with k = T and a huge temperature = the average of all experts
    router.set(top_k=3, temperature=1e6)
    y = model(x[:1])
    avg = sum(x[0] @ (e.B[t] @ e.A[t]).T + e.bias[t] for t in range(3)) / 3
    assert torch.allclose(y[0], base(x[0]) + avg, atol=1e-4)
    # 2-D inputs route per row
    router.set(top_k=1)
    with router.recording() as rec:
        model(torch.stack([protos[1], protos[2]]))
    assert rec["lin"][0].tolist() == [1, 2]


def test_padding_does_not_change_routing():
    protos = torch.eye(4)[:2] * 3.0
    base, experts = _toy_layer(protos)
    model = _Wrap(base)
    router = attach(model, experts)
    real = protos[0] + 0.05 * torch.randn(3, 4)
    pad = protos[1].expand(6, 4) * 4  # padding that looks like task 1 (would flip an unmasked mean)
    x = torch.cat([real, pad])[None]
    mask = torch.tensor([[1] * 3 + [0] * 6])
    with router.recording() as rec:
        y_pad = model(x, attention_mask=mask)
        y_one = model(real[None], attention_mask=torch.ones(1, 3, dtype=torch.long))
        model(x)  # no mask: padding counted, routes to task 1
    assert [r.item() for r in rec["lin"]] == [0, 0, 1]
    assert torch.allclose(y_pad[0, :3], y_one[0], atol=1e-6)


def test_global_routing_follows_the_first_layer_and_recorder_counts(bert):
    root, tok, base, fts, stats = bert
    model, merged = _static(bert)
    experts = build_experts(merged, [_sd(m) for m in fts], stats, rank=8)
    assert all(k.endswith(("query", "key", "value", "intermediate.dense")) for k in experts.layers)
    router = attach(model, experts, global_routing=True)
    batch = dict(tok(TEXTS[:6], padding=True, return_tensors="pt"))
    rec = RoutingRecorder(router)
    with rec.batch(torch.tensor([0, 0, 1, 1, 2, 2])):
        _run(model, batch)
    report = rec.report()
    assert report.confusion.sum() == 6 * len(experts.layers)
    per_layer = list(report.per_layer.values())
    assert len(set(per_layer)) == 1  # one decision shared by every layer
    assert 0.0 <= report.accuracy <= 1.0 and "| true" in report.markdown()
    with pytest.raises(ConfigError, match="task ids"):
        with router.oracle([5]):
            pass


def test_save_load_round_trip_and_plain_transformers_fallback(bert, tmp_path):
    from transformers import AutoModel

    root, tok, base, fts, stats = bert
    model, merged = _static(bert)
    experts = build_experts(merged, [_sd(m) for m in fts], stats, rank=8, routed="all")
    attach(model, experts, top_k=2)
    batch = dict(tok(TEXTS[30:40], padding=True, return_tensors="pt"))
    before = _run(model, batch)
    save(tmp_path / "pp", model, experts)
    assert (tmp_path / "pp" / "experts.safetensors").exists() and model.submerge_router is not None
    assert torch.equal(_run(model, batch), before)  # still attached after saving
    loaded = load(tmp_path / "pp", top_k=2)
    assert torch.equal(_run(loaded, batch), before)
    plain = AutoModel.from_pretrained(tmp_path / "pp").eval()  # ignores the experts: the static merge
    with loaded.submerge_router.mode("base"):
        assert torch.allclose(_run(plain, batch), _run(loaded, batch), atol=1e-6)
    with pytest.raises(ConfigError, match="already exists"):
        save(tmp_path / "pp", loaded, experts)


def test_yaml_esm_pp_writes_experts_that_load_and_reproduce_with_oracle(bert, tmp_path):
    """submerge calibrate -> submerge merge (esm_pp, full rank, all linears) -> routing.load: oracle = expert."""
    root, tok, base, fts, _ = bert
    runner = CliRunner()
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    cal = []
    for i in range(3):
        out = tmp_path / f"stats{i}"
        res = runner.invoke(main, ["calibrate", str(root / f"ft{i}"), str(tmp_path / "texts.txt"), str(out),
                                   "-n", "32", "--task", f"t{i}", "-q"])
        assert res.exit_code == 0, res.output
        cal.append(out)
    config = {"merge_method": "esm_pp", "base_model": str(root / "base"),
              "models": [{"model": str(root / f"ft{i}"), "calibration": str(c)} for i, c in enumerate(cal)],
              "parameters": {"alpha": 0.8, "rank": 48, "routed": "all"}}
    (tmp_path / "pp.yaml").write_text(yaml.safe_dump(config))
    res = runner.invoke(main, ["merge", str(tmp_path / "pp.yaml"), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "experts.json").read_text())
    assert manifest["tasks"] == ["ft0", "ft1", "ft2"] and len(manifest["layers"]) == 12
    assert "ESM++ experts" in (tmp_path / "out" / "README.md").read_text()
    model = load(tmp_path / "out")
    # the static part equals the esm merge with the same parameters
    esm_state = merge_state_dicts("esm", _sd(base), [_sd(m) for m in fts], {"alpha": 0.8}, stats=[str(c) for c in cal])
    plain = {k: v for k, v in model.state_dict().items() if ".B" not in k and ".A" not in k}
    for k, v in esm_state.items():
        key = k if k in plain else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.allclose(plain[key], v, atol=1e-6), k
    batch = dict(tok(TEXTS[:8], padding=True, return_tensors="pt"))
    for t, ft in enumerate(fts):
        with model.submerge_router.oracle(torch.full((8,), t)):
            assert torch.allclose(_run(model, batch), _run(ft, batch), atol=1e-4)


def test_conv1d_layout_gpt2_oracle_full_rank():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(1)
    base = GPT2Model(cfg).eval()
    fts = []
    for i in range(2):
        m = GPT2Model(cfg).eval()
        m.load_state_dict(base.state_dict())
        _perturb(m, 20 + i)
        fts.append(m)
    ids = torch.randint(0, 50, (6, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stats = [collect_stats(m, [batch], progress=False) for m in fts]
    merged = merge_state_dicts("task_arithmetic", _sd(base), [_sd(m) for m in fts], {"weight": 0.5})
    model = GPT2Model(cfg).eval()
    model.load_state_dict(merged)
    experts = build_experts(merged, [_sd(m) for m in fts], stats, rank=64, routed="all")
    assert {e.layout for e in experts.layers.values()} == {"in_out"}
    router = attach(model, experts)
    for t, ft in enumerate(fts):
        with router.oracle([t] * 6):
            assert torch.allclose(_run(model, batch), _run(ft, batch), atol=1e-4)


def test_actionable_errors(bert):
    root, tok, base, fts, stats = bert
    model, merged = _static(bert)
    with pytest.raises(ConfigError, match="routed"):
        build_experts(merged, [_sd(m) for m in fts], stats, routed="qkv,mlp_up")
    with pytest.raises(ConfigError, match="calibration sources"):
        build_experts(merged, [_sd(m) for m in fts], stats[:2])
    experts = build_experts(merged, [_sd(m) for m in fts], stats, rank=4)
    attach(model, experts)
    with pytest.raises(ConfigError, match="already has"):
        attach(model, experts)
    with pytest.raises(ConfigError, match="oracle routing needs"):
        model.submerge_router.set(mode="oracle")
        _run(model, dict(tok(TEXTS[:2], padding=True, return_tensors="pt")))
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24))
    with pytest.raises(ConfigError, match="experts are"):
        attach(other, experts)


def test_a_routing_mask_routes_from_the_prompt_only():
    """A decoder scored on a gold answer routes each sequence from its prompt: tokens outside the routing mask
    (the answer) do not move the decision, the attention mask still being the whole sequence."""
    from submerge.routing.experts import ExpertSet, LayerExperts
    from submerge.routing.runtime import attach

    torch.manual_seed(0)
    d = 8
    model = torch.nn.Sequential(torch.nn.Linear(d, d))
    protos = torch.eye(d)[:2]  # task 0 points along e0, task 1 along e1
    experts = ExpertSet(["a", "b"], 1, {"0": LayerExperts(torch.randn(2, d, 1), torch.randn(2, 1, d), protos)})
    router = attach(model, experts)
    x = torch.zeros(1, 6, d)
    x[0, :2, 0] = 1.0   # the prompt: task a
    x[0, 2:, 1] = 5.0   # the answer, longer and louder: task b
    with router.recording() as rec:
        model(x)
    assert rec["0"][0].tolist() == [1]  # pooled over everything: the answer decides
    with router.routing_mask(torch.tensor([[1, 1, 0, 0, 0, 0]])), router.recording() as rec:
        model(x)
    assert rec["0"][0].tolist() == [0]  # pooled over the prompt
    router.detach()


def test_per_token_routing_adds_each_tokens_own_expert():
    """per_token=True: token l gets the expert its own input is closest to; with every token agreeing it is the
    per-sample result; records count one decision per kept token."""
    from submerge.routing.experts import ExpertSet, LayerExperts
    from submerge.routing.runtime import attach

    torch.manual_seed(1)
    d, T, r = 8, 3, 2
    base = torch.nn.Linear(d, d)
    A, B = torch.randn(T, r, d), torch.randn(T, d, r)
    experts = ExpertSet(["a", "b", "c"], r, {"0": LayerExperts(B, A, torch.eye(d)[:T], bias=torch.randn(T, d))})
    model = torch.nn.Sequential(base)
    x = torch.zeros(2, 4, d)
    owner = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0]])
    for b in range(2):
        for l in range(4):
            x[b, l, owner[b, l]] = 1.0 + l
    router = attach(model, experts, per_token=True)
    with router.recording() as rec:
        got = model(x)
    want = base(x) + torch.stack([torch.stack([x[b, l] @ (B[t] @ A[t]).T + experts.layers["0"].bias[t]
                                               for l, t in enumerate(owner[b].tolist())]) for b in range(2)])
    torch.testing.assert_close(got, want)
    assert torch.cat(rec["0"]).tolist() == owner.reshape(-1).tolist()
    with router.routing_mask(torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])), router.recording() as rec:
        model(x)
    assert torch.cat(rec["0"]).tolist() == [0, 1, 2]
    same = torch.zeros(1, 4, d)
    same[0, :, 1] = torch.arange(1.0, 5.0)
    per_token = model(same)
    router.set(per_token=False)
    torch.testing.assert_close(model(same), per_token)  # every token agrees: the per-sample output
    with pytest.raises(Exception, match="exclude each other"):
        router.set(per_token=True, global_routing=True)
    router.detach()
