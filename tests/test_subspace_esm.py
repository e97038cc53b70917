"""Defining properties of TSV-M, Iso-C, Iso-CTS, ESM and RegMean on small tensors, and calibration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from submerge.api import merge_state_dicts
from submerge.stats.gram import CalibrationStats, LayerStats, collect_stats, match_layer
from submerge.stats.load import load_stats
from submerge.layers import layer_role, parse_role_patterns
from submerge.methods.esm import ESMState, esm_merge_matrix
from submerge.stats.gram import essential_subspace
from submerge.methods.subspace import iso_c_merge, iso_cts_merge, iso_cts_split, polar, truncated_svd, tsv_merge
from submerge.methods import list_methods
from submerge.search import AffinePath, affine_path, search_alpha


def orth(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def planted(T: int = 4, d_out: int = 32, d_in: int = 24, r: int = 3, seed: int = 0):
    """T updates whose row and column spaces are mutually orthogonal across tasks."""
    g = torch.Generator().manual_seed(seed)
    U, V = orth(d_out, T * r, g), orth(d_in, T * r, g)
    deltas = []
    for t in range(T):
        s = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
        deltas.append((U[:, t * r:(t + 1) * r] * s) @ V[:, t * r:(t + 1) * r].T)
    return deltas, U, V


# ------------------------------------------------------------------------------ kernels
def test_polar_factor_is_orthonormal_and_closest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 7, generator=g, dtype=torch.float64)
    p, s = polar(x)
    assert torch.allclose(p.T @ p, torch.eye(7, dtype=torch.float64), atol=1e-12)
    # polar factor = argmin ||x - Q|| over Q with orthonormal columns: beats a random orthonormal Q
    q = orth(20, 7, g)
    assert torch.linalg.norm(x - p) <= torch.linalg.norm(x - q)
    assert torch.allclose(s, torch.linalg.svdvals(x))


def test_tsv_reconstructs_orthogonal_tasks_exactly():
    deltas, _, _ = planted(T=4, d_out=32, d_in=24, r=3)
    merged = tsv_merge(deltas, rank=3)
    assert torch.allclose(merged, sum(deltas), atol=1e-10)


def test_iso_c_has_a_flat_spectrum_with_the_same_singular_vectors():
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(16, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    out = iso_c_merge(deltas)
    s = torch.linalg.svdvals(out)
    total = sum(deltas)
    assert torch.allclose(s, torch.full_like(s, float(torch.linalg.svdvals(total).mean())), atol=1e-10)
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    assert torch.allclose(out, s.mean() * u @ vh, atol=1e-10)


def test_iso_cts_split_and_flat_spectrum():
    assert iso_cts_split(384, 8, 0.8) == (304, 10)  # as the official code: 384*0.8 -> 307 -> 304 + 8*10
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(20, 20, generator=g, dtype=torch.float64) for _ in range(4)]
    out = iso_cts_merge(deltas, 0.8)
    s = torch.linalg.svdvals(out)
    assert torch.allclose(s, s.mean().expand_as(s), atol=1e-8)
    # common_space_fraction = 1: exactly Iso-C
    assert torch.allclose(iso_cts_merge(deltas, 1.0), iso_c_merge(deltas), atol=1e-10)


# ------------------------------------------------------------------------------ ESM
def test_eigen_path_agrees_with_explicit_svd_of_feature_shift():
    g = torch.Generator().manual_seed(5)
    for d_out, d_in in [(12, 20), (40, 16)]:  # both branches of the Gram trick
        x = torch.randn(300, d_in, generator=g, dtype=torch.float64)
        dw = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        e, lam = essential_subspace(dw, x.T @ x, 300, 6)
        _, s, vh = torch.linalg.svd(x @ dw.T, full_matrices=False)
        assert torch.allclose(lam, s[:6] ** 2 / 299, rtol=1e-9)
        # same subspace: |<e_i, v_i>| = 1 for distinct eigenvalues
        assert torch.allclose((e * vh[:6].T).sum(0).abs(), torch.ones(6, dtype=torch.float64), atol=1e-8)


def test_projection_error_on_task_inputs_is_the_sum_of_discarded_eigenvalues():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    dw = torch.randn(10, 16, generator=g, dtype=torch.float64)
    e_all, lam_all = essential_subspace(dw, x.T @ x, 200, 10)
    for r in (2, 5, 9):
        e = e_all[:, :r]
        approx = e @ (e.T @ dw)
        err = torch.linalg.norm(x @ (dw - approx).T) ** 2 / 199
        assert math.isclose(float(err), float(lam_all[r:].sum()), rel_tol=1e-8)


def test_esm_one_task_full_rank_returns_the_update_times_its_scalings():
    g = torch.Generator().manual_seed(7)
    dw = torch.randn(8, 12, generator=g, dtype=torch.float64)
    x = torch.randn(100, 12, generator=g, dtype=torch.float64)
    # no re-weighting, no polarisation, TSV fusion: exactly the update
    out = esm_merge_matrix([dw], [x.T @ x], [100], eig_power=0, task_power=0, column_power=0, factor=1.0,
                           fusion="tsv")
    assert torch.allclose(out, dw, atol=1e-10)
    # eigenvalue weights s_i: each essential component multiplied by s_i^2
    e, lam = essential_subspace(dw, x.T @ x, 100, 8)
    s = (lam / lam.mean()) ** 0.15
    s = s / s.mean()
    out = esm_merge_matrix([dw], [x.T @ x], [100], eig_power=0.15, task_power=0, column_power=0, factor=1.0,
                           fusion="tsv")
    assert torch.allclose(out, (e * s ** 2) @ (e.T @ dw), atol=1e-10)
    # polar fusion (the authors'): polar(E s) mean(S1) polar(s C) mean(S2) with E full rank
    out = esm_merge_matrix([dw], [x.T @ x], [100], eig_power=0, task_power=0, column_power=0, factor=2.0)
    e_o, s1 = polar(e)
    c_o, s2 = polar(e.T @ dw)
    assert torch.allclose(out, 2 * (e_o * s1.mean()) @ (c_o * s2.mean()), atol=1e-10)


def test_esm_reconstructs_orthogonal_tasks_on_their_own_inputs():
    T, r = 4, 3
    deltas, U, V = planted(T=T, d_out=12, d_in=24, r=r)
    g = torch.Generator().manual_seed(8)
    grams, xs = [], []
    for t in range(T):  # task t's inputs live in its own input subspace (plus a little of the rest)
        x = torch.randn(400, r, generator=g, dtype=torch.float64) @ V[:, t * r:(t + 1) * r].T
        x = x + 1e-3 * torch.randn(400, 24, generator=g, dtype=torch.float64)
        xs.append(x)
        grams.append(x.T @ x)
    out = esm_merge_matrix(deltas, grams, [400] * T, eig_power=0, task_power=0, column_power=0, factor=1.0,
                           fusion="tsv")
    for t in range(T):
        rel = torch.linalg.norm(xs[t] @ (out - deltas[t]).T) / torch.linalg.norm(xs[t] @ deltas[t].T)
        assert rel < 1e-2


def test_role_inference_for_bert_llama_gpt2_clip():
    rules = parse_role_patterns("")
    cases = {
        "bert.encoder.layer.3.attention.self.query.weight": "q",
        "encoder.layer.0.attention.output.dense.weight": "attn_out",
        "encoder.layer.0.intermediate.dense.weight": "mlp_in",
        "encoder.layer.0.output.dense.weight": "mlp_out",
        "model.layers.1.self_attn.v_proj.weight": "v",
        "model.layers.1.self_attn.o_proj.weight": "attn_out",
        "model.layers.1.mlp.gate_proj.weight": "mlp_in",
        "model.layers.1.mlp.down_proj.weight": "mlp_out",
        "transformer.h.0.attn.c_attn.weight": "qkv",
        "transformer.h.0.attn.c_proj.weight": "attn_out",
        "transformer.h.0.mlp.c_proj.weight": "mlp_out",
        "visual.transformer.resblocks.2.attn.in_proj_weight": "qkv",
        "vision_model.encoder.layers.0.mlp.fc2.weight": "mlp_out",
    }
    for name, role in cases.items():
        assert layer_role(name, rules)[0] == role, name
    assert layer_role("model.embed_tokens.weight", rules) is None
    custom = parse_role_patterns(r"mlp_in=my_ffn_a\.weight$")
    assert layer_role("blocks.0.my_ffn_a.weight", custom)[0] == "mlp_in"


# ------------------------------------------------------------------------------ whole models
class Tiny(nn.Module):
    """Two blocks of q/k/v + out + MLP linears, BERT-like names, token inputs [B, L, d]."""

    def __init__(self, d: int = 16, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.layer = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.query, blk.key, blk.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            blk.attn_out = nn.Linear(d, d)
            blk.intermediate, blk.output = nn.Linear(d, hidden), nn.Linear(hidden, d)
            self.layer.append(blk)

    def forward(self, x, attention_mask=None):
        for b in self.layer:
            a = torch.softmax(b.query(x) @ b.key(x).transpose(1, 2), -1) @ b.value(x)
            x = x + b.attn_out(a)
            x = x + b.output(torch.relu(b.intermediate(x)))
        return x


def _tiny_family(T: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    base = Tiny()
    experts = []
    for _ in range(T):
        m = Tiny()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        experts.append(m)
    return base, experts


def _role_rules():
    return ("q=query\\.weight$;k=key\\.weight$;v=value\\.weight$;attn_out=attn_out\\.weight$;"
            "mlp_in=intermediate\\.weight$;mlp_out=output\\.weight$")


def test_collect_stats_masks_padding_and_shares_identical_inputs():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    st = collect_stats(model, [{"x": x, "attention_mask": mask}], progress=False)
    q = st.get("layer.0.query")
    rows = x[mask.bool()].double()
    assert q.count == 8
    assert torch.allclose(q.gram, rows.T @ rows)
    assert torch.allclose(q.mean, rows.mean(0))
    # key/value see the very same tensor as query: recorded as aliases, same statistics
    assert st.aliases["layer.0.key"] == "layer.0.query" and st.aliases["layer.0.value"] == "layer.0.query"
    # padding values do not change anything
    x2 = x.clone()
    x2[0, 3:] = 1e3
    st2 = collect_stats(model, [{"x": x2, "attention_mask": mask}], progress=False)
    assert torch.allclose(st2.get("layer.0.query").gram, q.gram)
    # two batches accumulate
    st3 = collect_stats(model, [{"x": x[:1], "attention_mask": mask[:1]}, {"x": x[1:], "attention_mask": mask[1:]}],
                        progress=False)
    assert torch.allclose(st3.get("layer.0.query").gram, q.gram)


def test_collect_stats_stops_at_the_output_head_and_keeps_no_input_alive():
    """A causal LM's statistics are the same whether or not its forward stops after lm_head's input is counted,
    and the logits are never computed; an input that dies before another layer runs is never taken for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    batch = {"input_ids": torch.randint(0, 97, (3, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3,
                                                                                          [1] * 4 + [0] * 5])}
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    st = collect_stats(model, [batch, batch], progress=False)
    assert head_calls == []  # stopped before the vocabulary projection, on every batch
    real = model.get_output_embeddings
    model.get_output_embeddings = lambda: None  # the whole forward, as for a model without a head
    whole = collect_stats(model, [batch, batch], progress=False)
    model.get_output_embeddings = real
    assert len(head_calls) == 2
    assert st.aliases == whole.aliases and set(st.layers) == set(whole.layers)
    assert st.aliases["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert st.aliases["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    for name, layer in whole.layers.items():
        assert torch.equal(st.layers[name].gram, layer.gram) and st.layers[name].count == layer.count
    assert st.get("lm_head").count == 9 + 6 + 4 + 9 + 6 + 4  # the head's input counted, padding left out
    assert model(**batch).logits.shape == (3, 9, 97)  # the hooks are gone

    class TwoTemps(nn.Module):  # each layer's input is a temporary, freed before the next one is made
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x * 2.0).sum() + self.b(x * 3.0).sum()

    x = torch.randn(5, 8)
    st = collect_stats(TwoTemps(), [x], progress=False)
    assert st.aliases == {}
    assert torch.allclose(st.get("b").gram, (3.0 * x).double().T @ (3.0 * x).double())


