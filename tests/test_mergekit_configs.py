"""Merge configs people published in their models' cards (the "Configuration" section mergekit writes), run
unchanged: submerge accepts what mergekit 0.1.5 accepts, warns about (and ignores, as mergekit does) the keys
and parameters mergekit ignores, and gives mergekit's tensors.  Each config's Hub ids resolve to small stand-in
models of one Llama-like architecture (2 layers: a slice's layer_range is cut to them) laid out in a Hub cache.
To compare tensors without 16-bit rounding noise both tools also run each config with ``dtype: float32``, and
DELLA configs with every entry kept (the two tools draw from different random streams)."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
import yaml
from click.testing import CliRunner

import submerge
from conftest import load_dir
from submerge.cli import main
from submerge.errors import ConfigError
from test_hub import lay_out_cache
from test_tokenizer_merge import _tokenizer

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

# name -> (the config as its model card gives it, the warnings submerge prints: fragments, one per warning)
CONFIGS = {
    # a Mistral-Nemo SCE merge over a base with a LoRA; `normalize` is not an SCE parameter
    "sce-lora-base": ("""
        base_model: PocketDoc/Dans-PersonalityEngine-V1.1.0-12b+nbeerbower/Mistral-Nemo-12B-abliterated-LORA
        models:
          - model: Elizezen/Himeyuri-v0.1-12B
          - model: inflatebot/MN-12B-Mag-Mell-R1
          - model: NeverSleep/Lumimaid-v0.2-12B
          - model: LatitudeGames/Wayfarer-12B
        merge_method: sce
        dtype: bfloat16
        parameters:
          normalize: true
          select_topk: 0.5
    """, ["parameter 'normalize' is not used by sce"]),
    # a Llama-3.3 SCE stage: select_topk at the top level and a misspelled 'dype' (mergekit ignores both)
    "sce-toplevel-keys": ("""
        models:
          - model: OpenBuddy/openbuddy-llama3.3-70b-v24.1-131k
          - model: nbeerbower/llama3.1-kartoffeldes-70B
          - model: tokyotech-llm/Llama-3.1-Swallow-70B-Instruct-v0.3
          - model: SicariusSicariiStuff/Negative_LLAMA_70B
        select_topk: .15
        merge_method: sce
        base_model: meta-llama/Llama-3.3-70B-Instruct
        out_dtype: bfloat16
        dype: float32
        tokenizer:
          source: base
    """, ["unknown key 'select_topk'", "unknown key 'dype' (did you mean dtype?)"]),
    # a Llama-3.2-1B SCE merge with every parameter its author knew of
    "sce-every-parameter": ("""
        models:
          - model: CodeAtCMU/Llama-3.2-1B-GenerativePerturbations_full_sft_code_data_120K_imaginary
            parameters:
              weight: 1.0
              density: 0.9
          - model: Novaciano/Alice-In-The-Dark-RP-NSFW-3.2-1B
            parameters:
              weight: 1.0
              density: 0.9
        merge_method: sce
        base_model: Novaciano/SEX_ROLEPLAY-3.2-1B
        parameters:
          normalize: true
          int8_mask: true
          rescale: true
          filter_wise: false
          smooth: false
          allow_negative_weights: false
          lambda: 1.0
          select_topk: 0.1
        tokenizer:
          source: union
        chat_template: auto
        dtype: bfloat16
        out_dtype: bfloat16
    """, ["'density' is not used by sce", "'density' is not used by sce", "'normalize' is not used",
          "'rescale' is not used", "'filter_wise' is not used", "'smooth' is not used",
          "'allow_negative_weights' is not used", "'lambda' is not used", "'weight' is not used by sce",
          "'weight' is not used by sce"]),
    # the first stage of a multi-stage card: a top-level name
    "karcher-named": ("""
        name: First
        models:
          - model: Vortex5/Harmonic-Moon-12B
          - model: Vortex5/Scarlet-Ink-12B
        merge_method: karcher
        dtype: bfloat16
        parameters:
          tol: 1e-10
          max_iter: 1200
        tokenizer:
          source: union
    """, ["unknown key 'name'"]),
    # a Mistral-Small DELLA-linear merge
    "della-linear-union": ("""
        models:
          - model: zerofata/MS3.2-PaintedFantasy-v2-24B
            parameters:
              weight: 0.2
              density: 0.5
              epsilon: 0.4
          - model: Gryphe/Codex-24B-Small-3.2
            parameters:
              weight: 0.2
              density: 0.5
              epsilon: 0.4
          - model: CrucibleLab/M3.2-24B-Loki-V1.3
            parameters:
              weight: 0.4
              density: 0.4
              epsilon: 0.3
        merge_method: della_linear
        base_model: ConicCat/Mistral-Small-3.2-AntiRep-24B
        parameters:
          lambda: 0.9
          normalize: true
        dtype: bfloat16
        tokenizer:
         source: union
    """, []),
    # a Mistral-Nemo DELLA-linear merge with filtered weights, int8_mask and a chat template
    "della-linear-filters": ("""
        models:
          - model: TheDrummer/UnslopNemo-12B-v4
            parameters:
              weight:
                - filter: self_attn
                  value: 0.3
                - filter: mlp
                  value: 0.15
                - value: 0.2
              density: 0.6
          - model: inflatebot/MN-12B-Mag-Mell-R1
            parameters:
              weight:
                - filter: self_attn
                  value: 0.2
                - filter: mlp
                  value: 0.35
                - value: 0.3
              density: 0.75
          - model: DavidAU/MN-GRAND-Gutenberg-Lyra4-Lyra-12B-DARKNESS
            parameters:
              weight:
                - filter: mlp
                  value: 0.35
                - value: 0.25
              density: 0.7
        base_model: TheDrummer/UnslopNemo-12B-v4
        merge_method: della_linear
        dtype: bfloat16
        chat_template: "chatml"
        tokenizer_source: union
        parameters:
          normalize: true
          int8_mask: true
          epsilon: 0.05
          lambda: 1
    """, []),
    # a Llama-3 DELLA merge (the base is not among the models)
    "della-llama3": ("""
        base_model:  SicariusSicariiStuff/Wingless_Imp_8B
        merge_method: della
        models:
          - model: NeverSleep/Lumimaid-v0.2-8B
            parameters:
              weight: 0.5
          - model: Sao10K/L3-8B-Lunaris-v1
            parameters:
              weight: 0.5
        parameters:
          density: 0.5
          normalize: true
          epsilon: 0.4
          lambda: 1
        tokenizer_source: union
        chat_template: "llama3"
    """, []),
    # a Llama-3.2-1B Arcee Fusion merge whose author gave per-model weights (arcee_fusion reads none)
    "arcee-fusion-weights": ("""
        dtype: float32
        out_dtype: bfloat16
        merge_method: arcee_fusion
        base_model: bunnycore/FuseChat-3.2-1B-Creative-RP
        models:
            - model: bunnycore/FuseChat-3.2-1B-Creative-RP
              parameters:
                weight:
                  - filter: mlp
                    value: [1, 2]
                  - value: 1
            - model: Novaciano/Novaciano_Perturbations-3.2-1B
              parameters:
                weight:
                  - filter: lm_head
                    value: 1
                  - value: [1, 0.5]
    """, ["'weight' is not used by arcee_fusion", "'weight' is not used by arcee_fusion"]),
    # a Mistral-Nemo Model Stock merge with per-model weights (model_stock reads none)
    "model-stock-weights": ("""
        dtype: float32
        out_dtype: bfloat16
        merge_method: model_stock
        base_model: mistralai/Mistral-Nemo-Instruct-2407
        models:
            - model: mergekit-community/MN-Hekate-Limenoskopos-12B
              parameters:
                weight:
                  - filter: mlp
                    value: [2, 1]
                  - value: 1
            - model: mergekit-community/MN-Hekate-Noctiluca-12B-v2
              parameters:
                weight:
                  - filter: mlp
                    value: [1, 2]
                  - value: 1
    """, ["'weight' is not used by model_stock", "'weight' is not used by model_stock"]),
    # a Llama-3.1 Model Stock merge with a top-level name and a model as the tokenizer source
    "model-stock-named": ("""
        name: ZeroXClem-Llama-3.1-8B-Athena-Apollo-exp
        base_model: mergekit-community/L3.1-Athena-l3-8B
        dtype: bfloat16
        merge_method: model_stock
        models:
          - model: rootxhacker/Apollo-exp-8B
          - model: mergekit-community/L3.1-Athena-k-8B
          - model: mergekit-community/L3.1-Athena-l2-8B
          - model: mergekit-community/L3.1-Athena-l-8B
        tokenizer_source: mergekit-community/L3.1-Athena-l3-8B
    """, ["unknown key 'name'"]),
    # a Model Stock merge over slices, the base one of the sources
    "model-stock-slices": ("""
        slices:
          - sources:
              - model: arcee-ai/Llama-3.1-SuperNova-Lite
                layer_range: [0, 2]
              - model: DreadPoor/Heart_Stolen-8B-Model_Stock
                layer_range: [0, 2]
              - model: Dampfinchen/Llama-3.1-8B-Ultra-Instruct
                layer_range: [0, 2]
        merge_method: model_stock
        base_model: arcee-ai/Llama-3.1-SuperNova-Lite
        dtype: bfloat16
    """, []),
    # a 7B Model Stock merge whose base is also one of the models
    "model-stock-base-in-models": ("""
        models:
          - model: MiniMoog/Mergerix-7b-v0.3
          - model: automerger/Ognoexperiment27Multi_verse_model-7B
          - model: AurelPx/Percival_01-7b-slerp
          - model: automerger/YamshadowExperiment28-7B
        merge_method: model_stock
        base_model: automerger/YamshadowExperiment28-7B
        dtype: bfloat16
    """, []),
    # an older card: the tokenizer named with the legacy "model:" prefix
    "ties-legacy-tokenizer-source": ("""
        models:
          - model: MiniMoog/Mergerix-7b-v0.3
            parameters:
              density: 0.5
              weight: 0.5
          - model: AurelPx/Percival_01-7b-slerp
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: automerger/YamshadowExperiment28-7B
        parameters:
          normalize: true
        tokenizer_source: model:AurelPx/Percival_01-7b-slerp
        dtype: bfloat16
    """, []),
}

LAYERS = 2
HUB_ID = re.compile(r"\b[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*\b")
ADAPTER = "nbeerbower/Mistral-Nemo-12B-abliterated-LORA"


def _repos() -> list[str]:
    out: dict[str, None] = {}
    for text, _ in CONFIGS.values():
        for m in HUB_ID.findall(text):
            if m != ADAPTER and "/" in m and not m.startswith("."):
                out[m] = None
    return list(out)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Every repository the configs name: one small Llama family (a shared BPE tokenizer, 7 fine-tunes used
    round-robin), laid out in a Hub cache; the LoRA repository holds a PEFT adapter for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from submerge.synthetic import llama_config

    root = tmp_path_factory.mktemp("cards")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = llama_config(vocab=len(tok), layers=LAYERS)
    base = AutoModelForCausalLM.from_config(cfg)
    folders = []
    for i in range(8):
        m = AutoModelForCausalLM.from_config(cfg)
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
        folders.append(root / f"m{i}")
    hf = root / "hf"
    local = {repo: lay_out_cache(hf, repo, folders[i % len(folders)]) for i, repo in enumerate(_repos())}
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(folders[0]),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(root / "lora")
    local[ADAPTER] = lay_out_cache(hf, ADAPTER, root / "lora")
    return hf, local


RANDOMIZED = {"della", "della_linear", "dare_ties", "dare_linear"}


def _keep_everything(node) -> None:
    """density 1 and epsilon 0 wherever they are set (and globally): DELLA/DARE keep every entry, so the two
    tools' different random streams draw nothing and the rest of the method (weights, filters, lambda,
    normalize, sign election) is compared entry by entry."""
    if isinstance(node, dict):
        for k in list(node):
            if k in ("density", "epsilon"):
                node[k] = 1.0 if k == "density" else 0.0
            else:
                _keep_everything(node[k])
        if "merge_method" in node:
            node.setdefault("parameters", {})
            node["parameters"] = {**(node["parameters"] or {}), "density": 1.0, "epsilon": 0.0}
    elif isinstance(node, list):
        for x in node:
            _keep_everything(x)


def _localised(text: str, local: dict) -> str:
    """The config with each Hub id replaced by its local snapshot (mergekit's side)."""
    return HUB_ID.sub(lambda m: str(local.get(m.group(0), m.group(0))), text)


@pytest.fixture
def hub_env(stand_ins, monkeypatch, tmp_path):
    hf, local = stand_ins
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    return local


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_published_config_runs_unchanged_with_mergekits_tensors(name, hub_env, tmp_path):
    local = hub_env
    text, warnings = CONFIGS[name]
    text = textwrap.dedent(text)
    path = tmp_path / f"{name}.yml"
    path.write_text(text)
    # unchanged: validate and merge accept it, with one warning per setting mergekit ignores
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 0, r.output
    said = [x for x in r.output.splitlines() if x.startswith("warning: ")]
    assert len(said) == len(warnings), said
    for w, fragment in zip(sorted(said), sorted(warnings)):
        assert fragment in w or any(fragment in x for x in said), (fragment, said)
    r = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "as-written"), "--random-seed", "0", "-q"])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "as-written" / "README.md").read_text()
    assert ("## Ignored settings" in card) == bool(warnings)
    # strict: the first ignored setting is an error
    if warnings:
        with pytest.raises(ConfigError, match="--strict"):
            submerge.validate(path, strict=True)
    # mergekit's tensors (float32 math on both sides)
    raw = yaml.safe_load(text)
    if raw["merge_method"] in RANDOMIZED:
        _keep_everything(raw)
    raw["dtype"] = "float32"
    raw.pop("out_dtype", None)
    f32 = tmp_path / "f32.yml"
    f32.write_text(yaml.safe_dump(raw))
    sm = tmp_path / "sm"
    submerge.merge(f32, sm, quiet=True, random_seed=0)
    mk = tmp_path / "mk"
    if str(raw.get("tokenizer_source", "")).startswith("model:"):  # mergekit 0.1.5 refuses the legacy prefix
        raw["tokenizer_source"] = raw["tokenizer_source"][len("model:"):]
    mk_raw = yaml.safe_load(_localised(yaml.safe_dump(raw), local))
    run_merge(MergeConfiguration.model_validate(mk_raw), str(mk),
              options=MergeOptions(quiet=True, write_model_card=False, random_seed=0,
                                   lora_merge_cache=str(tmp_path / "lora-cache")))
    a, b = load_dir(mk), load_dir(sm)
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), \
            (name, k, (a[k].float() - b[k].float()).abs().max().item())


