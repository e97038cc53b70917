"""mergekit's `tokenizer:` block: merged vocabularies, re-indexed embedding rows, padding, chat templates."""

from __future__ import annotations

import json

import pytest
import torch

import submerge
from conftest import load_dir
from submerge.errors import ConfigError

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

CORPUS = ["the quick brown fox jumps over the lazy dog", "merging models without retraining",
          "a tokenizer with a small vocabulary for tests", "hello world, hello merge"] * 20


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """A base with a BPE tokenizer; ft0 adds two special tokens, ft1 adds one special and one plain token
    (each resized, the new rows trained = random); ft2 keeps the base vocabulary."""
    from transformers import AutoModelForCausalLM

    from submerge.synthetic import llama_config

    root = tmp_path_factory.mktemp("vocabfam")
    tok = _tokenizer()
    n = len(tok)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(llama_config(vocab=n, layers=2))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    added = {"ft0": (["<|im_start|>", "<|im_end|>"], []), "ft1": (["<tool>"], ["zyzzyva"]), "ft2": ([], [])}
    paths = {}
    for i, (name, (special, plain)) in enumerate(added.items()):
        m = AutoModelForCausalLM.from_config(llama_config(vocab=n, layers=2))
        m.load_state_dict(base.state_dict())
        t = _tokenizer()
        if special:
            t.add_special_tokens({"additional_special_tokens": special})
        if plain:
            t.add_tokens(plain)
        m.resize_token_embeddings(len(t), mean_resizing=False)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / name)
        t.save_pretrained(root / name)
        paths[name] = root / name
    return root / "base", paths


def ca_rows(folder):
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def _both(cfg, tmp_path):
    mk, sm = tmp_path / "mk", tmp_path / "sm"
    run_merge(MergeConfiguration.model_validate(cfg), str(mk), options=MergeOptions(quiet=True))
    submerge.merge(cfg, sm, quiet=True)
    return mk, sm


def _cases(base, p):
    b, f0, f1, f2 = str(base), str(p["ft0"]), str(p["ft1"]), str(p["ft2"])
    return {
        "union_linear": dict(merge_method="linear", tokenizer={"source": "union"},
                             models=[{"model": f0, "parameters": {"weight": 0.5}},
                                     {"model": f1, "parameters": {"weight": 0.3}},
                                     {"model": f2, "parameters": {"weight": 0.2}}]),
        "union_task_arithmetic_base_rows": dict(
            merge_method="task_arithmetic", base_model=b, tokenizer={"source": "union", "pad_to_multiple_of": 16},
            models=[{"model": f0, "parameters": {"weight": 0.7}}, {"model": f1, "parameters": {"weight": 0.5}}]),
        "base_source_with_tokens": dict(
            merge_method="ties", base_model=b, parameters={"density": 0.6},
            tokenizer={"source": "base", "tokens": {
                "the": {"source": {"kind": "model_token", "model": f0, "token": "fox"}, "force": True},
                "dog": {"source": f1, "force": True},
                "</s>": {"source": {"kind": "zero"}, "force": True}}},
            models=[{"model": f0, "parameters": {"weight": 1.0}}, {"model": f1, "parameters": {"weight": 1.0}}]),
        "model_source": dict(merge_method="linear", tokenizer={"source": f1},
                             models=[{"model": f0, "parameters": {"weight": 1.0}},
                                     {"model": f1, "parameters": {"weight": 1.0}}]),
        "legacy_union": dict(merge_method="slerp", base_model=b, tokenizer_source="union", parameters={"t": 0.4},
                             models=[{"model": b}, {"model": f0}]),
    }


@pytest.mark.parametrize("case", ["union_linear", "union_task_arithmetic_base_rows", "base_source_with_tokens",
                                  "model_source", "legacy_union"])
def test_same_vocabulary_rows_and_config_as_mergekit(vocab_family, tmp_path, case):
    from transformers import AutoTokenizer

    base, paths = vocab_family
    cfg = dict(_cases(base, paths)[case], dtype="float32")
    mk, sm = _both(cfg, tmp_path)
    tk, ts = AutoTokenizer.from_pretrained(mk), AutoTokenizer.from_pretrained(sm)
    vk, vs = tk.get_vocab(), ts.get_vocab()
    # the same tokens; ids of appended tokens may differ: mergekit appends them in the order of a Python set
    # of the input models (different from run to run), submerge in config order
    assert set(vk) == set(vs)
    assert {str(x) for x in tk.added_tokens_decoder.values()} == {str(x) for x in ts.added_tokens_decoder.values()}
    order = sorted(vs, key=vs.get)
    perm = torch.tensor([vk[t] for t in order])
    a, b = load_dir(mk), load_dir(sm)
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        x, y = a[k], b[k]
        if x.shape[0] == ca_rows(mk) and "embed" in k or "lm_head" in k:
            x = torch.cat([x[perm], x[len(order):]])
        assert (x - y).abs().max().item() <= 1e-5, k
    ca, cb = json.loads((mk / "config.json").read_text()), json.loads((sm / "config.json").read_text())
    assert ca["vocab_size"] == cb["vocab_size"] == b["model.embed_tokens.weight"].shape[0]
    assert len(ts) <= cb["vocab_size"]


