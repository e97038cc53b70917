"""`submerge moe`: mergekit-moe's configs built into Mixtral, DeepSeek-MoE, Qwen2-MoE and Qwen3-MoE folders.

Parity: every tensor and config.json equal to mergekit-moe 0.1.5's own output on tiny families built here, for
every gate mode (hidden states with ``--gate-dtype bfloat16``, mergekit's dtype; our float32 default within a
stated tolerance), with seeded random gates and noise.  Property: an MoE of copies of one model computes that
model.  Safety and one-line errors as every command that writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from submerge.errors import ConfigError
from submerge.moe import MoEOptions, build_moe, parse_moe_config
from test_generation import chat_tokenizer

pytest.importorskip("mergekit")

KW = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=3,
          pad_token_id=0, bos_token_id=2)


def _family(root: Path, kind: str) -> Path:
    import transformers

    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                          "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    tok = chat_tokenizer()
    tok.bos_token = "<|im_start|>"
    torch.manual_seed(0)
    base = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**KW))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i in range(3):
        ft = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**KW))
        ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(root / f"ft{i}")
        tok.save_pretrained(root / f"ft{i}")
    return root


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {kind: _family(root / kind, kind) for kind in ("llama", "qwen2", "qwen3")}


def _experts(fam: Path, n: int = 3, **kw) -> list[dict]:
    return [dict(source_model=str(fam / f"ft{i}"), positive_prompts=[f"w{i} w{i + 1}", f"w{10 + i}"],
                 **({"negative_prompts": [f"w{30 + i}"]} if i == 0 else {}), **kw) for i in range(n)]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _mergekit(raw: dict, out: Path, seed: int = 0) -> Path:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    torch.manual_seed(seed)  # what mergekit-moe --random-seed does before build
    build(MoEMergeConfig.model_validate(copy.deepcopy(raw)), str(out), MergeOptions(device="cpu", random_seed=seed),
          device="cpu")
    return out


def _ours(raw: dict, out: Path, seed: int = 0, **kw) -> Path:
    build_moe(parse_moe_config(copy.deepcopy(raw)), out, MoEOptions(random_seed=seed, quiet=True, **kw))
    return out


CASES = {  # name: (family, config without base_model, architecture written)
    "mixtral_hidden_fp32": ("llama", dict(gate_mode="hidden", dtype="float32"), "MixtralForCausalLM"),
    "mixtral_hidden_avg": ("llama", dict(gate_mode="hidden_avg"), "MixtralForCausalLM"),
    "mixtral_cheap_embed_bf16": ("llama", dict(gate_mode="cheap_embed", dtype="bfloat16"), "MixtralForCausalLM"),
    "mixtral_random_noise": ("llama", dict(gate_mode="random", noise=dict(noise_scale=0.01, residual_scale=0.5)),
                             "MixtralForCausalLM"),
    "mixtral_uniform_random": ("llama", dict(gate_mode="uniform_random"), "MixtralForCausalLM"),
    "deepseek_shared_noise": ("llama", dict(gate_mode="hidden", architecture="deepseek", noise=dict(noise_scale=0.01),
                                            shared=dict(residual_scale=0.3, noise_scale=0.02)), "DeepseekForCausalLM"),
    "qwen_moe_from_llama": ("llama", dict(gate_mode="cheap_embed", shared=dict(positive_prompts=["w5"])),
                            "Qwen2MoeForCausalLM"),
    "qwen_moe_qwen2_noise": ("qwen2", dict(gate_mode="hidden", noise=dict(noise_scale=0.01),
                                           shared=dict(positive_prompts=["w5"], noise_scale=0.01)),
                             "Qwen2MoeForCausalLM"),
    "qwen3_moe_top1": ("qwen3", dict(gate_mode="hidden", experts_per_token=1), "Qwen3MoeForCausalLM"),
    "qwen3_moe_random_noise": ("qwen3", dict(gate_mode="random", noise=dict(noise_scale=0.05)),
                               "Qwen3MoeForCausalLM"),
}


def _config(families, case: str) -> dict:
    kind, spec, _ = CASES[case]
    spec = dict(spec)
    fam = families[kind]
    raw = dict(base_model=str(fam / "base"), experts=_experts(fam, **spec.pop("noise", {})))
    shared = spec.pop("shared", None)
    if shared is not None:
        raw["shared_experts"] = [dict(source_model=str(fam / "ft2"), **shared)]
    return {**raw, **spec}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_tensor_and_the_config_are_mergekit_moes(families, tmp_path, case):
    raw = _config(families, case)
    theirs = _mergekit(raw, tmp_path / "mergekit")
    ours = _ours(raw, tmp_path / "ours", gate_dtype="bfloat16")
    a, b = _tensors(theirs), _tensors(ours)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (theirs, ours))
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb and cb["architectures"] == [CASES[case][2]]
    assert (ours / "mergekit_moe_config.yml").is_file() is False  # a parsed config has no text to keep
    assert "# Mixture of experts" in (ours / "README.md").read_text()


def test_float32_gates_are_within_the_stated_tolerance_of_mergekits_bfloat16(families, tmp_path):
    """Our default computes the hidden states in float32; mergekit in bfloat16.  The unit-length router rows
    differ by less than 1e-2 (measured 2.1e-3 here), every other tensor is identical."""
    raw = _config(families, "mixtral_hidden_fp32")
    a, b = _tensors(_mergekit(raw, tmp_path / "mergekit")), _tensors(_ours(raw, tmp_path / "ours"))
    for k in a:
        if k.endswith("mlp.gate.weight"):
            assert 0 < (a[k] - b[k]).abs().max() < 1e-2
            torch.testing.assert_close(b[k].norm(dim=-1), torch.ones(3))
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", ["mixtral_hidden_fp32", "qwen_moe_qwen2_noise", "qwen3_moe_top1"])
def test_transformers_loads_and_generates_with_the_output(families, tmp_path, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _ours(_config(families, case), tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == CASES[case][2]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids.shape[1] + 4)


def test_an_moe_of_copies_of_one_model_computes_that_model(families, tmp_path):
    """Defining property: with every expert the same MLP, the router's (renormalised) top-k weights sum to one,
    so the MoE's logits are the dense model's whatever the gates are."""
    from transformers import AutoModelForCausalLM

    fam = families["llama"]
    raw = dict(base_model=str(fam / "ft1"), gate_mode="random",
               experts=[dict(source_model=str(fam / "ft1"))] * 4, experts_per_token=2)
    build_moe(parse_moe_config(raw), tmp_path / "moe", MoEOptions(random_seed=3, quiet=True, allow_all_same=True))
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    dense = AutoModelForCausalLM.from_pretrained(fam / "ft1")
    ids = torch.randint(4, 48, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)


def test_the_cli_takes_mergekit_moes_command_line(families, tmp_path):
    from click.testing import CliRunner

    from submerge.cli import main

    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump({**_config(families, "mixtral_random_noise"), "unknown_key": 1}))
    if not torch.cuda.is_available():  # mergekit's --cuda asks for the GPU: one line where there is none
        from test_safety import assert_one_line_error, run_cli

        assert_one_line_error(run_cli(["moe", cfg, tmp_path / "gpu", "--cuda", "-q"]), "sees no CUDA device")
    r = CliRunner().invoke(main, ["moe", str(cfg), str(tmp_path / "out"), "--random-seed", "0",
                                  "--device", "cpu", "--lazy-unpickle", "--allow-crimes", "--load-in-4bit",
                                  "--no-copy-tokenizer", "--out-shard-size", "100KB", "-j", "1", "-q"],
                           standalone_mode=False)
    out = tmp_path / "out"
    assert r.exit_code == 0, r.output
    assert "unknown key 'unknown_key'" in r.output and "--lazy-unpickle ignored" in r.output
    assert (out / "mergekit_moe_config.yml").read_text() == cfg.read_text()
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors.index.json").is_file()
    theirs = _tensors(_mergekit(_config(families, "mixtral_random_noise"), tmp_path / "mergekit"))
    ours = _tensors(out)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(experts_per_token=0), "experts_per_token must be >= 1"),
    (lambda c: c.update(experts_per_token=4), "at least as many experts"),
    (lambda c: c["experts"][1].pop("positive_prompts"), "expert 1"),
    (lambda c: [e.update(positive_prompts=["w1"], negative_prompts=None) for e in c["experts"]], "same positive"),
    (lambda c: [e.update(source_model=c["experts"][0]["source_model"]) for e in c["experts"]], "same model"),
    (lambda c: c.update(gate_mode="hiden"), "gate_mode: 'hiden' is not one of hidden"),
    (lambda c: c.update(dtype="float8"), "dtype: 'float8'"),
    (lambda c: c.update(architecture="qwen3"), "Qwen3 MoE takes qwen3"),
    (lambda c: c.update(architecture="gpt"), "matches none"),
    (lambda c: c.update(shared_experts=[c["experts"][0], c["experts"][1]]), "no MoE architecture can hold"),
    (lambda c: c["experts"][0].update(noise_scale=float("nan")), "finite"),
    (lambda c: c["experts"][0].update(source_model="/nonexistent/model"), "does not exist"),
])
def test_bad_configs_are_one_line_errors_and_write_nothing(families, tmp_path, edit, fragment):
    from test_safety import assert_one_line_error, run_cli

    raw = _config(families, "mixtral_hidden_fp32")
    edit(raw)
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(raw))
    assert_one_line_error(run_cli(["moe", cfg, tmp_path / "out", "-q"]), fragment)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["moe.yml"]


def test_an_out_holding_an_input_is_refused_and_a_mixed_family_is_one_line(families, tmp_path):
    from test_safety import assert_one_line_error, run_cli

    fam = families["llama"]
    raw = _config(families, "mixtral_hidden_fp32")
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(raw))
    before = sorted(p.name for p in (fam / "ft0").iterdir())
    for out in (fam / "ft0", fam, fam / "base"):
        assert_one_line_error(run_cli(["moe", cfg, out, "--overwrite", "-q"]), "")
    assert sorted(p.name for p in (fam / "ft0").iterdir()) == before
    raw["experts"][2]["source_model"] = str(families["qwen2"] / "ft2")
    cfg.write_text(yaml.safe_dump(raw))
    assert_one_line_error(run_cli(["moe", cfg, tmp_path / "out", "-q"]), "one architecture")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_moe_config({**raw, "experts_per_tok": 2}, strict=True)


def test_calibration_gates_are_each_experts_centred_mean_mlp_input(families, tmp_path):
    """submerge's gate_mode calibration: no prompts; router row t of layer L is expert t's mean input of that
    layer's MLP (``submerge calibrate`` on its own task's texts), centred on the experts' mean, unit length."""
    from transformers import AutoModelForCausalLM

    from submerge.stats.gram import calibrate_model_dir
    from submerge.stats.load import load_stats

    fam = families["llama"]
    experts = []
    for i in range(3):
        texts = [" ".join(f"w{(7 * i + j + k) % 30}" for k in range(5)) for j in range(12)]
        calibrate_model_dir(fam / f"ft{i}", texts, tmp_path / f"cal{i}", n=12, max_length=16, progress=False)
        experts.append(dict(source_model=str(fam / f"ft{i}"), calibration=str(tmp_path / f"cal{i}")))
    raw = dict(base_model=str(fam / "base"), gate_mode="calibration", experts=experts, dtype="float32")
    out = _ours(raw, tmp_path / "moe")
    got = _tensors(out)
    for layer in range(2):
        means = torch.stack([load_stats(tmp_path / f"cal{i}").lookup(f"model.layers.{layer}.mlp.gate_proj.weight")
                             .mean.double() for i in range(3)])
        want = means - means.mean(0)
        want = (want / want.norm(dim=-1, keepdim=True)).float()
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.gate.weight"], want)
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "MixtralForCausalLM"
    experts[1].pop("calibration")
    with pytest.raises(ConfigError, match="give calibration: FOLDER"):
        _ours(dict(raw, experts=experts), tmp_path / "moe2")


