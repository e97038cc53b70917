"""One line, never a traceback: the inputs that raised raw exceptions (issue 11), then property-based
fuzzing (hypothesis) of every input a user hands submerge.  Whatever the input, a command exits 0 or
exits 2 with one line on stderr, no traceback, and nothing written.

The fuzz budget is bounded (a few dozen examples per input kind, no deadline per example) so that the
whole file runs in well under a minute on 2 cores and CI sees the same examples every run;
``SUBMERGE_FUZZ_EXAMPLES=500`` runs a longer, randomised exploration.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from submerge.cli import main

N = int(os.environ.get("SUBMERGE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(deadline=None, database=None, derandomize=not N,  # CI: the same examples every run
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def examples(n: int) -> settings:
    return settings(FUZZ, max_examples=N or n)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama family (base + 2) and a tiny BERT sequence classifier with a tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from submerge.synthetic import llama_config, make_family

    root = tmp_path_factory.mktemp("fuzz")
    base, fts = make_family(root / "llama", config=llama_config(hidden=16, layers=2, heads=2, inter=32, vocab=32),
                            n_finetunes=2)
    words = ["good", "bad", "fine", "movie", "plot", "the", "a"]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, num_labels=2, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = root / "bert"
    BertForSequenceClassification(cfg).save_pretrained(bert)
    tok.save_pretrained(bert)
    (root / "texts.txt").write_text("the good movie\nbad plot\n")
    return {"root": root, "base": base, "fts": fts, "bert": bert}


def run(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def fresh(world) -> Path:
    d = world["root"] / "runs" / uuid.uuid4().hex[:10]
    d.mkdir(parents=True)
    return d


def assert_clean(r, out: Path, ok=(0,)):
    """Exit 0 (where allowed) or exit 2 with exactly one 'error:' line, no traceback, nothing written."""
    if r.exit_code in ok:
        return
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output!r} {r.exception!r}"
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    assert not out.exists(), f"{out} written by a failed run"
    assert not [p for p in out.parent.iterdir() if ".submerge-" in p.name]


def ta(world, models=None) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(world["base"]),
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (models or world["fts"])]}


def model_variant(world, d: Path, config_bytes=None, index=None, header=None) -> Path:
    """A copy of fine-tune 0 with its config.json, index or safetensors header replaced."""
    m = d / "m"
    shutil.copytree(world["fts"][0], m)
    if config_bytes is not None:
        (m / "config.json").write_bytes(config_bytes)
    if index is not None:
        (m / "model.safetensors.index.json").write_bytes(index)
    if header is not None:
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = (m / "model.safetensors").read_bytes()
        (hlen,) = struct.unpack("<Q", data[:8])
        (m / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen:])
    return m


def merge_with(world, d: Path, cfg: dict, *extra):
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    return run(["merge", d / "c.yaml", d / "out", "-q", *extra], d)


# ------------------------------------------------------------------------------ the cases found by hand
@pytest.mark.parametrize("content,fragment", [
    (b"[1, 2, 3]", "must hold a JSON object"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8"),
    (b'"a string"', "must hold a JSON object"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
], ids=["array", "binary", "string", "deep"])
def test_config_json_that_is_not_an_object(world, content, fragment):
    d = fresh(world)
    m = model_variant(world, d, config_bytes=content)
    r = merge_with(world, d, ta(world, [m]))
    assert_clean(r, d / "out", ok=())
    assert fragment in r.output


@pytest.mark.parametrize("index,fragment", [
    ({"weight_map": ["model.safetensors"]}, "needs a 'weight_map' object"),
    ({"weight_map": {"model.norm.weight": 3}}, "plain file names"),
    ({"weight_map": {"model.norm.weight": None}}, "plain file names"),
    ([], "needs a 'weight_map' object"),
])
def test_bad_index(world, index, fragment):
    d = fresh(world)
    m = model_variant(world, d, index=json.dumps(index).encode())
    r = merge_with(world, d, ta(world, [m]))
    assert_clean(r, d / "out", ok=())
    assert fragment in r.output


@pytest.mark.parametrize("shape", [[-1, 16], [2.0, 8], [True, 16], ["4", 4]])
def test_header_shapes_must_be_non_negative_integers(world, shape):
    d = fresh(world)
    m = model_variant(world, d, header={"model.norm.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 64]}})
    r = merge_with(world, d, ta(world, [m]))
    assert_clean(r, d / "out", ok=())
    assert "non-negative integers" in r.output


@pytest.mark.parametrize("name,content,fragment", [
    ("texts.txt", b"caf\xe9 latin-1\n", "not UTF-8"),
    ("texts.json", b'["a", "b"', "not valid JSON"),
    ("texts.json", b'{"a": 1}', "list of strings"),
    ("texts.jsonl", b'{"text": "a"}\n{"text": \n', "not valid JSON"),
    ("ids.pt", b"not a pickle", "cannot load tensors"),
    ("ids.safetensors", b"\x00" * 16, "cannot load tensors"),
])
def test_calibrate_bad_inputs(world, name, content, fragment):
    d = fresh(world)
    (d / name).write_bytes(content)
    r = run(["calibrate", world["bert"], d / name, d / "out", "-q"], d)
    assert_clean(r, d / "out", ok=())
    assert fragment in r.output


def test_calibrate_token_ids_outside_the_vocabulary(world):
    d = fresh(world)
    torch.save({"input_ids": torch.tensor([[1, 2, 500]])}, d / "ids.pt")
    r = run(["calibrate", world["bert"], d / "ids.pt", d / "out", "-q"], d)
    assert_clean(r, d / "out", ok=())
    assert "outside the model's vocabulary" in r.output


@pytest.mark.parametrize("cmd,option,value,fragment", [
    ("calibrate", "--batch-size", "0", "range"),
    ("calibrate", "-n", "-3", "range"),
    ("calibrate", "--device", "bogus", "unknown device"),
    ("calibrate", "--device", "cuda", "no CUDA device"),
    ("fisher", "--max-length", "0", "range"),
    ("fisher", "--device", "cuda:7", "CUDA"),
    ("merge", "--threads", "-1", "range"),
    ("merge", "--device", "bogus", "unknown device"),
    ("merge", "--device", "cuda", "no CUDA device"),
    ("merge", "--out-shard-size", "1e999", "between 1 byte and 1 PB"),
    ("merge", "--out-shard-size", "-5GB", "cannot parse size"),
    ("merge", "--out-shard-size", "0", "between 1 byte"),
])
def test_bad_numeric_and_device_options(world, cmd, option, value, fragment):
    if value.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = fresh(world)
    if cmd == "merge":
        (d / "c.yaml").write_text(yaml.safe_dump(ta(world)))
        args = ["merge", d / "c.yaml", d / "out", option, value, "-q"]
    else:
        args = [cmd, world["bert"], world["root"] / "texts.txt", d / "out", option, value, "-q"]
    r = run(args, d)
    assert_clean(r, d / "out", ok=())
    assert fragment in r.output


def _stats_folder(world, d: Path, kind: str) -> Path:
    """A real calibration (or Fisher) folder of the BERT model, for corrupting."""
    out = d / f"{kind}-stats"
    cmd = "calibrate" if kind == "calibration" else "fisher"
    r = run([cmd, world["bert"], world["root"] / "texts.txt", out, "-n", "2", "-q"], d)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("kind,method,corrupt,fragment", [
    ("calibration", "regmean", lambda p: (p / "manifest.json").write_text("[]"), "corrupt manifest"),
    ("calibration", "regmean", lambda p: (p / "manifest.json").write_bytes(b"\xff\x00"), "not UTF-8"),
    ("calibration", "regmean", lambda p: (p / "manifest.json").write_text(
        json.dumps({"format": "submerge-calibration/1", "layers": {"x": {"d_in": "big"}}})), "corrupt manifest"),
    ("calibration", "regmean", lambda p: (p / "stats.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      "),
     "lacks the statistics"),
    ("fisher", "fisher", lambda p: (p / "fisher.json").write_text("{"), "corrupt manifest"),
    ("fisher", "fisher", lambda p: (p / "fisher.safetensors").write_bytes(b"junk"), "safetensors"),
])
def test_corrupt_statistics_at_merge_time(world, kind, method, corrupt, fragment):
    d = fresh(world)
    stats = _stats_folder(world, d, kind)
    corrupt(stats)
    b = world["bert"]
    cfg = {"merge_method": method, "models": [{"model": str(b), "calibration": str(stats)},
                                              {"model": str(b), "calibration": str(stats)}]}
    r = merge_with(world, d, cfg)
    assert_clean(r, d / "out", ok=())
    assert fragment in r.output


@pytest.mark.parametrize("label", [-1, 1.7, 2, True, "neutral", None])
def test_fisher_labels_must_be_classes(world, label):
    d = fresh(world)
    rows = [{"text": "the good movie", "label": 0}, {"text": "bad plot", "label": label}]
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = run(["fisher", world["bert"], d / "data.jsonl", d / "out", "--kind", "empirical", "--label-field", "label",
             "-q"], d)
    assert_clean(r, d / "out", ok=())
    assert "not a class of the model" in r.output


def test_python_api_fisher_labels_are_checked():
    from submerge.errors import ConfigError
    from submerge.stats.fisher import fisher_diagonal

    lin = torch.nn.Linear(3, 2)
    xs = list(torch.randn(2, 3))
    for labels in ([0, -1], [0, 1.7], [0, 2]):
        with pytest.raises(ConfigError, match="class index"):
            fisher_diagonal(lin, xs, lambda m, x: torch.log_softmax(m(x), -1), kind="empirical", labels=labels,
                            progress=False)


@pytest.mark.parametrize("text,fragment", [
    ("merge_method: linear\nmerge_method: ties\nmodels: [{model: a}]\n", "duplicate key 'merge_method'"),
    ("models:\n  - model: a\n    model: b\nmerge_method: linear\n", "duplicate key 'model'"),
    ("[" * 20000 + "]" * 20000, "nested too deeply"),
    ("a: " + "{b: " * 500 + "1" + "}" * 500, "nested"),
    ("merge_method: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("\x00\x01\x02", "not valid YAML"),
], ids=["dup-root", "dup-model", "deep-flow", "deep-map", "python-tag", "control-chars"])
def test_yaml_duplicates_and_depth(world, text, fragment):
    d = fresh(world)
    (d / "c.yaml").write_text(text)
    for args in (["merge", d / "c.yaml", d / "out", "-q"], ["validate", d / "c.yaml"]):
        r = run(args, d)
        assert_clean(r, d / "out", ok=())
        assert fragment in r.output


# ------------------------------------------------------------------------------ property-based fuzzing
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
CONFIG_KEYS = ["merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "model", "weight", "density", "lambda", "layer_range", "sources", "filter",
               "value", "calibration", "t", "normalize"]
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "tsv", "esm", "regmean", "bogus"]


@st.composite
def mutated_configs(draw, world):
    """A valid task-arithmetic config with a few random edits: keys, values, structure."""
    cfg = ta(world)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["root", "model", "params"]))
        models = cfg.get("models")
        first = models[0] if isinstance(models, list) and models and isinstance(models[0], dict) else None
        params = first.get("parameters") if first is not None else None
        target = {"root": cfg, "model": first, "params": params if isinstance(params, dict) else None}[where]
        if target is None:
            target, where = cfg, "root"
        _edit(draw, target, CONFIG_KEYS, lambda k: ("merge_method" if where == "root" else k, METHODS),
              [str(world["fts"][0]), "/nonexistent", "..", "", "org/name"])
    return cfg


def _edit(draw, target: dict, keys: list, named: Callable, paths: list) -> None:
    """One random edit of ``target``: a random value, a key removed, ``named(key)``'s (key, choices), a path."""
    key = draw(st.sampled_from(keys) | st.text(max_size=6))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        target[key] = draw(json_values)
    elif choice == 1:
        target.pop(key, None)
    elif choice == 2:
        name, choices = named(key)
        target[name] = draw(st.sampled_from(choices))
    else:
        target[key] = draw(st.sampled_from(paths))