def test_stats_save_load_and_suffix_lookup(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    st = collect_stats(model, [{"x": torch.randn(2, 4, 16)}], progress=False, info={"task": "t"})
    st.save(tmp_path / "s")
    back = load_stats(tmp_path / "s")
    assert back.info["task"] == "t"
    a, b = st.lookup("layer.1.intermediate.weight"), back.lookup("model.layer.1.intermediate.weight")
    assert torch.equal(a.gram, b.gram) and a.count == b.count
    assert back.lookup("layer.1.value.weight") is not None  # via alias
    assert match_layer("x.layer.1.query.bias", back.names()) is None
    with pytest.raises(Exception, match="already exists"):
        st.save(tmp_path / "s")


def _stats_for(experts, n=64):
    out = []
    for i, m in enumerate(experts):
        g = torch.Generator().manual_seed(100 + i)
        out.append(collect_stats(m, [{"x": torch.randn(n, 6, 16, generator=g)}], progress=False))
    return out


@pytest.mark.parametrize("params", [
    {}, {"recipe": "vit"}, {"recipe": "glue"}, {"recipe": "vit", "fusion": "tsv"}, {"recipe": "vit", "alpha_scope": "all"},
    {"recipe": "vit", "stack_qkv": False}, {"recipe": "vit", "esd_roles": "all", "layer_power": 0.0},
    {"rank_tol": 1e-6}, {"recipe": "glue", "rank_tol": 1e-6},
])
def test_esm_runs_on_a_module_and_is_affine_in_alpha(params):
    base, experts = _tiny_family()
    stats = _stats_for(experts)
    sd0 = base.state_dict()
    sds = [m.state_dict() for m in experts]
    p = {**params, "role_patterns": _role_rules()}
    outs = {a: merge_state_dicts("esm", sd0, sds, {**p, "alpha": a}, stats=stats) for a in (0.0, 1.0, 2.5)}
    for k in sd0:
        assert torch.isfinite(outs[1.0][k]).all()
        pred = outs[0.0][k] + 2.5 * (outs[1.0][k] - outs[0.0][k])
        assert torch.allclose(outs[2.5][k], pred, atol=1e-5), k
    changed = [k for k in sd0 if not torch.equal(outs[1.0][k], sd0[k])]
    assert "layer.0.query.weight" in changed and "layer.1.output.weight" in changed


def test_esm_falls_back_to_tsv_without_stats(caplog):
    base, experts = _tiny_family()
    stats = _stats_for(experts)
    stats[1] = CalibrationStats({}, {}, {})  # one model without statistics
    sd0, sds = base.state_dict(), [m.state_dict() for m in experts]
    with caplog.at_level("WARNING", logger="submerge"):
        out = merge_state_dicts("esm", sd0, sds, {"role_patterns": _role_rules(), "layer_power": 0.0,
                                                  "alpha_scope": "all"}, stats=stats)
    assert "TSV-M" in caplog.text
    tsv = merge_state_dicts("tsv", sd0, sds, {"alpha": 1.0})
    # attn_out is TSV-M in the vit recipe anyway; with no stats every linear must equal TSV-M
    for k in ("layer.0.query.weight", "layer.1.intermediate.weight", "layer.0.attn_out.weight"):
        assert torch.allclose(out[k], tsv[k], atol=1e-5), k


def test_esm_requires_stats():
    base, experts = _tiny_family()
    with pytest.raises(Exception, match="calibration statistics"):
        merge_state_dicts("esm", base.state_dict(), [m.state_dict() for m in experts], {})


def test_regmean_identity_grams_is_averaging_and_solves_the_regression():
    base, experts = _tiny_family(T=2)
    sds = [m.state_dict() for m in experts]
    names = [n for n, m in experts[0].named_modules() if isinstance(m, nn.Linear)]
    eye = {n: LayerStats(torch.eye(16 if "output" not in n else 32, dtype=torch.float64),
                         torch.zeros(16 if "output" not in n else 32), 1) for n in names}
    stats = [CalibrationStats(eye), CalibrationStats(eye)]
    out = merge_state_dicts("regmean", None, sds, {"reduce_non_diagonal_ratio": 1.0}, stats=stats)
    for k in sds[0]:
        assert torch.allclose(out[k], (sds[0][k] + sds[1][k]) / 2, atol=1e-6), k
    # with real Grams (ratio 1) it minimises sum_t ||X_t W - X_t W_t||^2: the gradient vanishes
    stats = _stats_for(experts)
    out = merge_state_dicts("regmean", None, sds, {"reduce_non_diagonal_ratio": 1.0}, stats=stats)
    k = "layer.0.intermediate.weight"
    grad = sum(s.lookup(k).gram @ (out[k].double() - sd[k].double()).T for s, sd in zip(stats, sds))
    assert grad.abs().max() < 1e-6 * sum(s.lookup(k).gram.abs().max() for s in stats)


def test_subspace_methods_on_module_and_search_alpha():
    base, experts = _tiny_family()
    sd0, sds = base.state_dict(), [m.state_dict() for m in experts]
    for method in ("tsv", "iso_c", "iso_cts"):
        out = merge_state_dicts(method, sd0, sds, {"alpha": 1.0})
        for k, v in out.items():
            assert v.shape == sd0[k].shape and torch.isfinite(v).all()
        assert not torch.equal(out["layer.0.query.weight"], sd0["layer.0.query.weight"])
    # biases get alpha * mean of task vectors
    out = merge_state_dicts("tsv", sd0, sds, {"alpha": 2.0})
    mean_tv = sum(sd["layer.0.query.bias"] - sd0["layer.0.query.bias"] for sd in sds) / 3
    assert torch.allclose(out["layer.0.query.bias"], sd0["layer.0.query.bias"] + 2 * mean_tv, atol=1e-6)

    # search: a score peaked at alpha = 1.3 along the merge path is found by the grid and golden section
    target = merge_state_dicts("tsv", sd0, sds, {"alpha": 1.3})

    def score(sd):
        return -float(sum(((sd[k] - target[k]) ** 2).sum() for k in target))

    res = search_alpha("tsv", sd0, sds, score)
    assert res.strategy == "grid" and math.isclose(res.alpha, 1.3, abs_tol=1e-9)
    res = search_alpha("tsv", sd0, sds, score, strategy="golden", bounds=(0.0, 2.0))
    assert abs(res.alpha - 1.3) < 0.02
    assert all(torch.allclose(res.state[k], target[k], atol=1e-2) for k in target)
    # the optimum beyond the upper bound: the bracket moves up
    far = merge_state_dicts("tsv", sd0, sds, {"alpha": 2.6})
    res = search_alpha("tsv", sd0, sds, lambda sd: -float(sum(((sd[k] - far[k]) ** 2).sum() for k in far)),
                       strategy="golden", bounds=(0.0, 2.0))
    assert abs(res.alpha - 2.6) < 0.05
    # coarse: 0.5-steps up to the grid's top (3.0), one point past the best, one bisection on each side
    calls = []

    def counted(sd):
        calls.append(1)
        return score(sd)

    res = search_alpha("tsv", sd0, sds, counted, strategy="coarse")
    assert res.strategy == "coarse" and sorted(res.curve) == [0.5, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert res.alpha == 1.25 and len(calls) == 6   # 1.25 is 0.05 from the optimum 1.3, 1.5 is 0.2
    # the best coarse point at the top: the grid continues past the edge before bisecting
    res = search_alpha("tsv", sd0, sds, lambda sd: -float(sum(((sd[k] - far[k]) ** 2).sum() for k in far)),
                       strategy="coarse", grid=[1.0, 2.0])
    assert max(res.curve) > 2.0 and abs(res.alpha - 2.6) < 0.1


def test_affine_path_reuses_buffers():
    a0 = {"w": torch.zeros(3)}
    a1 = {"w": torch.ones(3)}
    p = AffinePath(a0, a1)
    x = p(0.5)["w"]
    y = p(2.0)["w"]
    assert x.data_ptr() == y.data_ptr() and torch.equal(y, torch.full((3,), 2.0))
    assert torch.equal(p(0.25, copy=True)["w"], torch.full((3,), 0.25))


def test_vit_recipe_gives_separate_qkv_the_essential_subspace():
    """recipe vit on a model with separate q/k/v: they get ESD (stacked, or each alone), not TSV-M."""
    base, experts = _tiny_family()
    stats = _stats_for(experts)
    sd0, sds = base.state_dict(), [m.state_dict() for m in experts]
    p = {"role_patterns": _role_rules(), "alpha": 1.0, "layer_power": 0.0}
    stacked = merge_state_dicts("esm", sd0, sds, {**p, "recipe": "vit"}, stats=stats)
    separate = merge_state_dicts("esm", sd0, sds, {**p, "recipe": "vit", "stack_qkv": False}, stats=stats)
    tsv = merge_state_dicts("esm", sd0, sds, {**p, "recipe": "vit", "esd_roles": "mlp_in,mlp_out"}, stats=stats)
    k = "layer.0.query.weight"
    assert not torch.allclose(stacked[k], separate[k], atol=1e-6)
    assert not torch.allclose(stacked[k], tsv[k], atol=1e-6) and not torch.allclose(separate[k], tsv[k], atol=1e-6)
    # attention-out is TSV-M in the vit recipe in every case
    k = "layer.0.attn_out.weight"
    assert torch.allclose(stacked[k], tsv[k], atol=1e-6)


@pytest.mark.parametrize("method", sorted(m.name for m in list_methods() if m.scale_param is not None))
def test_every_scaled_method_is_the_base_at_scale_zero(method):
    """search.affine_path takes θ(0) = θ_base without merging (half the merges of a scale search): every
    registered method with a searched scale must give the base, bit for bit, at scale 0."""
    from submerge.methods import get_method

    m = get_method(method)
    assert m.needs_base, f"{method}: a searched scale without a base has no θ(0) = base"
    base, experts = _tiny_family()
    sd0, sds = base.state_dict(), [e.state_dict() for e in experts]
    extra = {"weight": 1.0} if "weight" in m.param_names else {}
    extra.update({"role_patterns": _role_rules()} if method == "esm" else {})
    out = merge_state_dicts(method, sd0, sds, {**extra, m.scale_param: 0.0},
                            stats=_stats_for(experts) if m.needs_stats else None)
    for k, v in sd0.items():
        assert torch.equal(out[k], v), (method, k)
    # and the path built from the base alone is the merge at every scale
    path = affine_path(
        method, sd0, sds, extra, stats=_stats_for(experts) if m.needs_stats else None)
    at = merge_state_dicts(method, sd0, sds, {**extra, m.scale_param: 0.7},
                           stats=_stats_for(experts) if m.needs_stats else None)
    for k in sd0:
        assert torch.allclose(path(0.7)[k], at[k], atol=1e-6), (method, k)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 17, 64])
