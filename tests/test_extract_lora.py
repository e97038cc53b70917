"""`submerge extract-lora`: the task vector as a PEFT adapter. At full rank peft reproduces the fine-tune's
outputs; at rank R each layer's error is exactly the truncated-SVD error; `--rank auto` keeps the asked energy."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import submerge
from conftest import load_dir
from submerge.cli import main
from submerge.extract import extract_lora, rank_for_energy


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Llama base and a fine-tune that changed every linear layer (and one norm)."""
    from transformers import LlamaForCausalLM

    from submerge.synthetic import llama_config

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(layers=2))
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.model.norm.weight.add_(0.1)
    model.save_pretrained(root / "ft")
    return root, root / "base", root / "ft"


def outputs(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_full_rank_adapter_reproduces_the_finetune_with_peft(pair, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, base, ft = pair
    res = extract_lora(base, ft, tmp_path / "lora", rank=128)
    assert res.left_out == {"model.norm.weight": pytest.approx(0.1, rel=1e-3)}  # a norm is not LoRA-able
    assert all(abs(e - 1.0) < 1e-9 for e in res.kept_energy.values())
    ids = torch.arange(20).reshape(2, 10) % 128
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "lora").eval()
    fine = LlamaForCausalLM.from_pretrained(ft).eval()
    fine.model.norm.weight.data.sub_(0.1)  # the one change the adapter cannot hold
    assert torch.allclose(outputs(adapted, ids), outputs(fine, ids), atol=1e-4)
    # and submerge's own base+adapter reader gives the fine-tune's linear weights back
    merged = submerge.merge({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'lora'}",
                                                                   "parameters": {"weight": 1.0}}]},
                            tmp_path / "merged", quiet=True)
    got, want = load_dir(merged.out_dir), load_dir(ft)
    for name in got:
        if name != "model.norm.weight":
            assert torch.allclose(got[name], want[name], atol=1e-6), name


def test_rank_r_error_is_the_truncated_svd_error(pair, tmp_path):
    root, base, ft = pair
    res = extract_lora(base, ft, tmp_path / "lora", rank=4)
    merged = submerge.merge({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'lora'}",
                                                                   "parameters": {"weight": 1.0}}]},
                            tmp_path / "merged", quiet=True)
    b, f, got = load_dir(base), load_dir(ft), load_dir(merged.out_dir)
    for module, r in res.ranks.items():
        name = module + ".weight"
        s = torch.linalg.svdvals((f[name] - b[name]).double())
        want = float(s[4:].square().sum().sqrt())
        err = float(torch.linalg.norm((got[name] - f[name]).double()))
        assert r == 4 and err == pytest.approx(want, rel=1e-4, abs=1e-6), module
        assert res.kept_energy[module] == pytest.approx(float(s[:4].square().sum() / s.square().sum()), rel=1e-6)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
    assert "kept energy" in (tmp_path / "lora" / "README.md").read_text()


def test_auto_rank_keeps_the_energy_and_is_minimal(pair, tmp_path):
    root, base, ft = pair
    res = extract_lora(base, ft, tmp_path / "lora", rank="auto", energy=0.5)
    b, f = load_dir(base), load_dir(ft)
    for module, r in res.ranks.items():
        s = torch.linalg.svdvals((f[module + ".weight"] - b[module + ".weight"]).double())
        share = torch.cumsum(s.square(), 0) / s.square().sum()
        assert share[r - 1] >= 0.5 - 1e-12 and (r == 1 or share[r - 2] < 0.5)
    assert len(set(res.ranks.values())) > 1  # MLP and attention layers need different ranks
    assert rank_for_energy(torch.tensor([3.0, 4.0]), 0.64) == 2 and rank_for_energy(torch.tensor([4.0, 3.0]), 0.64) == 1


def test_cli_and_errors(pair, tmp_path):
    root, base, ft = pair
    r = CliRunner().invoke(main, ["extract-lora", str(base), str(ft), str(tmp_path / "lora"), "--rank", "8"])
    assert r.exit_code == 0 and "mean kept energy" in r.output, r.output
    for args, fragment in [(["--rank", "zero"], "neither an integer nor 'auto'"), (["--rank", "0"], "positive integer"),
                           (["--energy", "1.5"], "range")]:
        r = CliRunner().invoke(main, ["extract-lora", str(base), str(ft), str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and fragment in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(main, ["extract-lora", str(base), str(base), str(tmp_path / "x")])
    assert r.exit_code == 2 and "differs from" in r.output
    r = CliRunner().invoke(main, ["extract-lora", str(base), str(ft), str(ft), "--overwrite"])
    assert r.exit_code == 2 and "input of this run" in r.output
    assert not (tmp_path / "x").exists()


def test_merge_written_as_a_lora_on_the_base(family, tmp_path):
    base, fts = family
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in fts]}
    full = submerge.merge(cfg, tmp_path / "full", quiet=True)
    res = submerge.merge(cfg, tmp_path / "lora", quiet=True, lora_rank=64)  # full rank of every 64-wide layer
    assert (tmp_path / "lora" / "adapter_config.json").exists() and not (tmp_path / "lora" / "model.safetensors").exists()
    assert any("LoRA adapter" in n for n in res.notes)
    assert not [p for p in tmp_path.iterdir() if ".submerge-" in p.name]
    back = submerge.merge({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'lora'}",
                                                                 "parameters": {"weight": 1.0}}]},
                          tmp_path / "back", quiet=True)
    a, b = load_dir(full.out_dir), load_dir(back.out_dir)
    for name in a:
        if a[name].dim() == 2 and "embed" not in name and "lm_head" not in name:
            assert torch.allclose(a[name], b[name], atol=1e-5), name
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "c.yaml"), str(tmp_path / "x"), "--lora-rank", "many"])
    assert r.exit_code == 2 and "neither an integer nor 'auto'" in r.output
