"""`submerge align` (Git Re-Basin weight matching): a permuted copy is aligned back exactly and the aligned model
computes the same function; two MLPs trained from different seeds have a lower linear-path barrier once aligned."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from submerge.analysis.align import apply_permutations, permutation_spec, weight_matching
from submerge.cli import main


def _bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=24, num_labels=3, max_position_embeddings=16)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def _random_perms(groups, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.randperm(x.size, generator=g) for x in groups}


def _logits(model, state):
    model.load_state_dict(state)
    ids = torch.tensor([[2, 5, 7, 9, 3, 0], [2, 11, 4, 3, 0, 0]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long()).logits


@pytest.mark.parametrize("residual", [False, True])
def test_a_permuted_bert_is_aligned_back_exactly_and_computes_the_same(residual):
    model = _bert()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    groups = permutation_spec(ref, heads=4, residual=residual)
    names = {g.name for g in groups}
    assert {"block0.heads", "block0.mlp", "block1.heads", "block1.mlp"} <= names
    assert ("residual" in names) == residual
    shuffled = apply_permutations(ref, groups, _random_perms(groups))
    moved = [k for k in ref if not torch.equal(ref[k], shuffled[k])]
    assert len(moved) > 10  # the permutation really moved the weights
    want = _logits(model, ref)
    assert torch.allclose(_logits(model, shuffled), want, atol=1e-5)  # the symmetry is a symmetry
    perms, report = weight_matching(shuffled, ref, groups, seed=3)
    aligned = apply_permutations(shuffled, groups, perms)
    for k in ref:
        assert torch.equal(aligned[k], ref[k]), k
    assert torch.allclose(_logits(model, aligned), want, atol=1e-5)
    assert report["objective_after"] > report["objective_before"]


def test_align_cli_writes_a_functionally_identical_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    ref_model = _bert(0)
    ref_model.save_pretrained(tmp_path / "ref")
    other = _bert(5)  # another initialisation: no exact match exists
    other.save_pretrained(tmp_path / "other")
    r = CliRunner().invoke(main, ["align", str(tmp_path / "other"), str(tmp_path / "ref"), str(tmp_path / "out"),
                                  "--residual", "-q"])
    assert r.exit_code == 0, r.output
    aligned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    orig = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert torch.allclose(_logits(aligned, aligned.state_dict()), _logits(other, other.state_dict()), atol=1e-5)
    rep = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert rep["objective_after"] >= rep["objective_before"] and sum(rep["moved"].values()) > 0
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(new) == set(orig) and any(not torch.equal(new[k], orig[k]) for k in orig)
    # bad input: one line, nothing written
    _bert(0).bert.save_pretrained(tmp_path / "encoder")  # another architecture (no classifier)
    r = CliRunner().invoke(main, ["align", str(tmp_path / "encoder"), str(tmp_path / "ref"), str(tmp_path / "x")])
    assert r.exit_code != 0 and "is in only one of" in r.output and not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["align", str(tmp_path / "other"), str(tmp_path / "ref"), str(tmp_path / "out")])
    assert r.exit_code != 0 and "already exists" in r.output


def _mlp_task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] + x[:, 3] > 0.5).long())  # 3 classes, nonlinear
    return x, y


def _train_mlp(seed: int, x, y) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _loss(state, x, y) -> float:
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 3))
    net.load_state_dict(state)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(x), y))


def _barrier(a, b, x, y) -> float:
    from submerge.analysis.paths import barrier, interpolate

    ts = [i / 10 for i in range(11)]
    return barrier([_loss(interpolate(a, b, t), x, y) for t in ts], ts)


def test_two_mlps_from_different_seeds_have_a_lower_barrier_once_aligned():
    x, y = _mlp_task(2000, 0)
    xv, yv = _mlp_task(1000, 1)
    a, b = _train_mlp(1, x, y), _train_mlp(2, x, y)
    groups = permutation_spec(b)
    assert [g.name for g in groups] == ["hidden0", "hidden1"]
    perms, _ = weight_matching(b, a, groups)
    b_aligned = apply_permutations(b, groups, perms)
    assert _loss(b_aligned, xv, yv) == pytest.approx(_loss(b, xv, yv), abs=1e-6)  # the same function
    before, after = _barrier(a, b, xv, yv), _barrier(a, b_aligned, xv, yv)
    print(f"linear-path loss barrier on held-out data: {before:.4f} before alignment, {after:.4f} after")
    assert after < before
