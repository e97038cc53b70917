"""mergekit's own example configs (examples/ in arcee-ai/mergekit) run unchanged: their Hub ids resolve to small
local models of the same architecture laid out in a Hub cache, and the tensors equal mergekit 0.1.5's."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml

import submerge
from conftest import load_dir
from submerge.synthetic import llama_config, make_family
from test_hub import lay_out_cache

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

# The example configs as mergekit's repository ships them (comments dropped).
EXAMPLES = {
    "linear": """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              weight: 1.0
          - model: WizardLM/WizardLM-13B-V1.2
            parameters:
              weight: 0.3
          - model: garage-bAInd/Platypus2-13B
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
    """,
    "ties": """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              density: [1, 0.7, 0.1]
              weight: 1.0
          - model: garage-bAInd/Platypus2-13B
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1]
          - model: WizardLM/WizardMath-13B-V1.0
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: TheBloke/Llama-2-13B-fp16
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
    """,
    "gradient-slerp": """
        slices:
          - sources:
              - model: psmathur/orca_mini_v3_13b
                layer_range: [0, 40]
              - model: garage-bAInd/Platypus2-13B
                layer_range: [0, 40]
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float16
    """,
    "orcamini-platy-44layer": """
        slices:
          - sources:
            - model: psmathur/orca_mini_v3_13b
              layer_range: [0, 24]
          - sources:
            - model: garage-bAInd/Platypus2-13B
              layer_range: [20, 40]
        merge_method: passthrough
        dtype: float16
    """,
    "bio-merge": """
        models:
          - model: mistralai/Mistral-7B-Instruct-v0.2
            parameters:
              density: 0.5
              weight: 0.5
          - model: BioMistral/BioMistral-7B
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: mistralai/Mistral-7B-v0.1
        parameters:
          normalize: false
          int8_mask: true
        dtype: float16
    """,
    "arcee_fusion": """
        models:
          - model: model_a
          - model: model_b
        merge_method: arcee_fusion
        base_model: model_a
        dtype: bfloat16
    """,
}

SAME_OPS = {"ties", "bio-merge", "arcee_fusion"}  # compared with --compute-dtype = the config dtype
TIES = {"ties", "bio-merge"}
LLAMA2_13B = ["TheBloke/Llama-2-13B-fp16", "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B",
              "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardMath-13B-V1.0"]
MISTRAL_7B = ["mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Small models of the examples' architectures (40-layer Llama-2 13B shape, Mistral), in a Hub cache."""
    from transformers import MistralConfig

    root = tmp_path_factory.mktemp("examples")
    hf_home = root / "hf"
    local = {}
    base, fts = make_family(root / "llama2", config=llama_config(hidden=16, layers=40, heads=2, inter=32, vocab=64),
                            n_finetunes=4, dtype=torch.float16, seed=3)
    for repo, path in zip(LLAMA2_13B, [base, *fts]):
        local[repo] = lay_out_cache(hf_home, repo, path)
    mistral = MistralConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=64, max_position_embeddings=128, tie_word_embeddings=False)
    base, fts = make_family(root / "mistral", config=mistral, n_finetunes=2, dtype=torch.float16, seed=4)
    for repo, path in zip(MISTRAL_7B, [base, *fts]):
        local[repo] = lay_out_cache(hf_home, repo, path)
    cwd = root / "fusion"
    base, fts = make_family(cwd, config=llama_config(layers=2), n_finetunes=1, dtype=torch.bfloat16, seed=5)
    base.rename(cwd / "model_a")
    fts[0].rename(cwd / "model_b")
    return hf_home, local, cwd


def _input_scale(plan, name):
    job = next(j for j in plan.jobs if j.out_name == name)
    refs = job.inputs + ([job.base] if job.base else []) if job.copy_from is None else [job.copy_from]
    return torch.stack([plan.models[k].read(n).double().abs() for k, n in refs]).amax(0)