def test_a_misspelled_parameter_of_the_method_stays_an_error_that_says_what_to_do(hub_env, tmp_path):
    text = textwrap.dedent(CONFIGS["della-llama3"][0]).replace("epsilon: 0.4", "epsilonn: 0.4")
    (tmp_path / "c.yml").write_text(text)
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "c.yml")])
    assert r.exit_code == 2
    assert "parameter 'epsilonn' is not used by della (did you mean epsilon?)" in r.output
    assert "correct it, or remove it" in r.output


def test_a_whole_merge_parameter_set_per_model_is_ignored_with_a_warning(hub_env, tmp_path):
    raw = yaml.safe_load(textwrap.dedent(CONFIGS["della-llama3"][0]))
    raw["models"][0]["parameters"]["lambda"] = 0.7  # mergekit reads lambda globally only
    (tmp_path / "c.yml").write_text(yaml.safe_dump(raw))
    plan = submerge.validate(tmp_path / "c.yml")
    assert len(plan.ignored) == 1 and "applies to the whole merge" in plan.ignored[0]
    with pytest.raises(ConfigError, match="applies to the whole merge.*--strict"):
        submerge.validate(tmp_path / "c.yml", strict=True)
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "c.yml"), str(tmp_path / "o"), "--strict", "-q"])
    assert r.exit_code == 2 and "--strict" in r.output and not (tmp_path / "o").exists()


def test_a_frankenmerge_of_two_vocabularies_is_refused_or_resolved(tmp_path):
    """Slices from models with different vocabulary sizes: mergekit writes embed_tokens from one and lm_head from
    the other (a model transformers cannot load); submerge refuses it, and with a tokenizer block writes one
    vocabulary that loads."""
    from transformers import AutoModelForCausalLM

    from test_tokenizer_merge import vocab_family

    class Factory:
        def mktemp(self, name):
            (tmp_path / name).mkdir()
            return tmp_path / name

    base, paths = vocab_family._get_wrapped_function()(Factory())
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(paths["ft0"]), "layer_range": [1, 2]}]}]}
    with pytest.raises(ConfigError, match="different vocabularies.*lm_head.weight"):
        submerge.validate(cfg)
    out = submerge.merge({**cfg, "tokenizer": {"source": "union"}}, tmp_path / "out", quiet=True).out_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0]
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(6)[None]).logits).all()
