"""Models named by Hub id resolve through huggingface_hub's real cache lookup (HF_HUB_OFFLINE=1, a cache
laid out by the test as the library lays it out: refs/, snapshots/<commit>/ symlinks into blobs/)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import submerge
from conftest import load_dir
from submerge.errors import CheckpointError
from submerge.io.hub import parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(hf_home: Path, repo: str, model_dir: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snap


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def ta(base, models):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}


def test_parse_hub_id():
    assert parse_hub_id("mistralai/Mistral-7B-v0.1").repo_id == "mistralai/Mistral-7B-v0.1"
    ref = parse_hub_id("org/name@v1.0")
    assert (ref.repo_id, ref.revision) == ("org/name", "v1.0")
    for not_an_id in ("./org/name", "/abs/path", "~/x", "a/b/c", "name", "../x/y", "org/..", "C:\\x\\y"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_hub_ids_merge_like_local_folders_and_the_card_records_the_commit(family, tmp_path, hub_home):
    base, fts = family
    lay_out_cache(hub_home, "org/base", base)
    lay_out_cache(hub_home, "org/ft0", fts[0])
    lay_out_cache(hub_home, "org/ft1", fts[1], ref="v1")
    local = submerge.merge(ta(base, fts[:2]), tmp_path / "local", quiet=True)
    cfg = ta("org/base", ["org/ft0", f"org/ft1@v1"])
    res = submerge.merge(cfg, tmp_path / "hub", quiet=True)
    a, b = load_dir(local.out_dir), load_dir(res.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"Hub revision `org/ft1@{COMMIT}`" in card and f"`org/base@{COMMIT}`" in card
    # a commit hash as the revision resolves too
    submerge.validate(ta(f"org/base@{COMMIT}", ["org/ft0"]))


def test_unresolvable_ids_fail_before_anything_is_read(family, tmp_path, hub_home):
    base, fts = family
    lay_out_cache(hub_home, "org/base", base)
    for bad, why in [("org/typo", "not in the Hugging Face cache"), ("org/base@v9", "not in the Hugging Face cache")]:
        with pytest.raises(CheckpointError, match=f"model '{bad}': cannot resolve this Hub id.*{why}"):
            submerge.merge(ta("org/base", [bad]), tmp_path / "o", quiet=True)
        assert not (tmp_path / "o").exists()


def test_local_paths_take_priority(family, tmp_path, hub_home, monkeypatch):
    base, fts = family
    lay_out_cache(hub_home, "org/ft0", fts[0])
    work = tmp_path / "work"
    shutil.copytree(fts[1], work / "org" / "ft0")  # a local folder spelled like the id, holding another model
    monkeypatch.chdir(work)
    res = submerge.merge(ta(base, ["org/ft0"]), tmp_path / "o", quiet=True)
    want = submerge.merge(ta(base, [fts[1]]), tmp_path / "want", quiet=True)
    a, b = load_dir(res.out_dir), load_dir(want.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "Hub revision" not in (tmp_path / "o" / "README.md").read_text()


def test_cli_validate_names_the_unknown_id(family, tmp_path, hub_home):
    import yaml
    from click.testing import CliRunner

    from submerge.cli import main

    base, _ = family
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(ta(base, ["someone/missing-model"])))
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "c.yaml")])
    assert r.exit_code == 2 and "someone/missing-model" in r.output and len(r.output.strip().splitlines()) == 1