def test_union_rows_follow_the_rule(vocab_family, tmp_path):
    """Tokens only one model has take its row in every model; shared tokens keep each model's own row."""
    from transformers import AutoTokenizer

    base, p = vocab_family
    cfg = dict(merge_method="linear", tokenizer={"source": "union", "pad_to_multiple_of": 8}, dtype="float32",
               models=[{"model": str(p["ft0"]), "parameters": {"weight": 0.5}},
                       {"model": str(p["ft1"]), "parameters": {"weight": 0.5}}])
    submerge.merge(cfg, tmp_path / "out", quiet=True)
    out, f0, f1 = load_dir(tmp_path / "out"), load_dir(p["ft0"]), load_dir(p["ft1"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    t0, t1 = AutoTokenizer.from_pretrained(p["ft0"]), AutoTokenizer.from_pretrained(p["ft1"])
    e, e0, e1 = out["model.embed_tokens.weight"], f0["model.embed_tokens.weight"], f1["model.embed_tokens.weight"]
    v = tok.get_vocab()
    assert e.shape[0] % 8 == 0 and e.shape[0] >= len(v)
    assert torch.allclose(e[v["<|im_end|>"]], e0[t0.convert_tokens_to_ids("<|im_end|>")])
    assert torch.allclose(e[v["zyzzyva"]], e1[t1.convert_tokens_to_ids("zyzzyva")])
    assert torch.allclose(e[v["the"]], 0.5 * e0[t0.convert_tokens_to_ids("the")] + 0.5 * e1[t1.convert_tokens_to_ids("the")])
    assert torch.allclose(e[len(v):], e[:len(v)].mean(0).expand(e.shape[0] - len(v), -1), atol=1e-6)
    # the merged model runs with the merged tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tok("<|im_start|> hello zyzzyva <tool>", return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.vocab_size
    assert torch.isfinite(model(ids).logits).all()


def test_chat_template_by_name_and_string(vocab_family, tmp_path):
    from transformers import AutoTokenizer

    from submerge.engine.vocab import CHAT_TEMPLATES

    base, p = vocab_family
    models = [{"model": str(p["ft2"]), "parameters": {"weight": 1.0}}, {"model": str(base), "parameters": {"weight": 1.0}}]
    submerge.merge(dict(merge_method="linear", chat_template="chatml", models=models), tmp_path / "a", quiet=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    submerge.merge(dict(merge_method="linear", chat_template=own, models=models), tmp_path / "b", quiet=True)
    assert AutoTokenizer.from_pretrained(tmp_path / "b").chat_template == own
    with pytest.raises(ConfigError, match="chat_template"):
        submerge.merge(dict(merge_method="linear", chat_template="chatmll", models=models), tmp_path / "c", quiet=True)
    assert not (tmp_path / "c").exists()


def test_bad_tokenizer_configs_are_one_line_errors(vocab_family, tmp_path):
    base, p = vocab_family
    models = [{"model": str(p["ft0"]), "parameters": {"weight": 1.0}}, {"model": str(p["ft1"]), "parameters": {"weight": 1.0}}]
    bad = [
        (dict(tokenizer={"source": str(base)}), "not one of the merged models"),
        (dict(tokenizer={"source": "union", "tokens": {"<x>": {"source": str(base)}}}), "not one of the merged"),
        (dict(tokenizer={"source": "union"}, tokenizer_source="base"), "not both"),
        (dict(tokenizer={"source": "union", "tokens": {"<x>": {"source": {"kind": "ones"}}}}), "unknown source kind"),
        (dict(tokenizer={"source": "union", "pad_to_multiple_of": 0}), "pad_to_multiple_of"),
        (dict(tokenizer={"sourse": "union"}), "sourse"),
    ]
    for extra, msg in bad:
        out = tmp_path / "out"
        with pytest.raises(ConfigError, match=msg):
            submerge.merge(dict(merge_method="linear", models=models, **extra), out, quiet=True)
        assert not out.exists()


def test_base_source_with_new_tokens_and_sources(vocab_family, tmp_path):
    """`source: base` plus tokens the base lacks (mergekit 0.1.5 fails on this with a KeyError): the tokens are
    appended, their rows come from the configured sources in every model."""
    from transformers import AutoTokenizer

    base, p = vocab_family
    f0, f1 = str(p["ft0"]), str(p["ft1"])
    cfg = dict(merge_method="task_arithmetic", base_model=str(base), dtype="float32",
               tokenizer={"source": "base", "tokens": {
                   "<tool>": {"source": f1},
                   "<|im_end|>": {"source": {"kind": "model_token", "model": f0, "token": "<|im_end|>"}},
                   "<new>": {"source": {"kind": "zero"}}}},
               models=[{"model": f0, "parameters": {"weight": 0.5}}, {"model": f1, "parameters": {"weight": 0.5}}])
    submerge.merge(cfg, tmp_path / "out", quiet=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    v, n_base = tok.get_vocab(), len(AutoTokenizer.from_pretrained(base))
    assert len(v) == n_base + 3 and {v["<tool>"], v["<|im_end|>"], v["<new>"]} == {n_base, n_base + 1, n_base + 2}
    out, f0d, f1d = load_dir(tmp_path / "out"), load_dir(p["ft0"]), load_dir(p["ft1"])
    e = out["model.embed_tokens.weight"]
    t0, t1 = AutoTokenizer.from_pretrained(f0), AutoTokenizer.from_pretrained(f1)
    # every input (base included) gets the configured row; task arithmetic of equal rows is that row
    tool = f1d["model.embed_tokens.weight"][t1.convert_tokens_to_ids("<tool>")]
    im_end = f0d["model.embed_tokens.weight"][t0.convert_tokens_to_ids("<|im_end|>")]
    assert torch.allclose(e[v["<tool>"]], tool, atol=1e-6)
    assert torch.allclose(e[v["<|im_end|>"]], im_end, atol=1e-6)
    assert torch.equal(e[v["<new>"]], torch.zeros_like(e[0]))


def test_chat_template_names_match_the_templates():
    from submerge.engine.config import CHAT_TEMPLATE_NAMES
    from submerge.engine.vocab import CHAT_TEMPLATES

    assert set(CHAT_TEMPLATE_NAMES) == set(CHAT_TEMPLATES)