def test_symmetric_gram_packs_in_half_and_unpacks_exactly(n):
    from submerge.stats.gram import PackedLayerStats, compact, pack_symmetric, unpack_symmetric

    x = torch.randn(50, n, dtype=torch.float64)
    g = x.T @ x
    g = (g + g.T) / 2  # exactly symmetric whatever the BLAS
    size, rect, a21 = pack_symmetric(g)
    assert torch.equal(unpack_symmetric(size, rect, a21), g)
    if n >= 8:
        assert rect.numel() + a21.numel() <= (n + 1) ** 2 // 2 + n + 1  # odd n: one padded row and column
    st = compact(LayerStats(g, x.mean(0), 50))
    assert torch.equal(st.gram, g) and st.d_in == n and st.count == 50
    assert isinstance(st, PackedLayerStats) == (n > 2)
    skew = g.clone()
    if n > 2:
        skew[0, 1] += 1.0
        assert not isinstance(compact(LayerStats(skew, x.mean(0), 50)), PackedLayerStats)  # kept as given


@pytest.mark.parametrize("method", sorted(m.name for m in list_methods()))
def test_in_memory_merges_never_modify_the_callers_tensors(method):
    """merge_state_dicts hands a method the callers' tensors uncopied when it declares inputs_read_only: every
    registered method, flagged or not, leaves the base and the models it was given bit for bit unchanged."""
    from submerge.errors import ConfigError
    from submerge.methods import get_method
    from submerge.stats.fisher import FisherStats

    m = get_method(method)
    base, experts = _tiny_family()
    sd0, sds = base.state_dict(), [e.state_dict() for e in experts]
    before = [{k: v.clone() for k, v in sd.items()} for sd in (sd0, *sds)]
    params = {"weight": 1.0} if "weight" in m.param_names else {}
    if method == "esm":
        params["role_patterns"] = _role_rules()
    stats = None
    if m.needs_stats:
        stats = ([FisherStats({k: torch.rand(v.shape) for k, v in sd0.items()}) for _ in sds]
                 if m.stats_kind == "fisher" else _stats_for(experts))
    try:
        merge_state_dicts(method, sd0 if m.base_role != "ignored" else None, sds, params, stats=stats)
    except ConfigError as e:
        pytest.skip(f"{method} needs settings this generic test does not give: {e}")
    for sd, ref in zip((sd0, *sds), before):
        for k in ref:
            assert torch.equal(sd[k], ref[k]), (method, k)