def _config_text(data, configs, junk: list[str]) -> str:
    """Half the time a mutated config as YAML, half the time random or broken text."""
    if data.draw(st.booleans()):
        return yaml.safe_dump(data.draw(configs), allow_unicode=True)
    return data.draw(st.text(max_size=200) | st.sampled_from(junk))


@given(data=st.data())
@examples(60)
def test_fuzz_config_yaml(world, data):
    d = fresh(world)
    (d / "c.yaml").write_text(_config_text(data, mutated_configs(world), ["", "---", "a: [", "{{}", "- - -"]))
    r = run(["merge", d / "c.yaml", d / "out", "-q"], d)
    assert_clean(r, d / "out")
    if r.exit_code == 0:
        assert (d / "out" / "model.safetensors").exists() or (d / "out" / "model.safetensors.index.json").exists()


@given(content=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64)))
@examples(40)
def test_fuzz_config_json(world, content):
    d = fresh(world)
    m = model_variant(world, d, config_bytes=content)
    assert_clean(merge_with(world, d, ta(world, [m])), d / "out")


@given(index=st.one_of(json_values, st.fixed_dictionaries(
    {"weight_map": st.dictionaries(st.sampled_from(["model.norm.weight", "lm_head.weight", "x"]),
                                   st.one_of(st.sampled_from(["model.safetensors", "../m/model.safetensors",
                                                              "/etc/passwd", ".", "", "nope.safetensors"]),
                                             scalars), max_size=3)})))
