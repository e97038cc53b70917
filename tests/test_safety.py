"""Never lose a user's files, never read outside a model, never write a broken model.

Every test here failed before the fix it guards (issue 11): OUT = '.', '..', an input or a folder
holding one was deleted by --overwrite; killed runs left temp folders and half-replaced outputs;
index entries and symlinks reached outside the model folder; a 1e39 weight wrote an all-Inf model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import submerge
from conftest import load_dir
from submerge.cli import main
from submerge.errors import CheckpointError, NonFiniteError
from submerge.io import OutputError, atomic_folder, check_output_target


def ta_config(base, models, weight=1.0):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": weight}} for m in models]}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".submerge-" in p.name]


def run_cli(args, cwd=None):
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def assert_one_line_error(r, *fragments):
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in r.output, r.output


# ------------------------------------------------------------------------------ data loss
@pytest.fixture
def family_copy(family, tmp_path):
    """The session family copied under tmp_path/work (so the tests may sit inside it)."""
    base, fts = family
    work = tmp_path / "work"
    work.mkdir()
    b = Path(shutil.copytree(base, work / "base"))
    f = [Path(shutil.copytree(p, work / p.name)) for p in fts[:2]]
    (work / "notes.txt").write_text("the user's own file")
    return work, b, f


@pytest.mark.parametrize("out", [".", "..", "./", "../work"])
def test_merge_refuses_current_folder_and_ancestors(family_copy, out):
    work, base, fts = family_copy
    cfg = write_config(work / "ta.yaml", ta_config(base, fts))
    before = snapshot(work.parent)
    r = run_cli(["merge", cfg, out, "--overwrite", "-q"], cwd=work)
    assert_one_line_error(r, "refusing", "current folder")
    assert snapshot(work.parent) == before


def test_calibrate_and_fisher_refuse_current_folder(family_copy):
    work, base, _ = family_copy
    (work / "texts.txt").write_text("a\nb\n")
    before = snapshot(work)
    for cmd in ("calibrate", "fisher"):
        r = run_cli([cmd, base, "texts.txt", ".", "--overwrite", "-q"], cwd=work)
        assert_one_line_error(r, "refusing", "current folder")
    assert snapshot(work) == before


@pytest.mark.parametrize("which", ["model", "base", "holder", "inside", "config_holder", "calibration"])
def test_merge_refuses_out_that_is_contains_or_lies_in_an_input(family_copy, tmp_path, which):
    work, base, fts = family_copy
    other = tmp_path / "cfgs"
    other.mkdir()
    cfg_path = other / "ta.yaml"
    cfg = ta_config(base, fts)
    out = {"model": fts[0], "base": base, "holder": work, "inside": fts[1] / "merged",
           "config_holder": other, "calibration": tmp_path / "stats"}[which]
    if which == "calibration":  # a data-free method ignores calibration, but its folder is still an input
        out.mkdir()
        (out / "manifest.json").write_text("{}")
        cfg["models"][0]["calibration"] = str(out)
    write_config(cfg_path, cfg)
    before = snapshot(tmp_path)
    r = run_cli(["merge", cfg_path, out, "--overwrite", "-q"], cwd=tmp_path)
    assert_one_line_error(r, "refusing", "input of this run")
    assert snapshot(tmp_path) == before
    with pytest.raises(OutputError):
        submerge.merge(cfg_path, out, overwrite=True, quiet=True)
    assert snapshot(tmp_path) == before


def test_refuses_root_home_and_mount_points(tmp_path, monkeypatch):
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for out, why in [("/", "filesystem root"), (home, "home folder"), (home.parent, "home folder"),
                     ("~", "home folder")]:
        with pytest.raises(OutputError, match=why):
            check_output_target(out)
    mounts = [m for m in ("/proc", "/dev", "/sys", "/dev/shm") if os.path.ismount(m)]
    if mounts:
        with pytest.raises(OutputError, match="mount point"):
            check_output_target(mounts[0])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_target(tmp_path / "a_file")
    check_output_target(tmp_path / "fresh")  # an ordinary new folder is fine


def test_symlinked_out_is_judged_by_its_target(family_copy):
    work, base, fts = family_copy
    link = work.parent / "link_to_model"
    link.symlink_to(fts[0])
    with pytest.raises(OutputError, match="input of this run"):
        submerge.merge(ta_config(base, fts), link, overwrite=True, quiet=True)
    assert (fts[0] / "model.safetensors").exists()


def test_overwrite_replaces_only_after_success_and_sets_old_aside(family_copy, tmp_path):
    work, base, fts = family_copy
    out = tmp_path / "out"
    submerge.merge(ta_config(base, fts, 0.5), out, quiet=True)
    first = snapshot(out)
    # a failing merge (NaN input) with --overwrite leaves the previous OUT untouched
    bad = tmp_path / "bad"
    shutil.copytree(fts[0], bad)
    sd = load_dir(bad)
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError):
        submerge.merge(ta_config(base, [bad, fts[1]]), out, overwrite=True, quiet=True)
    assert snapshot(out) == first and not leftovers(tmp_path)
    submerge.merge(ta_config(base, fts, 1.0), out, overwrite=True, quiet=True)
    assert snapshot(out) != first and not leftovers(tmp_path)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_recovers_what_a_killed_swap_left(family_copy, tmp_path, caplog):
    """Killed between 'rename OUT aside' and 'rename new in': the next run restores the old OUT."""
    work, base, fts = family_copy
    out = tmp_path / "out"
    submerge.merge(ta_config(base, fts, 0.5), out, quiet=True)
    old = snapshot(out)
    pid = dead_pid()
    aside = tmp_path / f".out.submerge-old-{pid}-0123abcd"
    tmp = tmp_path / f".out.submerge-tmp-{pid}-0123abcd"
    out.rename(aside)
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    legacy = tmp_path / ".out.submerge-tmp-deadbeef"  # from a version without pids in the names
    legacy.mkdir()
    with pytest.raises(submerge.errors.ConfigError, match="already exists"):
        submerge.merge(ta_config(base, fts, 1.0), out, quiet=True)  # no --overwrite: refused up front
    r = run_cli(["merge", write_config(tmp_path / "c.yaml", ta_config(base, fts)), out, "-q"])
    # OUT did not exist when the run started, so it recovers, reports, then refuses to overwrite
    assert r.exit_code == 2 and "already exists" in r.output
    assert snapshot(out) == old and not leftovers(tmp_path)
    assert any("restored" in rec.getMessage() for rec in caplog.records)
    # killed after 'rename new in' but before deleting the old one: the old copy is removed
    aside.mkdir()
    (aside / "x").write_text("old")
    with caplog.at_level("WARNING", logger="submerge"):
        submerge.merge(ta_config(base, fts, 1.0), out, overwrite=True, quiet=True)
    assert not leftovers(tmp_path) and (out / "model.safetensors").exists()
    assert any("removed" in rec.getMessage() for rec in caplog.records)


def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.submerge-tmp-{os.getppid()}-0123abcd"
    live.mkdir()
    with atomic_folder(out) as t:
        (t / "f").write_text("x")
    assert live.exists() and (out / "f").exists()


def test_lock_refuses_a_second_writer(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as t:
        (t / "f").write_text("first")
        with pytest.raises(OutputError, match="another submerge run"):
            with atomic_folder(out, overwrite=True):
                pass
    assert (out / "f").read_text() == "first" and not leftovers(tmp_path)


def test_two_overwrite_runs_into_one_out(family_copy, tmp_path):
    """Two processes racing --overwrite into one OUT: one wins, the other says why; no 'Directory not empty'."""
    work, base, fts = family_copy
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", ta_config(base, fts))
    cmd = [sys.executable, "-m", "submerge.cli", "merge", str(cfg), str(out), "--overwrite", "-q", "--threads", "1"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or (rc == 2 and "another submerge run" in err and "Traceback" not in err), (rc, err)
    assert (out / "model.safetensors").exists() and not leftovers(tmp_path)


def test_sigterm_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        from submerge.io import atomic_folder
        with atomic_folder({str(out)!r}) as tmp:
            (tmp / "partial").write_text("x")
            print("ready", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert not out.exists() and not leftovers(tmp_path)


def test_full_or_read_only_disk_is_one_line(tmp_path):
    with pytest.raises(OutputError, match="not enough free space"):
        with atomic_folder(tmp_path / "big", planned_bytes=10**18):
            pass
    for code, text in [(errno.ENOSPC, "is full"), (errno.EROFS, "read-only")]:
        with pytest.raises(OutputError, match=text):
            with atomic_folder(tmp_path / "o"):
                raise OSError(code, os.strerror(code))
        assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------ containment
def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_index_entries_must_stay_inside_the_folder(family_sharded, tmp_path):
    base, fts = family_sharded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for target in ("../elsewhere/x.safetensors", str(elsewhere / "x.safetensors"), "sub/x.safetensors"):
        m = copy_model(fts[0], tmp_path / f"m{abs(hash(target))}")
        index = m / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        first = sorted(data["weight_map"].values())[0]
        shutil.copy(m / first, elsewhere / "x.safetensors")
        data["weight_map"] = {k: (target if v == first else v) for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match="plain file names"):
            submerge.validate(ta_config(base, [m]))


def test_symlinks_followed_only_inside_the_model_folder(family, tmp_path):
    base, fts = family
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    m = copy_model(base, tmp_path / "m")
    (m / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "o"
    with pytest.raises(CheckpointError, match="outside the model folder"):
        submerge.merge(ta_config(m, fts[:1]), out, quiet=True)
    assert not out.exists()
    (m / "tokenizer.json").unlink()
    (m / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        submerge.merge(ta_config(m, fts[:1]), out, quiet=True)
    # a symlink within the folder is fine, and the output gets a regular file
    (m / "tokenizer.json").unlink()
    (m / "real_tokenizer.json").write_text('{"ok": true}')
    (m / "tokenizer.json").symlink_to("real_tokenizer.json")
    submerge.merge(ta_config(m, fts[:1]), out, quiet=True)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()


def test_fifo_and_devices_are_refused_without_hanging(family, tmp_path):
    base, fts = family
    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(fts[0] / "config.json", m / "config.json")
    os.mkfifo(m / "model.safetensors")
    with pytest.raises(CheckpointError, match="FIFO"):
        submerge.validate(ta_config(base, [m]))
    os.unlink(m / "model.safetensors")
    (m / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        submerge.validate(ta_config(base, [m]))
    with pytest.raises(CheckpointError, match="not a regular file|a device"):
        submerge.validate(ta_config(base, ["/dev/zero"]))


def test_hugging_face_cache_layout_symlinks_are_followed(family, tmp_path):
    """snapshots/<rev>/f -> ../../blobs/<hash>, as huggingface_hub lays out its cache."""
    base, fts = family
    repo = tmp_path / "hub" / "models--org--ft"
    snap = repo / "snapshots" / "0123456789abcdef"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in fts[0].iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    out = tmp_path / "o"
    submerge.merge(ta_config(base, [snap]), out, quiet=True)
    ref = tmp_path / "ref"
    submerge.merge(ta_config(base, [fts[0]]), ref, quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(load_dir(out).values(), load_dir(ref).values()))


# ------------------------------------------------------------------------------ never a broken model
def test_overflowing_weight_is_refused_with_the_tensor_name(family, tmp_path):
    base, fts = family
    out = tmp_path / "o"
    for models in (fts[:1], fts):  # one model: an all-Inf product; three: torch refuses the scalar
        with pytest.raises(NonFiniteError, match=r"merged tensor model\.\S+ has (\d+ )?NaN/Inf.*overflowed"):
            submerge.merge(ta_config(base, models, weight=1e39), out, quiet=True)
        assert not out.exists() and not leftovers(tmp_path)
    cfg = ta_config(base, fts, weight=1e8)  # finite in float32, beyond float16's range after the cast
    cfg["dtype"] = "float16"
    with pytest.raises(NonFiniteError, match="would be Inf.*exceed the range of the output dtype float16"):
        submerge.merge(cfg, out, quiet=True)
    assert not out.exists() and not leftovers(tmp_path)
    r = run_cli(["merge", write_config(tmp_path / "c.yaml", ta_config(base, fts, weight=1e39)), out, "-q"])
    assert_one_line_error(r, "NaN/Inf")
    submerge.merge(ta_config(base, fts, weight=1.0), out, quiet=True)
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / "model.safetensors").values())
