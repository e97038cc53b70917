"""`esm` with `recipe: glue` is the authors' ESM-RoBERTa code, checked against a transcription of it.

The transcription below follows kiddo127/ESM, ESM-RoBERTa (HEAD fc82fe7): essential_subspace_decomposition.py
(activation shifts x·ΔWᵀ of each fine-tuned model on its proxy samples, one sample per forward, SVD → eigen-
values σ²/(n−1), eigenvectors padded with identity columns), merge.py::MergingMethod.esm with
_esm_process_2d_param / _tsv_process_2d_param / _tsv_process_1d_param / _procrustes_orthogonalize /
inter_layer_scaling, and run_merge.py (--exclude-param ".*classifier.*" ".*bias.*"; the best scaling multiplies
the whole merged task vector).  Written in float64 so the comparison is tight; the authors run it in float32.
"""

from __future__ import annotations

import re

import pytest
import torch

from submerge.api import merge_state_dicts
from submerge.stats.gram import collect_stats
from submerge.methods.esm import esm_merge_matrix, tsv_scaled_merge
from submerge.methods.subspace import tsv_merge

EXCLUDE = [".*classifier.*", ".*bias.*"]
TARGETS = (".attention.self.query", ".attention.self.key", ".attention.self.value", ".attention.output.dense",
           ".intermediate.dense", ".output.dense")
FAMILIES = ["attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
            "attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight"]


# ------------------------------------------------------------------------------ the transcription
def ref_principal_direction_svd(act):
    n, d = act.shape
    u, s, vh = torch.linalg.svd(act, full_matrices=False)
    lam = s ** 2 / (n - 1)
    vec = vh.T
    if vec.shape[1] < d:
        full = torch.eye(d, dtype=act.dtype)
        full[:, :vec.shape[1]] = vec
        vec = full
        lam_full = torch.zeros(d, dtype=lam.dtype)
        lam_full[:len(lam)] = lam
        lam = lam_full
    order = torch.argsort(lam, descending=True)
    return lam[order], vec[:, order]


def ref_principal_directions(ft_model, base_sd, samples):
    shifts, handles = {}, []
    sd = ft_model.state_dict()
    for name, module in ft_model.named_modules():
        if name.endswith(TARGETS):
            dw = sd[name + ".weight"] - base_sd[name + ".weight"]

            def hook(mod, inp, out, name=name, dw=dw):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                shifts.setdefault(name + ".weight", []).append(x @ dw.T)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for ids in samples:  # one sample per forward, as their calculate_logits
            ft_model(input_ids=ids.unsqueeze(0), attention_mask=torch.ones_like(ids).unsqueeze(0))
    for h in handles:
        h.remove()
    return {k: ref_principal_direction_svd(torch.cat(v, 0)) for k, v in shifts.items()}


def ref_procrustes(x):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh * s.mean()


def ref_esm_2d(task_matrices, directions, T):
    us, vs = [], []
    for dw, (lam, vec) in zip(task_matrices, directions):
        v = vec.T @ dw
        k = max(1, int(vec.shape[1] * (1.0 / T)))
        lam_k = lam[:k]
        scale = torch.pow(lam_k / lam_k.mean(), 0.15)
        scale = scale / scale.mean()
        us.append(vec[:, :k] * scale.unsqueeze(0))
        vs.append(v[:k, :] * scale.unsqueeze(1))
    return ref_procrustes(torch.cat(us, 1)) @ ref_procrustes(torch.cat(vs, 0))