@examples(40)
def test_fuzz_index_json(world, index):
    d = fresh(world)
    m = model_variant(world, d, index=json.dumps(index).encode())
    assert_clean(merge_with(world, d, ta(world, [m])), d / "out")


header_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "X99"]) | scalars,
    "shape": st.lists(st.integers(-3, 40) | st.floats(0, 40) | scalars, max_size=3) | scalars,
    "data_offsets": st.lists(st.integers(-8, 10**6) | scalars, min_size=0, max_size=3) | scalars,
})


@given(entries=st.dictionaries(st.sampled_from(["model.norm.weight", "lm_head.weight", "__metadata__", "junk"]),
                               header_entries | json_values, min_size=1, max_size=3))
@examples(60)
def test_fuzz_safetensors_header(world, entries):
    d = fresh(world)
    m = model_variant(world, d, header=entries)
    assert_clean(merge_with(world, d, ta(world, [m])), d / "out")


@given(name=st.sampled_from(["in.txt", "in.json", "in.jsonl", "in.pt", "in.safetensors"]),
       content=st.one_of(st.binary(max_size=80), json_values.map(lambda v: json.dumps(v).encode()),
                         st.lists(json_values, max_size=3).map(
                             lambda rows: "\n".join(json.dumps(r) for r in rows).encode())))
