"""Every bad input gives a clear error naming the model/tensor, exits non-zero, and leaves no output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import submerge
from conftest import load_dir
from submerge.cli import main
from submerge.errors import CheckpointError, ConfigError, NonFiniteError


def variant(src, dst, edit=None, config_edit=None):
    """Copy a model folder, editing its state dict and/or config."""
    dst.mkdir()
    sd = load_dir(src)
    if edit:
        edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def ta(base, models, **params):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], **params}


def assert_fails(cfg, out, exc, *fragments, **opts):
    with pytest.raises(exc) as info:
        submerge.merge(cfg, out, quiet=True, **opts)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "submerge-tmp" in p.name]
    return msg


def test_missing_tensor(family, tmp_path):
    base, fts = family
    bad = variant(fts[0], tmp_path / "bad", edit=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    assert_fails(ta(base, [bad]), tmp_path / "o", CheckpointError, "missing tensor",
                 "model.layers.1.mlp.up_proj.weight", str(bad))


def test_extra_tensor(family, tmp_path):
    base, fts = family
    bad = variant(fts[0], tmp_path / "bad", edit=lambda sd: sd.update(extra_head=torch.zeros(3)))
    assert_fails(ta(base, [bad]), tmp_path / "o", CheckpointError, "extra_head", "lacks")


def test_shape_mismatch(family, tmp_path):
    base, fts = family
    k = "model.layers.0.self_attn.q_proj.weight"
    bad = variant(fts[0], tmp_path / "bad", edit=lambda sd: sd.update({k: sd[k][:, :32].clone()}))
    assert_fails(ta(base, [bad]), tmp_path / "o", CheckpointError, "shape mismatch", k, "[64, 32]")


def test_dtype_mismatch(family, tmp_path):
    base, fts = family
    k = "model.norm.weight"
    bad = variant(fts[0], tmp_path / "bad", edit=lambda sd: sd.update({k: sd[k].half()}))
    assert_fails(ta(base, [bad]), tmp_path / "o", CheckpointError, "dtype mismatch", k)


def test_different_architectures(family, tmp_path):
    base, fts = family
    bad = variant(fts[0], tmp_path / "bad", config_edit=lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral"))
    assert_fails(ta(base, [bad]), tmp_path / "o", CheckpointError, "different architectures", "MistralForCausalLM")


def test_corrupt_and_truncated_safetensors(family, tmp_path):
    base, fts = family
    trunc = tmp_path / "trunc"
    shutil.copytree(fts[0], trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_fails(ta(base, [trunc]), tmp_path / "o", CheckpointError, "truncated", str(f))
    garbage = tmp_path / "garbage"
    shutil.copytree(fts[0], garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    assert_fails(ta(base, [garbage]), tmp_path / "o", CheckpointError, "unreadable safetensors header")


def test_path_does_not_exist(family, tmp_path):
    base, _ = family
    assert_fails(ta(base, [tmp_path / "nope"]), tmp_path / "o", CheckpointError, "does not exist", "nope")


def test_output_exists_needs_overwrite(family, tmp_path):
    base, fts = family
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        submerge.merge(ta(base, fts), out, quiet=True)
    assert (out / "keep.txt").exists()
    submerge.merge(ta(base, fts), out, quiet=True, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_base_model_missing_where_needed(family, tmp_path):
    base, fts = family
    cfg = ta(base, fts)
    del cfg["base_model"]
    assert_fails(cfg, tmp_path / "o", ConfigError, "task_arithmetic needs a base_model")


def test_nan_input_leaves_nothing_behind(family, tmp_path):
    base, fts = family
    k = "model.layers.2.mlp.down_proj.weight"

    def poison(sd):
        sd[k] = sd[k].clone()
        sd[k][0, 0] = float("nan")

    bad = variant(fts[0], tmp_path / "bad", edit=poison)
    assert_fails(ta(base, [bad, fts[1]]), tmp_path / "o", NonFiniteError, k, str(bad), "NaN")


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c.update(base_modle=c.pop("base_model")), "unknown key 'base_modle' (did you mean base_model?)"),
    (lambda c: c.update(merge_method="tie"), "unknown merge_method 'tie' (did you mean ties?)"),
    (lambda c: c["models"][0]["parameters"].update(densty=0.5), "parameter 'densty' is not used by ties (did you mean density?)"),
    (lambda c: c["models"][0]["parameters"].update(density=1.5), "must be <= 1.0"),
    (lambda c: c["models"][0]["parameters"].update(density="lots"), "expected float"),
    (lambda c: c["models"][1]["parameters"].pop("weight"), "missing required parameter 'weight'"),
    (lambda c: c.update(parameters={"topk_scope": "globl"}), "(did you mean global?)"),
    (lambda c: c.update(dtype="bf32"), "unknown dtype"),
    (lambda c: c["models"][0].update(modle=c["models"][0].pop("model")),
     "models[0]: unknown key 'modle' (did you mean model?)"),
    (lambda c: c.update(tokenizer={"source": "nope"}), "tokenizer.source 'nope' is not one of the merged models"),
    (lambda c: c.update(chat_template="chatmll"), "neither a known name"),
])
def test_bad_config(family, tmp_path, mutate, fragment):
    base, fts = family
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts]}
    mutate(cfg)
    assert_fails(cfg, tmp_path / "o", ConfigError, fragment)


def test_slerp_needs_exactly_one_other_model(family, tmp_path):
    base, fts = family
    cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
           "models": [{"model": str(p)} for p in fts[:2]]}
    assert_fails(cfg, tmp_path / "o", ConfigError, "slerp merges exactly 1 model")


def test_cli_errors_exit_2_without_traceback(family, tmp_path):
    base, fts = family
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "densty": 0.5}} for p in fts]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2
    assert "did you mean density?" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 2 and "densty" in r.output
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "missing.yaml"), str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_cli_merge_validate_methods(family, tmp_path):
    base, fts = family
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(ta(base, fts)))
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 0 and "ok: task_arithmetic over 4 model(s)" in r.output
    r = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "o"), "-q", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "model.safetensors").exists()
    r = CliRunner().invoke(main, ["methods"])
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                 "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "magnitude_prune"):
        assert f"{name}  —" in r.output
    r = CliRunner().invoke(main, ["methods", "ties"])
    assert "arxiv.org/abs/2306.01708" in r.output and "density (float, per model, default 1.0)" in r.output


def test_help_does_not_import_torch():
    """`submerge --help` and `submerge <command> --help` parse arguments before torch is imported."""
    import subprocess
    import sys

    code = ("import sys; from submerge.cli import main\n"
            "for args in (['--help'], ['merge', '--help'], ['bench', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Usage: " in r.stdout and "--lora-rank" in r.stdout and "--multitask" in r.stdout


def test_verbose_merge_logs_inputs_plan_and_tensors(family, tmp_path, caplog):
    import logging

    base, fts = family
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(ta(base, fts[:2])))
    with caplog.at_level(logging.DEBUG, logger="submerge"):
        submerge.merge(str(cfg), tmp_path / "out", quiet=True)
    text = caplog.text
    assert f"input {base} (base)" in text and "output tensors" in text and "MB to read" in text
    assert "wrote " in text and "model.layers.0.mlp.down_proj.weight" in text  # one DEBUG line per tensor
