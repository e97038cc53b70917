"""Checkpoint formats in, Hugging Face folders out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import submerge
from conftest import load_dir
from submerge.io import Checkpoint, parse_size


def _ta_config(base, fts, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in fts], **extra}


def test_hf_round_trip_loads_with_from_pretrained(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = family
    out = tmp_path / "merged"
    res = submerge.merge(_ta_config(base, fts), out, quiet=True)
    assert res.tensors == len(load_dir(base))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.arange(10).reshape(1, 10)).logits
    assert torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "Task Arithmetic" in card and "arxiv.org/abs/2212.04089" in card and str(fts[0]) in card
    assert (out / "submerge_config.yaml").exists() and (out / "config.json").exists()
    # no temporary folder left beside the output
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_output_sharding_and_index(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = family
    out = tmp_path / "sharded"
    submerge.merge(_ta_config(base, fts), out, quiet=True, out_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / s).exists() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_dir(out).values())
    single = tmp_path / "single"
    submerge.merge(_ta_config(base, fts), single, quiet=True)
    a, b = load_dir(out), load_dir(single)
    assert all(torch.equal(a[k], b[k]) for k in a)
    AutoModelForCausalLM.from_pretrained(out)


def test_sharded_input_reads_like_single_file(family_sharded, tmp_path):
    base, fts = family_sharded
    assert (base / "model.safetensors.index.json").exists()
    ck = Checkpoint(base)
    sd = load_dir(base)
    assert set(ck.tensors) == set(sd)
    assert all(torch.equal(ck.read(k), v) for k, v in sd.items())
    submerge.merge(_ta_config(base, fts), tmp_path / "m", quiet=True)


def test_bin_pt_and_single_file_inputs_match_safetensors(family, tmp_path):
    base, fts = family
    ref = submerge.merge(_ta_config(base, fts), tmp_path / "ref", quiet=True)
    # pytorch_model.bin folders, a bare .pt file and a bare .safetensors file
    bin_dirs = []
    for i, p in enumerate([base] + fts):
        d = tmp_path / f"bin{i}"
        d.mkdir()
        torch.save(load_dir(p), d / "pytorch_model.bin")
        (d / "config.json").write_text((p / "config.json").read_text())
        bin_dirs.append(d)
    torch.save(load_dir(fts[0]), tmp_path / "ft0.pt")
    save_file(load_dir(fts[1]), str(tmp_path / "ft1.safetensors"))
    cfg = _ta_config(bin_dirs[0], [tmp_path / "ft0.pt", tmp_path / "ft1.safetensors", bin_dirs[3]])
    submerge.merge(cfg, tmp_path / "mixed", quiet=True)
    a, b = load_dir(ref.out_dir), load_dir(tmp_path / "mixed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_out_and_tokenizer_copy(family, tmp_path):
    base, fts = family
    (base / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    try:
        out = tmp_path / "o"
        submerge.merge(_ta_config(base, fts, dtype="bfloat16"), out, quiet=True)
        assert all(t.dtype == torch.bfloat16 for t in load_dir(out).values())
        cfg = json.loads((out / "config.json").read_text())
        assert "bfloat16" in (cfg.get("dtype"), cfg.get("torch_dtype"))
        assert (out / "tokenizer_config.json").exists()
    finally:
        (base / "tokenizer_config.json").unlink()


def test_random_methods_reproducible_with_seed(family, tmp_path):
    base, fts = family
    cfg = {"merge_method": "dare_ties", "base_model": str(base),
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in fts]}
    a = submerge.merge(cfg, tmp_path / "a", quiet=True, random_seed=11)
    b = submerge.merge(cfg, tmp_path / "b", quiet=True, random_seed=11, prefetch=False)
    c = submerge.merge(cfg, tmp_path / "c", quiet=True, random_seed=12)
    ta, tb, tc = load_dir(a.out_dir), load_dir(b.out_dir), load_dir(c.out_dir)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
    assert "--random-seed 11" in (a.out_dir / "README.md").read_text()


def test_ties_global_scope_runs_end_to_end(family, tmp_path):
    base, fts = family
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"topk_scope": "global"},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.2}} for p in fts]}
    out = submerge.merge(cfg, tmp_path / "g", quiet=True).out_dir
    merged, b0 = load_dir(out), load_dir(base)
    changed = sum(int((merged[k] != b0[k]).sum()) for k in b0)
    total = sum(v.numel() for v in b0.values())
    assert 0.2 * total < changed < 0.6 * total  # union of three 20% supports


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("5B", 5 * 10**9), ("500M", 5 * 10**8),
                                        ("2GiB", 2 * 2**30), ("1e6", 10**6), (1234, 1234)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_in_memory_merge_equals_file_merge(family, tmp_path):
    base, fts = family
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"lambda": 0.7},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in fts]}
    out = submerge.merge(cfg, tmp_path / "f", quiet=True).out_dir
    sds = [load_dir(p) for p in fts]
    mem = submerge.merge_state_dicts("ties", load_dir(base), sds, {"lambda": 0.7, "weight": 1.0, "density": 0.3})
    ref = load_dir(out)
    assert set(mem) == set(ref) and all(torch.equal(mem[k], ref[k]) for k in ref)
    with pytest.raises(submerge.ConfigError, match="did you mean density"):
        submerge.merge_state_dicts("ties", load_dir(base), sds, {"densty": 0.3, "weight": 1.0})


@pytest.mark.parametrize("fam", ["family", "family_bf16"])
def test_staged_ties_equals_unstaged(fam, request, tmp_path, monkeypatch):
    """TIES' stage hook (task vectors + trim thresholds on the prefetch thread, overlapping the previous
    tensor's merge) changes nothing: bitwise the merge without the hook, with and without prefetch."""
    import dataclasses

    from submerge.methods import registry

    base, fts = request.getfixturevalue(fam)
    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": w, "density": 0.3}}
                      for p, w in zip(fts, [1.0, 0.5, 2.0])]}
    method = registry.get_method("ties")
    calls = []

    def counting(tensors, base_t, params):
        calls.append(params["density"])
        return method.stage(tensors, base_t, params)

    monkeypatch.setitem(registry._REGISTRY, "ties", dataclasses.replace(method, stage=counting))
    staged = load_dir(submerge.merge(cfg, tmp_path / "s", quiet=True).out_dir)
    staged_serial = load_dir(submerge.merge(cfg, tmp_path / "p", quiet=True, prefetch=False).out_dir)
    assert calls  # the hook ran
    monkeypatch.setitem(registry._REGISTRY, "ties", dataclasses.replace(method, stage=None))
    plain = load_dir(submerge.merge(cfg, tmp_path / "u", quiet=True).out_dir)
    assert set(plain) == set(staged)
    assert all(torch.equal(staged[k], plain[k]) and torch.equal(staged_serial[k], plain[k]) for k in plain)