@examples(15)
def test_fuzz_calibrate_and_fisher_inputs(world, name, content):
    d = fresh(world)
    (d / name).write_bytes(content)
    for cmd in ("calibrate", "fisher"):
        out = d / f"out-{cmd}"
        r = run([cmd, world["bert"], d / name, out, "-n", "2", "-q"], d)
        assert_clean(r, out)


numeric = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True).map(repr),
                    st.sampled_from(["", "1e999", "-0", "0x10", "5GB", "2GiB", "1.5", "nan", "inf", "cuda", "cpu"]),
                    st.text(max_size=6))


@given(option=st.sampled_from(["--threads", "--out-shard-size", "--device", "--random-seed", "--compute-dtype"]),
       value=numeric)
@examples(40)
def test_fuzz_merge_options(world, option, value):
    d = fresh(world)
    (d / "c.yaml").write_text(yaml.safe_dump(ta(world)))
    r = run(["merge", d / "c.yaml", d / "out", option, value, "-q"], d)
    assert_clean(r, d / "out")


@given(cmd=st.sampled_from(["calibrate", "fisher"]),
       option=st.sampled_from(["-n", "--batch-size", "--max-length", "--seed", "--device", "--layers"]),
       value=numeric)
@examples(30)
def test_fuzz_calibrate_fisher_options(world, cmd, option, value):
    if cmd == "fisher" and option == "--batch-size" or cmd == "fisher" and option == "--layers":
        option = "-n"
    d = fresh(world)
    r = run([cmd, world["bert"], world["root"] / "texts.txt", d / "out", option, value, "-q"], d)
    assert_clean(r, d / "out")


