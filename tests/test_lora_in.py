"""`model: base+adapter` (mergekit's syntax): a PEFT LoRA adapter applied tensor by tensor while streaming,
checked against peft's own PeftModel.merge_and_unload() on adapters made by peft in the test."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import submerge
from conftest import load_dir
from submerge.errors import CheckpointError


def peft_merged(model_cls, base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = model_cls.from_pretrained(base_dir, torch_dtype=torch.float32)
    return {k: v.detach().clone() for k, v in
            PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict().items()}


def make_adapter(model_cls, base_dir, out_dir, seed=0, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = model_cls.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out_dir)
    return out_dir


def only(model_ref):
    return {"merge_method": "linear", "models": [{"model": str(model_ref), "parameters": {"weight": 1.0}}],
            "dtype": "float32"}


def assert_matches(out_dir, ref):
    got = load_dir(out_dir)
    for name, value in got.items():
        assert torch.allclose(value, ref[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj"],
         alpha_pattern={"o_proj": 3.0}),
    dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "up_proj", "lm_head"]),
], ids=["linear", "rslora+alpha_pattern", "embeddings+lm_head"])
def test_llama_adapter_equals_merge_and_unload(family, tmp_path, lora):
    from transformers import LlamaForCausalLM

    base, _ = family
    adapter = make_adapter(LlamaForCausalLM, base, tmp_path / "adapter", **lora)
    res = submerge.merge(only(f"{base}+{adapter}"), tmp_path / "out", quiet=True)
    assert_matches(res.out_dir, peft_merged(LlamaForCausalLM, base, adapter))


def test_gpt2_conv1d_fan_in_fan_out_and_bert_modules_to_save(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32)).save_pretrained(gpt2)
    adapter = make_adapter(GPT2LMHeadModel, gpt2, tmp_path / "gpt2-lora", r=4, lora_alpha=8,
                           target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    res = submerge.merge(only(f"{gpt2}+{adapter}"), tmp_path / "out-gpt2", quiet=True)
    assert_matches(res.out_dir, peft_merged(GPT2LMHeadModel, gpt2, adapter))

    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=3)).save_pretrained(bert)
    adapter = make_adapter(BertForSequenceClassification, bert, tmp_path / "bert-lora", r=4, lora_alpha=8,
                           target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"],
                           bias="lora_only")
    from safetensors.torch import load_file, save_file

    stored = load_file(adapter / "adapter_model.safetensors")  # as if the saved classifier had been trained
    key = next(k for k in stored if k.endswith("classifier.weight"))
    stored[key] = stored[key] + 1.0
    save_file(stored, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    res = submerge.merge(only(f"{bert}+{adapter}"), tmp_path / "out-bert", quiet=True)
    ref = peft_merged(BertForSequenceClassification, bert, adapter)
    assert_matches(res.out_dir, ref)
    assert torch.allclose(load_dir(res.out_dir)["classifier.weight"], load_dir(bert)["classifier.weight"] + 1.0)


def test_adapters_merge_with_other_models_and_the_adapter_folder_is_an_input(family, tmp_path):
    from transformers import LlamaForCausalLM

    base, fts = family
    adapter = make_adapter(LlamaForCausalLM, base, tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj", "up_proj"])
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.5}},
                      {"model": str(fts[1]), "parameters": {"weight": 0.5}}]}
    res = submerge.merge(cfg, tmp_path / "out", quiet=True)
    ref = peft_merged(LlamaForCausalLM, base, adapter)
    b, f1, got = load_dir(base), load_dir(fts[1]), load_dir(res.out_dir)
    for name in got:
        want = b[name] + 0.5 * (ref[name] - b[name]) + 0.5 * (f1[name] - b[name])
        assert torch.allclose(got[name], want, atol=1e-6), name
    with pytest.raises(submerge.io.OutputError, match="input of this run"):
        submerge.merge(cfg, adapter / "merged", quiet=True)


def test_bad_adapters_are_one_line_errors(family, tmp_path):
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    base, _ = family
    # an adapter for another width
    torch.manual_seed(0)
    other = tmp_path / "other"
    from submerge.synthetic import llama_config
    LlamaForCausalLM(llama_config(hidden=32, layers=4)).save_pretrained(other)
    wrong = make_adapter(LlamaForCausalLM, other, tmp_path / "wrong", r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match="q_proj.*is \\[32, 32\\].*is \\[64, 64\\]|an adapter for another model"):
        submerge.merge(only(f"{base}+{wrong}"), tmp_path / "o", quiet=True)
    assert not (tmp_path / "o").exists()
    # an adapter for modules the model lacks
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    foreign = make_adapter(BertModel, bert, tmp_path / "foreign", r=2, lora_alpha=4, target_modules=["query"])
    with pytest.raises(CheckpointError, match="targets module .*query, which model .* lacks"):
        submerge.validate(only(f"{base}+{foreign}"))
    # DoRA is refused, not silently merged as plain LoRA
    dora = make_adapter(LlamaForCausalLM, base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"],
                        use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        submerge.validate(only(f"{base}+{dora}"))
    # a broken adapter config
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "wrong", broken)
    (broken / "adapter_config.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        submerge.validate(only(f"{base}+{broken}"))


def test_subspace_rules_on_low_rank_adapters_get_a_note_unless_rank_tol(family, tmp_path):
    """TSV-M / Iso-C at rank_tol 0 on rank-2 adapters of 64-wide layers keep null-space noise: the plan says so
    once, with the counts; rank_tol > 0, full fine-tunes and task arithmetic get no such note."""
    from transformers import LlamaForCausalLM

    base, fts = family
    targets = ["q_proj", "v_proj", "up_proj"]
    adapters = [make_adapter(LlamaForCausalLM, base, tmp_path / f"a{i}", seed=i, r=2, lora_alpha=4,
                             target_modules=targets) for i in range(2)]

    def notes(method, models, **params):
        cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": m} for m in models],
               **({"parameters": params} if params else {})}
        plan = submerge.validate(cfg)
        try:
            return [n for n in plan.notes if "LoRA updates" in n]
        finally:
            plan.close()

    refs = [f"{base}+{a}" for a in adapters]
    (tsv,) = notes("tsv", refs)
    # 4 layers x 3 targeted matrices; q/v 64x64 keep 32 per task, up_proj 128x64 also 32
    assert tsv.startswith("tsv: 12 matrices get LoRA updates of rank 2,") and "keeps 32 directions per task" in tsv
    (iso,) = notes("iso_c", refs)
    assert "keeps 64 directions of their sum" in iso
    assert notes("tsv", refs, rank_tol=1e-4) == []
    assert notes("tsv", [str(f) for f in fts[:2]]) == []           # full fine-tunes
    assert notes("tsv", [refs[0], str(fts[1])]) == []                # one full update: the stack is not low-rank
    assert notes("task_arithmetic", refs, weight=1.0) == []           # no rank_tol, no subspace rule
    import yaml
    from click.testing import CliRunner

    from submerge.cli import main

    path = tmp_path / "tsv.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "tsv", "base_model": str(base),
                                    "models": [{"model": r} for r in refs]}))
    out = CliRunner().invoke(main, ["validate", str(path)])
    assert out.exit_code == 0 and "note: tsv: 12 matrices get LoRA updates of rank 2," in out.output