def test_grid_search_continues_past_the_edge_over_a_flat_step():
    """With patience, a tie at the upper edge (a flat step of a discrete score) does not stop the extension; a
    plateau of `patience` points does, and without patience (the λ grid) a tie stops as before."""
    base, experts = _tiny_family()
    sd0, sds = base.state_dict(), [m.state_dict() for m in experts]
    key = "layer.0.query.bias"
    unit = merge_state_dicts("tsv", sd0, sds, {"alpha": 1.0})[key] - sd0[key]

    def alpha_of(sd):
        return round(float((sd[key] - sd0[key]).norm() / unit.norm()), 4)

    def plateau_then_climb(sd):  # climbs to 3.0, flat to 3.15, climbs to 3.5, then falls
        a = alpha_of(sd)
        return a if a <= 3.0 else 3.0 if a <= 3.15 else a - 0.1 if a <= 3.5 else 3.4 - (a - 3.5)

    res = search_alpha("tsv", sd0, sds, plateau_then_climb)
    assert math.isclose(res.alpha, 3.5, abs_tol=1e-6) and math.isclose(max(res.curve), 3.6, abs_tol=1e-6)

    def flat_after_3(sd):
        return min(alpha_of(sd), 3.0)

    res = search_alpha("tsv", sd0, sds, flat_after_3)
    assert res.alpha == 3.0 and math.isclose(max(res.curve), 3.3, abs_tol=1e-6)  # three ties, then stop
    # a tie up to rounding (two means of different per-task scores, one ulp apart) is a tie
    res = search_alpha("tsv", sd0, sds, lambda sd: flat_after_3(sd) - (4e-16 if alpha_of(sd) > 3.0 else 0.0))
    assert res.alpha == 3.0 and math.isclose(max(res.curve), 3.3, abs_tol=1e-6)
    res = search_alpha("tsv", sd0, sds, flat_after_3, grid=[0.1 * i for i in range(1, 31)], patience=None)
    assert res.alpha == 3.0 and math.isclose(max(res.curve), 3.1, abs_tol=1e-6)  # no patience: one tie stops