def ref_tsv_2d(task_matrices, T):
    us, ss, vs = [], [], []
    for m in task_matrices:
        u, s, v = torch.linalg.svd(m, full_matrices=False)
        k = max(1, int(s.shape[0] * (1.0 / T)))
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(v[:k, :])
    return ref_procrustes(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ ref_procrustes(torch.cat(vs, 0))


def ref_esm(base_sd, ft_sds, directions, scaling_after):
    keep = lambda n: not any(re.match(p, n) for p in EXCLUDE)  # noqa: E731
    base = {n: p for n, p in base_sd.items() if keep(n)}
    T = len(ft_sds)
    merged = {}
    for name, b in base.items():
        tvs = [sd[name] - b for sd in ft_sds]
        if b.dim() == 2:
            if name in directions[0]:
                merged[name] = b + ref_esm_2d(tvs, [d[name] for d in directions], T)
            else:
                merged[name] = b + ref_tsv_2d(tvs, T)
        else:
            merged[name] = b + torch.stack(tvs).mean(0)
    norms = {k: [] for k in FAMILIES}  # inter_layer_scaling, exponent 2
    for key in merged:
        for fam in FAMILIES:
            if fam in key:
                norms[fam].append(torch.norm(merged[key] - base[key]))
                break
    means = {k: torch.stack(v).mean() for k, v in norms.items() if v}
    for key in merged:
        for fam in FAMILIES:
            if fam in key:
                tv = merged[key] - base[key]
                merged[key] = base[key] + tv * (torch.norm(tv) / means[fam]) ** 2
                break
    out = {n: p.clone() for n, p in base_sd.items()}
    for name, m in merged.items():  # the searched scaling multiplies the whole merged task vector
        out[name] = base_sd[name] + scaling_after * (m - base_sd[name])
    return out


# ------------------------------------------------------------------------------ one layer
def test_one_layer_matches_the_authors_esd_and_tsv_paths():
    g = torch.Generator().manual_seed(0)
    T, d_out, d_in, n = 3, 12, 20, 40
    deltas = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * (1 + t) for t in range(T)]
    xs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for _ in range(T)]
    dirs = [ref_principal_direction_svd(x @ dw.T) for x, dw in zip(xs, deltas)]
    ref = ref_esm_2d(deltas, dirs, T)
    ours = esm_merge_matrix(deltas, [x.T @ x for x in xs], [n] * T, eig_power=0.15, task_power=0.0,
                            column_power=0.0, factor=1.0, fusion="polar")
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-11)
    assert torch.allclose(tsv_scaled_merge(deltas), ref_tsv_2d(deltas, T), rtol=1e-9, atol=1e-11)
    # the authors' TSV path is not TSV-M: polar factors are rescaled by their mean singular value
    assert not torch.allclose(tsv_scaled_merge(deltas), tsv_merge(deltas), rtol=1e-3)
    # with fewer dimensions than tasks their rank is 1 (TSV-M's is 0: the base is kept)
    small = [torch.randn(2, 7, generator=g, dtype=torch.float64) for _ in range(T)]
    assert torch.allclose(tsv_scaled_merge(small), ref_tsv_2d(small, T), rtol=1e-9, atol=1e-11)
    assert torch.count_nonzero(tsv_merge(small)) == 0


# ------------------------------------------------------------------------------ one whole model
@pytest.fixture(scope="module")
def bert_glue():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg).double().eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    fts, samples = [], []
    g = torch.Generator().manual_seed(1)
    for t in range(3):
        m = BertForSequenceClassification(cfg).double().eval()
        m.load_state_dict(base_sd)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.add_(0.05 * (1 + t) * torch.randn(p.shape, generator=g, dtype=p.dtype))
        fts.append(m)
        lengths = torch.randint(5, 12, (6,), generator=g).tolist()
        samples.append([torch.randint(0, 30, (n,), generator=g) for n in lengths])
    return base_sd, fts, samples


@pytest.mark.parametrize("alpha", [1.0, 1.7])
def test_whole_model_matches_the_authors_code(bert_glue, alpha):
    base_sd, fts, samples = bert_glue
    ft_sds = [{k: v.clone() for k, v in m.state_dict().items()} for m in fts]
    directions = [ref_principal_directions(m, base_sd, s) for m, s in zip(fts, samples)]
    ref = ref_esm(base_sd, ft_sds, directions, alpha)
    stats = [collect_stats(m, [{"input_ids": ids.unsqueeze(0)} for ids in s], progress=False)
             for m, s in zip(fts, samples)]
    ours = merge_state_dicts("esm", base_sd, ft_sds, {"recipe": "glue", "alpha": alpha}, stats=stats,
                             compute_dtype=torch.float64)
    assert set(ours) == set(ref)
    for name in ref:
        assert torch.allclose(ours[name], ref[name], rtol=1e-7, atol=1e-9), name
    # biases and the classifier stay pre-trained; every other tensor moved
    for name in ref:
        kept = "bias" in name or "classifier" in name
        assert torch.equal(ours[name], base_sd[name]) == kept, name
