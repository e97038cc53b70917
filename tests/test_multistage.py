"""Multi-stage configs (mergekit-multimerge's format) run by one `submerge merge`: mergekit's tensors on a two-stage
example, stages in a temporary folder (or kept and reused), the card tracing them, one line for each bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from submerge.api import merge
from submerge.errors import ConfigError
from test_moe import _family, _tensors
from test_safety import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("stages") / "llama", "llama")


def _two_stage(fam: Path) -> list[dict]:
    return [
        {"name": "first", "merge_method": "ties", "base_model": str(fam / "base"),
         "models": [{"model": str(fam / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.5}} for i in (0, 1)],
         "parameters": {"normalize": True}, "dtype": "float32"},
        {"merge_method": "slerp", "base_model": "first", "dtype": "float32",
         "models": [{"model": "first"}, {"model": str(fam / "ft2")}], "parameters": {"t": 0.3}},
    ]


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_a_two_stage_config_gives_mergekit_multimerges_tensors(fam, tmp_path):
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main as multimerge

    cfg = _write(tmp_path / "multi.yml", _two_stage(fam))
    r = CliRunner().invoke(multimerge, [str(cfg), "--out-path", str(tmp_path / "mk"), "-I", str(tmp_path / "mk-I")])
    assert r.exit_code == 0, r.output
    res = merge(cfg, tmp_path / "ours", quiet=True)
    theirs, ours = _tensors(tmp_path / "mk"), _tensors(res.out_dir)
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
    assert not any(p.name.startswith(".ours") for p in tmp_path.iterdir())  # the stage folder is gone
    card = (res.out_dir / "README.md").read_text()
    assert "## Stages" in card and "`first` (ties" in card and "the final merge (slerp)" in card
    assert any("multi-stage" in n for n in res.notes)


def test_kept_stages_are_reused_and_a_changed_stage_is_refused_until_redone(fam, tmp_path):
    docs = _two_stage(fam)
    cfg = _write(tmp_path / "multi.yml", docs)
    keep = tmp_path / "stages"
    merge(cfg, tmp_path / "a", quiet=True, keep_intermediate=keep)
    marker = json.loads((keep / "first" / "submerge_stage.json").read_text())
    assert marker["stage"] == "first" and (keep / "first" / "model.safetensors").is_file()
    merge(cfg, tmp_path / "b", quiet=True, keep_intermediate=keep)
    assert "`first` (ties): reused from" in (tmp_path / "b" / "README.md").read_text()
    assert torch.equal(_tensors(tmp_path / "a")["model.norm.weight"], _tensors(tmp_path / "b")["model.norm.weight"])
    docs[0]["parameters"]["normalize"] = False
    _write(cfg, docs)
    with pytest.raises(ConfigError, match="was not made by stage first"):
        merge(cfg, tmp_path / "c", quiet=True, keep_intermediate=keep)
    assert not (tmp_path / "c").exists()
    merge(cfg, tmp_path / "c", quiet=True, keep_intermediate=keep, lazy=False)
    assert json.loads((keep / "first" / "submerge_stage.json").read_text())["fingerprint"] != marker["fingerprint"]


def test_a_failing_stage_leaves_nothing_behind(fam, tmp_path):
    docs = _two_stage(fam)
    docs[1]["models"][1]["model"] = str(fam / "ft2" / "model.safetensors") + ".missing"
    cfg = _write(tmp_path / "multi.yml", docs)
    assert_one_line_error(run_cli(["merge", cfg, tmp_path / "out", "-q"]), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml"]


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d[0].update(base_model="second") or d.append({**d[1], "name": "second", "base_model": "first"}),
     "in a circle: first -> second -> first"),
    (lambda d: d[1]["models"][0].update(model="frist"), "model 'frist' is no path and no stage (did you mean first?)"),
    (lambda d: d.append(dict(d[1])), "two documents have no name"),
    (lambda d: d.insert(0, dict(d[0])), "two documents are named 'first'"),
    (lambda d: d[1].update(name="last") or d.append({**d[0], "name": "other"}), "2 of them are used by no other"),
    (lambda d: d[0].update(name="a/b"), "name must be a plain word"),
])
def test_bad_multi_stage_files_are_one_line(fam, tmp_path, edit, fragment):
    docs = _two_stage(fam)
    edit(docs)
    cfg = _write(tmp_path / "multi.yml", docs)
    assert_one_line_error(run_cli(["merge", cfg, tmp_path / "out", "-q"]), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml"]


def test_keep_intermediate_needs_stages_and_may_not_hold_the_output(fam, tmp_path):
    single = tmp_path / "one.yml"
    single.write_text(yaml.safe_dump(_two_stage(fam)[0] | {"name": None}))
    assert_one_line_error(run_cli(["merge", single, tmp_path / "out", "-I", tmp_path / "k", "-q"]), "one")
    cfg = _write(tmp_path / "multi.yml", _two_stage(fam))
    assert_one_line_error(run_cli(["merge", cfg, tmp_path / "k" / "out", "-I", tmp_path / "k", "-q"]),
                          "must not hold one another")