# ------------------------------------------------------------------------------ the surfaces of issue 28
@pytest.fixture(scope="module")
def world2(world):
    """More inputs: a BERT expert with eval data and a tune config, a LoRA adapter on the Llama base, a Hub cache
    holding the Llama fine-tune, analyze / surgery / align inputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    root = world["root"] / "world2"
    root.mkdir()
    torch.manual_seed(1)
    expert = BertForSequenceClassification.from_pretrained(world["bert"])
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expert.save_pretrained(root / "expert")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (world["bert"] / f).exists():
            shutil.copy(world["bert"] / f, root / "expert" / f)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["the good movie", "bad plot", "a fine plot", "bad"])]
    (root / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(world["base"], torch_dtype=torch.float32),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    from test_hub import lay_out_cache

    lay_out_cache(root / "hf", "org/m", world["fts"][0])
    return {**world, "w2": root, "expert": root / "expert", "val": root / "val.jsonl", "adapter": root / "adapter",
            "hf": root / "hf"}


def tune_config(w) -> dict:
    return {"base_model": str(w["bert"]),
            "models": [{"model": str(w["expert"]), "name": "a"}, {"model": str(w["bert"]), "name": "b"}],
            "search": [{"method": "task_arithmetic", "weight": 1.0, "lambda": [0.5, 1.0]}],
            "eval": {"scorer": "classification", "max_length": 8, "tasks": {"a": {"data": str(w["val"])},
                                                                            "b": {"data": str(w["val"])}}},
            "objective": "mean"}


COMMIT_HASH = "0123456789abcdef0123456789abcdef01234567"  # the commit test_hub's lay_out_cache writes
TUNE_KEYS = ["search", "eval", "objective", "method", "lambda", "weight", "density", "scorer", "data", "options",
             "field", "label_field", "max_length", "n", "batch_size", "range", "step", "steps", "strategy", "tasks",
             "lines", "alpha", "python", "calibrate", "fisher", "name"]
grid_values = st.one_of(json_values, st.fixed_dictionaries(
    {"range": st.lists(st.floats(allow_nan=True) | st.integers(-10**15, 10**15), min_size=0, max_size=3),
     "step": st.floats(allow_nan=True) | st.integers(-3, 10**9) | scalars}))


def _containers(node) -> list:
    out = [node] if isinstance(node, (dict, list)) else []
    for v in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else []):
        out += _containers(v)
    return out


@st.composite
def mutated(draw, cfg: dict, keys: list[str], values=json_values):
    """``cfg`` with 1-3 random edits anywhere in its tree: a key set to a value, a key removed, an item replaced."""
    values = values.map(copy.deepcopy)  # a sampled list or dict is one object: never put it in twice
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(_containers(cfg)))
        if isinstance(target, dict):
            key = draw(st.sampled_from(keys + sorted(target)) | st.text(max_size=6))
            if draw(st.booleans()) or key not in target:
                target[key] = draw(values)
            else:
                target.pop(key)
        elif target:
            target[draw(st.integers(0, len(target) - 1))] = draw(values)
    return cfg


@given(data=st.data())
@examples(25)
def test_fuzz_tune_configs(world2, data):
    d = fresh(world2)
    cfg = data.draw(mutated(tune_config(world2), TUNE_KEYS, st.one_of(json_values, grid_values, st.sampled_from(
        ["auto", "classification", "lm_loss", "os:system", str(world2["val"]), "/nonexistent", "worst"]))))
    (d / "t.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    r = run(["tune", d / "t.yaml", d / "out", "-q"], d)
    if r.exit_code == 1:  # some candidates failed, the others reported: every line is an error line
        assert all(x.startswith("error: ") for x in r.output.splitlines() if x.strip()), r.output
        return
    assert_clean(r, d / "out")


@given(rows=st.lists(st.one_of(json_values, st.fixed_dictionaries({"text": scalars, "label": scalars})),
                     min_size=0, max_size=4) | st.binary(max_size=60))
@examples(20)
def test_fuzz_tune_eval_files(world2, rows):
    d = fresh(world2)
    data = rows if isinstance(rows, bytes) else "\n".join(json.dumps(r) for r in rows).encode()
    (d / "val.jsonl").write_bytes(data)
    cfg = tune_config(world2)
    cfg["eval"]["tasks"]["a"]["data"] = str(d / "val.jsonl")
    (d / "t.yaml").write_text(yaml.safe_dump(cfg))
    assert_clean(run(["tune", d / "t.yaml", d / "out", "-q"], d), d / "out")


ADAPTER_KEYS = ["r", "lora_alpha", "alpha_pattern", "rank_pattern", "target_modules", "use_rslora", "fan_in_fan_out",
                "peft_type", "use_dora", "modules_to_save"]


@given(data=st.data())
@examples(30)
def test_fuzz_adapter_configs_and_tensors(world2, data):
    d = fresh(world2)
    a = d / "adapter"
    shutil.copytree(world2["adapter"], a)
    cfg = json.loads((a / "adapter_config.json").read_text())
    if data.draw(st.booleans()):
        cfg = data.draw(mutated(cfg, ADAPTER_KEYS, st.one_of(json_values, st.sampled_from(
            [0, -4, 10**9, "four", ["nope_proj"], {"(": 4}, {"q_proj": "x"}, "q_proj|v_proj", 2, 8]))))
        (a / "adapter_config.json").write_text(json.dumps(cfg))
    else:
        from safetensors.torch import load_file

        sd = load_file(a / "adapter_model.safetensors")
        key = data.draw(st.sampled_from(sorted(sd)))
        shape = data.draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
        sd[key] = torch.zeros(shape)
        save_file(sd, a / "adapter_model.safetensors")
    (d / "c.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{world2['base']}+{a}", "parameters": {"weight": 1.0}}]}))
    v = run(["validate", d / "c.yaml"], d)
    assert_clean(v, d / "out")
    m = run(["merge", d / "c.yaml", d / "out", "-q"], d)
    assert_clean(m, d / "out")
    assert (v.exit_code == 0) == (m.exit_code == 0), (v.output, m.output)  # validate sees what merge needs


@given(revision=st.one_of(st.text(max_size=30), st.sampled_from(["main", "/etc", "../x", "a//b", "\0", COMMIT_HASH])),
       ref_content=st.one_of(st.binary(max_size=60), st.sampled_from([COMMIT_HASH.encode(), b"../../../../x",
                                                                        b"/etc", b""])))
@examples(30)
def test_fuzz_hub_revisions_and_ref_files(world2, revision, ref_content, monkeypatch):
    d = fresh(world2)
    home = d / "hf"
    shutil.copytree(world2["hf"], home, symlinks=True)
    (home / "hub" / "models--org--m" / "refs" / "main").write_bytes(ref_content)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = "org/m" + (f"@{revision}" if revision else "")
    (d / "c.yaml").write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(world2["base"]),
                                              "models": [{"model": ref, "parameters": {"weight": 1.0}}]}))
    r = run(["merge", d / "c.yaml", d / "out", "-q"], d)
    assert_clean(r, d / "out")
    if r.exit_code == 0:  # only the cached commit, through the cache's own layout
        assert COMMIT_HASH in (d / "out" / "README.md").read_text()


@given(content=st.one_of(json_values, st.fixed_dictionaries(
    {"config": json_values, "rows": st.lists(json_values, max_size=3) | json_values, "per_example": json_values})))
@examples(25)
def test_fuzz_bench_resume_files(world2, content):
    d = fresh(world2)
    (d / "old.json").write_text(json.dumps(content))
    r = run(["bench", "--tasks", "rt_sentiment", "--backbone", d / "no-backbone", "--out", d / "res",
             "--resume", d / "old.json", "-q"], d)
    assert_clean(r, d / "res", ok=())


@given(cmd=st.sampled_from(["analyze", "align", "surgery"]), data=st.data())
@examples(30)
def test_fuzz_analyze_align_surgery_options(world2, cmd, data):
    d = fresh(world2)
    if cmd == "analyze":
        cfg = {"merge_method": "task_arithmetic", "base_model": str(world2["base"]),
               "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in world2["fts"]]}
        (d / "an.yaml").write_text(yaml.safe_dump(cfg))
        option = data.draw(st.sampled_from(["--topk", "--points", "--scorer", "--calibration"]))
        args = ["analyze", d / "an.yaml", d / "out", option, data.draw(numeric), "--no-spectra", "-q"]
        out = d / "out"
    elif cmd == "align":
        option = data.draw(st.sampled_from(["--heads", "--max-iter", "--seed"]))
        args = ["align", world2["fts"][0], world2["base"], d / "out", option, data.draw(numeric), "-q"]
        out = d / "out"
    else:
        merged = d / "merged"
        shutil.copytree(world2["bert"], merged)
        option = data.draw(st.sampled_from(["--rank", "--steps", "--lr", "-n", "--max-length", "--batch-size",
                                            "--seed", "--device", "--expert", "--inputs"]))
        args = ["surgery", merged, "--expert", f"a={world2['expert']}", "--inputs", f"a={world2['root'] / 'texts.txt'}",
                "--steps", "2", option, data.draw(numeric), "-q"]
        out = merged / "surgery.safetensors"
    assert_clean(run(args, d), out)


# ------------------------------------------------------------------------------ submerge moe, multi-stage configs
MOE_KEYS = ["base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
            "source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale", "calibration"]
GATE_MODES = ["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random", "calibration", "bogus"]


@st.composite
def mutated_moe_configs(draw, world):
    """A valid mergekit-moe config over the tiny Llama family with a few random edits."""
    cfg = {"base_model": str(world["base"]), "gate_mode": "random", "dtype": "float32",
           "experts": [{"source_model": str(m), "positive_prompts": [f"p{i}"]} for i, m in enumerate(world["fts"])]}
    for _ in range(draw(st.integers(1, 3))):
        expert = cfg["experts"][0] if isinstance(cfg.get("experts"), list) and cfg["experts"] and \
            isinstance(cfg["experts"][0], dict) else None
        target = cfg if expert is None or draw(st.booleans()) else expert
        _edit(draw, target, MOE_KEYS, lambda k: ("gate_mode", GATE_MODES),
              [str(world["fts"][0]), str(world["bert"]), "/nonexistent", "", "a/b"])
    return cfg


@given(data=st.data())
@examples(40)
def test_fuzz_moe_configs(world, data):
    d = fresh(world)
    (d / "c.yaml").write_text(_config_text(data, mutated_moe_configs(world), ["", "---", "experts: [", "- - -"]))
    r = run(["moe", d / "c.yaml", d / "out", "-q", "--random-seed", "0"], d)
    assert_clean(r, d / "out")
    if r.exit_code == 0:
        assert (d / "out" / "config.json").is_file() and (d / "out" / "model.safetensors").is_file()


@given(data=st.data())
@examples(30)
def test_fuzz_multi_stage_configs(world, data):
    d = fresh(world)
    docs = []
    names = data.draw(st.lists(st.sampled_from(["a", "b", "c", None, "", 3, "x/y"]), min_size=2, max_size=3))
    for name in names:
        doc = ta(world)
        if name is not None:
            doc["name"] = name
        if data.draw(st.booleans()):
            doc["base_model"] = data.draw(st.sampled_from(["a", "b", "c", "d", str(world["base"])]))
        if data.draw(st.booleans()):
            doc["models"][0]["model"] = data.draw(st.sampled_from(["a", "b", "a+b", "bb", str(world["fts"][1])]))
        docs.append(doc)
    (d / "c.yaml").write_text(yaml.safe_dump_all(docs))
    r = run(["merge", d / "c.yaml", d / "out", "-q"], d)
    assert_clean(r, d / "out")
