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
    s.save(tmp_path)
    loaded = SurgerySet.load(tmp_path)
    assert loaded.tasks == ["a", "b", "c"] and torch.equal(loaded.up, s.up)
    with pytest.raises(ConfigError, match="already has surgery"):
        attach_surgery(model, loaded)
    handle.detach()
    assert not hasattr(model, "submerge_surgery")