def test_an_expert_may_be_a_lora_adapter_on_a_model(families, tmp_path):
    """``base+adapter`` as an expert (mergekit's LoRA syntax): its MLPs are the adapter merged into the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fam = families["llama"]
    torch.manual_seed(5)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(fam / "ft1"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    dense = peft_model.merge_and_unload().state_dict()
    raw = dict(base_model=str(fam / "base"), gate_mode="random", dtype="float32",
               experts=[dict(source_model=str(fam / "ft0")), dict(source_model=f"{fam / 'ft1'}+{tmp_path / 'adapter'}")])
    got = _tensors(_ours(raw, tmp_path / "moe"))
    for layer in range(2):
        gate_up = got[f"model.layers.{layer}.mlp.experts.gate_up_proj"][1]
        want = torch.cat([dense[f"model.layers.{layer}.mlp.gate_proj.weight"],
                          dense[f"model.layers.{layer}.mlp.up_proj.weight"]])
        torch.testing.assert_close(gate_up, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.experts.down_proj"][1],
                                   dense[f"model.layers.{layer}.mlp.down_proj.weight"], rtol=1e-5, atol=1e-6)


def test_device_auto_is_the_gpu_when_there_is_one(families, tmp_path):
    """``--device auto`` (merge, calibrate, moe): the GPU torch sees, else the CPU; a merge with it gives the
    tensors of ``--device cpu`` on a machine without a GPU."""
    from submerge.api import merge
    from submerge.device import parse_device

    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else parse_device("auto").type)
    if not torch.cuda.is_available():
        assert parse_device("auto").type in ("cpu", "mps")
        fam = families["llama"]
        cfg = {"merge_method": "ties", "base_model": str(fam / "base"), "dtype": "float32",
               "models": [{"model": str(fam / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
                          for i in range(2)]}
        a = _tensors(merge(cfg, tmp_path / "a", quiet=True, device="auto").out_dir)
        b = _tensors(merge(cfg, tmp_path / "b", quiet=True, device="cpu").out_dir)
        assert all(torch.equal(a[k], b[k]) for k in a)
    raw = _config(families, "mixtral_random_noise")
    _ours(raw, tmp_path / "moe", device="auto")
    with pytest.raises(ConfigError, match="unknown device 'gpu0': use auto"):
        _ours(raw, tmp_path / "moe2", device="gpu0")