def _threshold_ties(plan, name):
    """Entries of tensor ``name`` whose 16-bit task-vector magnitude, in some model, equals that model's
    top-k threshold (k = max(1, int(density * n)), as TIES prunes)."""
    job = next(j for j in plan.jobs if j.out_name == name)
    base = plan.models[job.base[0]].read(job.base[1]).half()
    ties = torch.zeros(base.shape, dtype=torch.bool)
    for (key, tname), density in zip(job.inputs, job.params["density"]):
        d = (plan.models[key].read(tname).half() - base).abs().float().reshape(-1)
        if density >= 1:
            continue
        k = max(1, int(density * d.numel()))
        thr = torch.kthvalue(d, d.numel() - k + 1).values
        ties |= (d == thr).reshape(base.shape)
    return ties


def _local(cfg, local):
    """The same config with each Hub id replaced by its local snapshot (mergekit's side of the comparison)."""
    text = json.dumps(cfg)
    for repo, path in local.items():
        text = text.replace(f'"{repo}"', json.dumps(str(path)))
    return json.loads(text)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_mergekit_example_runs_unchanged(name, stand_ins, tmp_path, monkeypatch):
    hf_home, local, cwd = stand_ins
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(cwd)
    cfg = yaml.safe_load(textwrap.dedent(EXAMPLES[name]))
    path = cwd / f"{name}.yml"
    path.write_text(textwrap.dedent(EXAMPLES[name]))
    submerge.validate(path)
    sm = tmp_path / "sm"
    # mergekit computes in the config's dtype; --compute-dtype does the same (submerge's default, float32 math
    # rounded once, is more exact and differs where a top-k threshold falls between 16-bit ties)
    submerge.merge(path, sm, quiet=True, compute_dtype=cfg["dtype"] if name in SAME_OPS else "float32")
    mk = tmp_path / "mk"
    run_merge(MergeConfiguration.model_validate(_local(cfg, local)), str(mk),
              options=MergeOptions(quiet=True, write_model_card=False))
    a, b = load_dir(mk), load_dir(sm)
    if name == "arcee_fusion":
        # mergekit 0.1.5's arcee_fusion promotes to float32 (its mask is a float32 tensor) and writes float32
        # although the config says bfloat16; submerge writes the configured dtype: compare in it
        assert all(v.dtype == torch.float32 for v in a.values())
        a = {k: v.to(b[k].dtype) for k, v in a.items()}
    assert set(a) == set(b)
    plan = submerge.validate(path)
    worst, tie_breaks = 0.0, 0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # compare in units of the 16-bit spacing at the largest input or output value of each entry (16-bit
        # math rounds at the inputs' scale; a result that cancels to ~0 keeps that absolute error)
        x, y = a[k].double(), b[k].double()
        mag = torch.maximum(torch.maximum(x.abs(), y.abs()), _input_scale(plan, k)).clamp_min(2.0 ** -14)
        ulp = torch.exp2(torch.floor(torch.log2(mag))) * (2.0 ** -10 if a[k].dtype == torch.float16 else 2.0 ** -7)
        off = (x - y).abs() / ulp > 2.0
        if name in TIES and off.any():
            # TIES in 16-bit math: task-vector magnitudes tie often, and which of the tied entries at the top-k
            # threshold survive is an arbitrary choice (mergekit: torch.argsort's order; submerge: by position).
            # Every differing entry must be such a tie at some model's threshold.
            ties = _threshold_ties(plan, k)
            assert bool((off & ~ties).sum() == 0), k
            tie_breaks += int(off.sum())
        else:
            off = torch.zeros_like(off)
        worst = max(worst, ((x - y).abs() / ulp)[~off].max().item() if (~off).any() else 0.0)
    assert worst <= 2.0, worst
    if name in TIES:
        n = sum(v.numel() for v in a.values())
        assert tie_breaks <= 1e-2 * n, (tie_breaks, n)  # ties at thresholds only (0.3% here), not another merge
    ca, cb = json.loads((mk / "config.json").read_text()), json.loads((sm / "config.json").read_text())
    assert ca["num_hidden_layers"] == cb["num_hidden_layers"]
    if name == "orcamini-platy-44layer":
        assert cb["num_hidden_layers"] == 44
    card = (sm / "README.md").read_text()
    for repo in local:
        if repo in EXAMPLES[name]:
            assert "0123456789abcdef" in card  # the resolved commit is recorded
