"""Representation Surgery (Yang et al., ICML 2024): the module's form, training on cached representations
pulls the merge towards each expert, the hook applies it by task id or prototype, save/load."""

from __future__ import annotations

import pytest
import torch

from submerge.errors import ConfigError
from submerge.routing.surgery import SurgerySet, attach_surgery, fit_surgery, representations

from test_routing import _run, _static, bert  # noqa: F401 (fixture)


def test_surgery_learns_a_known_low_rank_relu_bias():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 12, generator=g)
    down, up = torch.randn(3, 12, generator=g), 0.5 * torch.randn(12, 3, generator=g)
    y = z - torch.relu(z @ down.T) @ up.T  # the expert = the merge minus a rank-3 ReLU bias
    s = fit_surgery([z], [y], rank=8, steps=600, lr=1e-2)
    before, after = s.info["l1_before_after"][0]
    assert after < 0.2 * before
    # zero-initialised up-projection: no training = no change
    s0 = fit_surgery([z], [y], rank=4, steps=0)
    assert torch.equal(s0.correction(z[:5], torch.zeros(5, dtype=torch.long)), torch.zeros(5, 12))
    with pytest.raises(ConfigError, match="representation"):
        fit_surgery([z], [y[:10]])


def test_surgery_on_a_merged_bert_pulls_each_task_towards_its_expert(bert, tmp_path):
    root, tok, base, fts, stats = bert
    model, _ = _static(bert)
    # each task's unlabeled inputs differ by length here (the tiny vocabulary maps words to [UNK])
    texts = [[" ".join(["cat"] * (2 + 4 * t + i % 2)) for i in range(16)] for t in range(3)]
    batches = [[dict(tok(tt[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 16, 8)] for tt in texts]
    merged = [representations(model, b) for b in batches]
    targets = [representations(ft, b) for ft, b in zip(fts, batches)]
    s = fit_surgery(merged, targets, tasks=["a", "b", "c"], rank=8, steps=300, lr=1e-2)
    handle = attach_surgery(model, s)
    for t in range(3):
        b = batches[t][0]
        want = _run(fts[t], b)
        with handle.task(t):
            got = _run(model, b)
        handle.mode = "off"
        plain = _run(model, b)
        handle.mode = "route"
        m = b["attention_mask"].bool()
        assert (got - want).abs()[m].mean() < (plain - want).abs()[m].mean()
    handle.routed.clear()
    for t in range(3):
        _run(model, batches[t][1])
    assert [int(x) for r in handle.routed for x in r] == [t for t in range(3) for _ in range(8)]  # by prototype
    # routing_mask: route from the marked tokens only (a chat model's prompt, not the answer after it)
    b = batches[2][0]
    handle.mode = "off"
    plain = _run(model, b)
    handle.mode = "route"
    for first in (1, 2, 3):
        mask = torch.zeros_like(b["attention_mask"])
        mask[:, :first] = 1
        pooled = torch.nn.functional.normalize((plain * mask[..., None]).sum(1) / first, dim=-1)
        with handle.routing_mask(mask):
            _run(model, b)
        assert torch.equal(handle.routed[-1], (pooled @ s.prototypes.T).argmax(-1))
    assert handle.mask is None
    s.save(tmp_path)
    loaded = SurgerySet.load(tmp_path)
    assert loaded.tasks == ["a", "b", "c"] and torch.equal(loaded.up, s.up)
    with pytest.raises(ConfigError, match="already has surgery"):
        attach_surgery(model, loaded)
    handle.detach()
    assert not hasattr(model, "submerge_surgery")


def _classifier_family(root):
    """A tiny BERT classifier base, two experts (perturbed copies), their mean as 'the merge', texts per task."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["the", "cat", "dog", "sat", "on", "mat", "ran", "far", "a", "big", "small", "red"]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    experts = []
    for i in range(2):
        m = BertForSequenceClassification(cfg).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn_like(p))
        m.save_pretrained(root / f"ft{i}")
        tok.save_pretrained(root / f"ft{i}")
        experts.append(m)
    merged = BertForSequenceClassification(cfg).eval()
    merged.load_state_dict({k: (experts[0].state_dict()[k] + experts[1].state_dict()[k]) / 2
                            for k in base.state_dict()})
    merged.save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    for i in range(2):
        (root / f"t{i}.txt").write_text("\n".join(" ".join(words[(3 * j + k + 5 * i) % len(words)]
                                                           for k in range(3 + j % 4)) for j in range(24)) + "\n")
    return tok


def test_surgery_cli_on_a_classifier_corrects_what_the_pooler_reads(tmp_path):
    """`submerge surgery` on a merged BERT classifier: modules written beside the model (its files untouched),
    the L1 gap to each expert shrinks, and the loaded classifier applies the module to the encoder output, so
    its pooler and head read the surgered states (checked against the computation by hand)."""
    import hashlib

    from click.testing import CliRunner

    from submerge.cli import main
    from submerge.routing.surgery import load_model

    tok = _classifier_family(tmp_path)
    weights = tmp_path / "merged" / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    args = ["surgery", str(tmp_path / "merged"), "--expert", f"a={tmp_path / 'ft0'}", "--expert",
            f"b={tmp_path / 'ft1'}", "--inputs", f"a={tmp_path / 't0.txt'}", "--inputs", f"b={tmp_path / 't1.txt'}",
            "--rank", "4", "--steps", "150", "--lr", "1e-2", "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    s = SurgerySet.load(tmp_path / "merged")
    assert s.tasks == ["a", "b"] and s.info["n_inputs"] == [24, 24]
    assert all(after < before for before, after in s.info["l1_before_after"])
    model = load_model(tmp_path / "merged")
    assert type(model).__name__ == "BertForSequenceClassification"
    handle = model.submerge_surgery
    b = dict(tok(["the cat sat", "a big red dog ran far"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        handle.mode = "off"
        plain = model(**b).logits
        h = model.bert(**b).last_hidden_state
        for t in range(2):
            fixed = h - s.correction(h, torch.full((2,), t))
            want = model.classifier(model.bert.pooler(fixed))
            with handle.task(t):
                got = model(**b).logits
            assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-4)
        handle.mode = "route"
        model(**b)
        assert handle.routed[-1].tolist() in ([0, 0], [0, 1], [1, 0], [1, 1])
    # refused, each with a line naming what to fix; nothing written
    runner = CliRunner()
    again = runner.invoke(main, args)
    assert again.exit_code != 0 and "already has Representation Surgery" in again.output
    bad = runner.invoke(main, args[:6] + ["--inputs", f"a={tmp_path / 't0.txt'}", "--inputs",
                                          f"c={tmp_path / 't1.txt'}", "--overwrite"])
    assert bad.exit_code != 0 and "each task needs both" in bad.output
    missing = runner.invoke(main, args[:3] + [f"a={tmp_path / 'nope'}"] + args[4:] + ["--overwrite"])
    assert missing.exit_code != 0 and "nope does not exist" in missing.output
    assert SurgerySet.load(tmp_path / "merged").info == s.info


def test_surgery_from_a_merge_config(tmp_path, monkeypatch):
    """`surgery:` in a merge YAML: the modules are trained on the merged model inside the output's temporary
    folder, so the model and its modules appear together; relative input paths resolve against the YAML's
    folder; a config naming the wrong models, or a missing input file, fails before anything is written."""
    import yaml
    from click.testing import CliRunner

    from submerge.cli import main
    from submerge.routing.surgery import load_model

    _classifier_family(tmp_path)
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "ft0"}, {"model": "ft1"}],
           "parameters": {"weight": 1.0, "lambda": 0.5},
           "surgery": {"inputs": {"ft0": "t0.txt", "ft1": "t1.txt"}, "rank": 4, "steps": 100, "lr": 1e-2}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "merge.yaml"), "out", "-q"])
    assert res.exit_code == 0, res.output
    s = SurgerySet.load(elsewhere / "out")
    assert s.tasks == ["ft0", "ft1"] and s.info["n_inputs"] == [24, 24]
    assert all(after < before for before, after in s.info["l1_before_after"])
    assert type(load_model(elsewhere / "out")).__name__ == "BertForSequenceClassification"
    assert yaml.safe_load((elsewhere / "out" / "submerge_config.yaml").read_text())["surgery"]["rank"] == 4
    for bad, msg in ((dict(cfg, surgery={"inputs": {"ft0": "t0.txt"}}), "missing: \\['ft1'\\]"),
                     (dict(cfg, surgery={"inputs": {"ft0": "t0.txt", "ft1": "nope.txt"}}), "nope.txt .*not a file"),
                     (dict(cfg, surgery={"inputs": {"ft0": "t0.txt", "ft1": "t1.txt"}, "rank": 0}), "rank must be")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        out = CliRunner().invoke(main, ["merge", str(tmp_path / "bad.yaml"), "out2", "-q"])
        assert out.exit_code != 0 and __import__("re").search(msg, out.output), out.output
        assert not (elsewhere / "out2").exists()
