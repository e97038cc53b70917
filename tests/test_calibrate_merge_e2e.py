"""`submerge calibrate` + `submerge merge` with esm / regmean / tsv on tiny Hugging Face BERT folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from submerge.api import merge, merge_state_dicts, validate
from submerge.stats.gram import calibrate_model_dir
from submerge.stats.load import load_stats
from submerge.cli import main
from submerge.errors import CheckpointError, ConfigError

from conftest import load_dir

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "far", "a", "big", "small", "red", "blue", "fast"]
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)) for i in range(40)]


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    fts = []
    for i in range(3):
        m = BertModel(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 2 and "embeddings" not in name:
                    p.add_(0.05 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]))
                else:
                    p.add_(0.01 * torch.randn_like(p))
        m.save_pretrained(root / f"ft{i}")
        tok.save_pretrained(root / f"ft{i}")
        fts.append(root / f"ft{i}")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (root / "texts.jsonl").write_text("\n".join(json.dumps({"sentence": t}) for t in TEXTS) + "\n")
    return root, root / "base", fts


def test_cli_calibrate_then_esm_merge_matches_python_api(bert_family, tmp_path):
    root, base, fts = bert_family
    runner = CliRunner()
    stats_dirs = []
    for i, ft in enumerate(fts):
        out = tmp_path / f"stats{i}"
        inputs = root / ("texts.txt" if i != 1 else "texts.jsonl")
        args = ["calibrate", str(ft), str(inputs), str(out), "-n", "16", "--task", f"t{i}", "-q"]
        if i == 1:
            args += ["--field", "sentence"]
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
        stats_dirs.append(out)
    st = load_stats(stats_dirs[0])
    assert st.info["n_inputs"] == 16 and st.info["task"] == "t0"
    assert "encoder.layer.0.attention.self.key" in st.aliases  # q/k/v share one input
    config = {"merge_method": "esm", "base_model": str(base),
              "models": [{"model": str(ft), "calibration": str(s)} for ft, s in zip(fts, stats_dirs)],
              "parameters": {"alpha": 1.3, "recipe": "vit"}}
    cfg_path = tmp_path / "esm.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    res = runner.invoke(main, ["merge", str(cfg_path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    got = load_dir(tmp_path / "out")
    assert not list((tmp_path / "out").glob(".scratch*"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "alpha = 1.3 (set in the config)" in card and "16 inputs" in card
    want = merge_state_dicts("esm", load_dir(base), [load_dir(f) for f in fts], {"alpha": 1.3, "recipe": "vit"},
                             stats=stats_dirs)
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    # the merged folder loads with plain transformers
    from transformers import AutoModel

    AutoModel.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("method", ["regmean", "tsv", "iso_c", "iso_cts"])
def test_yaml_merge_other_subspace_methods(bert_family, tmp_path, method):
    root, base, fts = bert_family
    models = []
    for i, ft in enumerate(fts):
        entry = {"model": str(ft)}
        if method == "regmean":
            calibrate_model_dir(ft, root / "texts.txt", tmp_path / f"s{i}", n=8, progress=False)
            entry["calibration"] = str(tmp_path / f"s{i}")
        models.append(entry)
    config = {"merge_method": method, "base_model": str(base), "models": models}
    res = merge(config, tmp_path / "out", quiet=True)
    got = load_dir(res.out_dir)
    stats = [tmp_path / f"s{i}" for i in range(3)] if method == "regmean" else None
    want = merge_state_dicts(method, load_dir(base), [load_dir(f) for f in fts], {}, stats=stats)
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k


def test_data_based_errors_are_actionable(bert_family, tmp_path):
    root, base, fts = bert_family
    config = {"merge_method": "esm", "base_model": str(base), "models": [{"model": str(f)} for f in fts]}
    with pytest.raises(ConfigError, match="needs 'calibration: <folder>'"):
        validate(config)
    config["models"][0]["calibration"] = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a calibration folder"):
        validate(config)
    # statistics of a model with another width are refused before any tensor math
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=32))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "vocab.txt").write_text((root / "vocab.txt").read_text())
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(tmp_path / "other")
    calibrate_model_dir(tmp_path / "other", root / "texts.txt", tmp_path / "s_other", n=4, progress=False)
    for m in config["models"]:
        m["calibration"] = str(tmp_path / "s_other")
    with pytest.raises(CheckpointError, match="inputs of size 16"):
        validate(config)
    with pytest.raises(ConfigError, match="input file .* does not exist"):
        calibrate_model_dir(fts[0], tmp_path / "missing.txt", tmp_path / "s", progress=False)
    bad = {"merge_method": "esm", "base_model": str(base), "parameters": {"recipe": "vitt"},
           "models": [{"model": str(f), "calibration": str(tmp_path / "s_other")} for f in fts]}
    with pytest.raises(ConfigError, match="did you mean"):
        validate(bad)
