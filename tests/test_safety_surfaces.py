"""Safe on every surface (issue 28): the guarantees of `merge` held by analyze, tune, Hub refs, adapters,
tokenizers, extract-lora, bench --resume and surgery.  Each test reproduces one finding of the issue and
failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from submerge.errors import CheckpointError
from submerge.io import OutputError, check_output_target
from submerge.io.ledger import recorded, run_scope
from test_hub import COMMIT, lay_out_cache
from test_safety import assert_one_line_error, snapshot
from test_safety import run_cli as run
from test_tune import _config, cls_family  # noqa: F401 (the fixture is used by name)

TASKS = ("sentiment", "animal")


def cli_subprocess(args, cwd, env=None, timeout=120):
    """The console script in a child process (a hang fails the test instead of CI)."""
    return subprocess.run([sys.executable, "-m", "submerge.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_line(proc, *fragments):
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    for f in fragments:
        assert f in lines[0], lines[0]


# ------------------------------------------------------------------ 1. every input read is an input of the run
def analyze_config(root: Path, where: Path, data_dir: str = "data") -> Path:
    (where / data_dir).mkdir(parents=True, exist_ok=True)
    for t in TASKS:
        shutil.copy(root / f"{t}.val.jsonl", where / data_dir / f"{t}.val.jsonl")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "parameters": {"lambda": 0.6},
           "models": [{"model": str(root / t), "parameters": {"weight": 1.0}} for t in TASKS],
           "eval": {"scorer": "classification", "max_length": 16,
                    "tasks": {t: {"data": f"{data_dir}/{t}.val.jsonl"} for t in TASKS}}}
    p = where / "an.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_analyze_overwrite_never_deletes_its_eval_data(cls_family, tmp_path):
    cfg = analyze_config(cls_family, tmp_path)
    before = snapshot(tmp_path / "data")
    r = run(["analyze", cfg.name, "data", "--overwrite", "-q"], cwd=tmp_path)
    assert_one_line_error(r, "refusing analysis folder data", "contains an input of this run", "val.jsonl")
    assert snapshot(tmp_path / "data") == before


def test_tune_refuses_an_out_holding_its_scorer_file(cls_family, tmp_path):
    scorers = tmp_path / "scorers"
    scorers.mkdir()
    (scorers / "acc.py").write_text("def score(model, task):\n    return 1.0\n")
    cfg = _config(cls_family, [{"method": "linear", "weight": 1.0}])
    for m in cfg["models"]:
        m.pop("calibrate")
    cfg["eval"]["scorer"] = {"python": "scorers/acc.py:score"}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
    before = snapshot(scorers)
    r = run(["tune", tmp_path / "t.yml", scorers, "--overwrite", "-q"], cwd=tmp_path)
    assert_one_line_error(r, "contains an input of this run", "acc.py")
    assert snapshot(scorers) == before


def test_what_a_run_reads_is_recorded_and_refused_as_out(tmp_path):
    from submerge.io.files import read_user_text

    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "x.txt"
    f.write_text("hello")
    with run_scope():
        read_user_text(f)
        assert f in recorded()
        with pytest.raises(OutputError, match="contains an input"):
            check_output_target(tmp_path / "in")
        with pytest.raises(OutputError, match="lies inside an input"):
            check_output_target(f / "sub")
    assert recorded() == []  # the record ends with the run
    check_output_target(tmp_path / "in")  # another run may write there


def test_an_input_read_while_writing_is_checked_before_out_is_replaced(tmp_path):
    """The last check runs against what the run read inside the block too: OUT is left as it was."""
    from submerge.io import atomic_folder
    from submerge.io.files import read_user_text

    out = tmp_path / "out"
    out.mkdir()
    (out / "data.txt").write_text("precious")
    with pytest.raises(OutputError, match="contains an input"):
        with atomic_folder(out, overwrite=True) as tmp:
            read_user_text(out / "data.txt")
            (tmp / "result").write_text("new")
    assert (out / "data.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------ 2. Hub revisions and refs are data, not paths
@pytest.fixture
def hub(family, tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, fts = family
    lay_out_cache(home, "org/good", fts[0])
    outside = tmp_path / "outside" / "model"
    shutil.copytree(fts[1], outside)
    return home, base, outside, home / "hub" / "models--org--good"


def _merge_one(base, ref, tmp_path) -> Path:
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                   "models": [{"model": ref, "parameters": {"weight": 1.0}}]}))
    return cfg


@pytest.mark.parametrize("case", ["fifo_revision", "fifo_ref"])
def test_hub_fifo_revision_or_ref_never_hangs(hub, tmp_path, case):
    home, base, outside, repo = hub
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    if case == "fifo_revision":
        ref = f"org/good@{fifo}"
    else:
        (repo / "refs" / "main").unlink()
        os.mkfifo(repo / "refs" / "main")
        ref = "org/good"
    cfg = _merge_one(base, ref, tmp_path)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    for cmd in (["validate", cfg], ["merge", cfg, tmp_path / "out"]):
        proc = cli_subprocess(cmd, tmp_path, env)
        one_line(proc, "org/good")
        assert ("not a commit hash, branch or tag" if case == "fifo_revision" else "FIFO") in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["ref_relative", "ref_absolute", "snapshot_symlink", "revision_file"])
def test_hub_refs_never_reach_outside_the_cache(hub, tmp_path, case):
    home, base, outside, repo = hub
    if case == "ref_relative":
        (repo / "refs" / "main").write_text("../../../../outside/model")
        ref, fragment = "org/good", "not a commit hash"
    elif case == "ref_absolute":
        (repo / "refs" / "main").write_text(str(outside))
        ref, fragment = "org/good", "not a commit hash"
    elif case == "snapshot_symlink":
        snap = repo / "snapshots" / COMMIT
        shutil.rmtree(snap)
        snap.symlink_to(outside, target_is_directory=True)
        ref, fragment = "org/good", "outside the repository's cache folder"
    else:
        named = tmp_path / "rev"
        named.write_text(str(outside))
        ref, fragment = f"org/good@{named}", "not a commit hash, branch or tag"
    cfg = _merge_one(base, ref, tmp_path)
    for cmd in (["validate", cfg], ["merge", cfg, tmp_path / "out"]):
        assert_one_line_error(run(cmd, cwd=tmp_path), fragment)
    assert not (tmp_path / "out").exists()


def test_revision_names_follow_git_rules():
    from submerge.io.hub import parse_hub_id, valid_revision

    for ok in ("main", "v1.0", "refs-pr-1", "feature/x", COMMIT, "release_2024.01"):
        assert valid_revision(ok), ok
        assert parse_hub_id(f"org/name@{ok}").revision == ok
    for bad in ("/abs/path", "../x", "a/../b", "a//b", ".hidden", "x.lock", "a/", "x@y", "x y", "", "a\0b"):
        assert not valid_revision(bad), bad
        with pytest.raises(CheckpointError, match="not a commit hash"):
            parse_hub_id(f"org/name@{bad}")


# ------------------------------------------------------------------ 3. extract-lora: finite in, finite out
@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    from test_extract_lora import pair

    return pair.__wrapped__(tmp_path_factory) if hasattr(pair, "__wrapped__") else \
        pair._get_wrapped_function()(tmp_path_factory)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_extract_lora_refuses_a_non_finite_fine_tune(llama_pair, tmp_path, bad):
    root, base, ft = llama_pair
    broken = tmp_path / "ft"
    shutil.copytree(ft, broken)
    sd = load_file(broken / "model.safetensors")
    name = next(n for n in sd if n.endswith("q_proj.weight"))
    sd[name][0, 0] = bad
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    r = run(["extract-lora", base, broken, tmp_path / "lora", "--rank", "4", "-q"])
    assert_one_line_error(r, name, "NaN/Inf", "nothing was written")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("arch", [["pipeline"], [123], ["BertModel"]], ids=["function", "number", "other-model"])
def test_extract_lora_architectures_that_name_no_usable_class(llama_pair, tmp_path, arch):
    root, base, ft = llama_pair
    b = tmp_path / "base"
    shutil.copytree(base, b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["architectures"] = arch
    (b / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run(["extract-lora", b, ft, tmp_path / "lora", "-q"]), "config.json")
    assert not (tmp_path / "lora").exists()


# ------------------------------------------------------------------ 4. files handed to transformers are contained
@pytest.fixture
def linked_tokenizer(cls_family, tmp_path):
    """The classifier family with the base's (and an expert's) tokenizer.json a symlink out of its folder."""
    outside = tmp_path / "outside.json"
    shutil.copy(cls_family / "base" / "tokenizer.json", outside)
    work = tmp_path / "w"
    for name in ("base", *TASKS):
        shutil.copytree(cls_family / name, work / name)
    for name in ("base", "sentiment"):
        (work / name / "tokenizer.json").unlink()
        (work / name / "tokenizer.json").symlink_to(outside)
    return work


def test_merge_with_a_chat_template_refuses_a_tokenizer_link_out_of_the_folder(linked_tokenizer, tmp_path):
    w = linked_tokenizer
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "chat_template": "chatml",
                                   "models": [{"model": str(w / t), "parameters": {"weight": 1.0}} for t in TASKS]}))
    assert_one_line_error(run(["merge", cfg, tmp_path / "out"]), "tokenizer.json", "outside")
    assert not (tmp_path / "out").exists()


def test_tune_and_surgery_refuse_a_tokenizer_link_out_of_the_folder(linked_tokenizer, cls_family, tmp_path):
    w = linked_tokenizer
    cfg = _config(w, [{"method": "linear", "weight": 1.0}])
    for m in cfg["models"]:
        m.pop("calibrate")
    cfg["eval"]["tasks"] = {t: {"data": str(cls_family / f"{t}.val.jsonl")} for t in TASKS}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
    assert_one_line_error(run(["tune", tmp_path / "t.yml", tmp_path / "tuned", "-q"]), "tokenizer.json", "outside")
    (tmp_path / "in.txt").write_text("good dog\nbad cat\n")
    r = run(["surgery", w / "animal", "--expert", f"a={w / 'sentiment'}", "--inputs", f"a={tmp_path / 'in.txt'}",
             "--steps", "1", "-q"])
    assert_one_line_error(r, "tokenizer.json", "outside")
    assert not (w / "animal" / "surgery.safetensors").exists()


# ------------------------------------------------------------------ 5. Ray addresses that are not Ray
def test_tune_ray_address_that_is_not_a_ray_head_is_one_line_and_bounded(cls_family, tmp_path):
    pytest.importorskip("ray")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve():  # a plain TCP service: accepts, answers something that is not HTTP/2, keeps the socket open
        server.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                c, _ = server.accept()
                c.sendall(b"220 hello\r\n")
                conns.append(c)
            except OSError:
                pass
        for c in conns:
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        cfg = _config(cls_family, [{"method": "linear", "weight": 1.0}])
        (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        r = run(["tune", tmp_path / "t.yml", tmp_path / "out", "--backend", "ray", "--address", f"127.0.0.1:{port}"])
        assert time.perf_counter() - t0 < 30
        assert_one_line_error(r, "not a Ray head")
    finally:
        stop.set()
        t.join()
        server.close()


# ------------------------------------------------------------------ 6. grids with a size cap
@pytest.mark.parametrize("grid, fragment", [
    ({"range": [0, 1e12], "step": 1e-3}, "at most 10000"),
    ({"range": [0, 1], "step": float("nan")}, "step must be a positive finite number"),
    ({"range": [0, float("inf")], "step": 0.1}, "finite numbers"),
    ({"range": [0, 1], "steps": 10**9}, "at most 10000"),
])
def test_grids_are_capped_and_finite_before_any_work(cls_family, tmp_path, grid, fragment):
    cfg = _config(cls_family, [{"method": "task_arithmetic", "weight": 1.0, "lambda": grid}])
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    assert_one_line_error(run(["tune", tmp_path / "t.yml", tmp_path / "out", "-q"]), fragment)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "out").exists()


def test_the_product_of_grids_is_capped(cls_family, tmp_path):
    cfg = _config(cls_family, [{"method": "ties", "weight": 1.0, "lambda": 1.0,
                                "density": {"range": [0.0001, 1], "steps": 9999}}] * 11)
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cfg))
    assert_one_line_error(run(["tune", tmp_path / "t.yml", tmp_path / "out", "-q"]), "candidates; at most")


# ------------------------------------------------------------------ 7. one line, never a traceback
def _tune_with(cls_family, tmp_path, edit) -> Path:
    cfg = _config(cls_family, [{"method": "linear", "weight": 1.0}])
    for m in cfg["models"]:
        m.pop("calibrate")
    edit(cfg)
    p = tmp_path / "t.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("label", [5, -1, True, "x" * 20_000_000], ids=["5", "-1", "true", "20MB"])
def test_tune_eval_labels_that_are_not_classes(cls_family, tmp_path, label):
    rows = [json.loads(x) for x in (cls_family / "sentiment.val.jsonl").read_text().splitlines()]
    rows[3]["label"] = label
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _tune_with(cls_family, tmp_path,
                     lambda c: c["eval"]["tasks"]["sentiment"].update(data=str(tmp_path / "bad.jsonl")))
    r = run(["tune", cfg, tmp_path / "out", "-q"])
    assert_one_line_error(r, "of row 4 is not a class")
    assert len(r.output) < 1200


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["eval"].update(scorer={"python": "os:system"}), "cannot be called as system(model, task)"),
    (lambda c: c["eval"].update(scorer={"python": "builtins:len"}), "cannot be called as len(model, task)"),
    (lambda c: c["eval"].update(options="x"), "options must be a mapping"),
    (lambda c: c["eval"].update(options=[1, 2]), "options must be a mapping"),
])
def test_tune_eval_block_mistakes_are_one_line(cls_family, tmp_path, edit, fragment):
    cfg = _tune_with(cls_family, tmp_path, edit)
    assert_one_line_error(run(["tune", cfg, tmp_path / "out", "-q"]), fragment)


def test_error_lines_never_quote_a_huge_value(cls_family, tmp_path):
    cfg = _tune_with(cls_family, tmp_path, lambda c: c["search"][0].update(method="y" * 5_000_000))
    r = run(["tune", cfg, tmp_path / "out", "-q"])
    assert_one_line_error(r, "unknown method")
    assert len(r.output) <= 1100


# ------------------------------------------------------------------ 8. a scorer file resolves like the eval data
def test_python_scorer_file_resolves_against_the_config_folder(cls_family, tmp_path):
    from submerge.tune.spec import load_tune

    conf = tmp_path / "conf"
    elsewhere = tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    (conf / "sc.py").write_text("def score(model, task):\n    return 0.5\n")
    (elsewhere / "sc.py").write_text("raise RuntimeError('the wrong file')\n")
    cfg = _config(cls_family, [{"method": "linear", "weight": 1.0}])
    cfg["eval"]["scorer"] = {"python": "sc.py:score"}
    (conf / "t.yml").write_text(yaml.safe_dump(cfg))
    old = os.getcwd()
    try:
        os.chdir(elsewhere)
        spec = load_tune(conf / "t.yml")
    finally:
        os.chdir(old)
    assert {t.scorer for t in spec.tasks} == {f"python:{conf / 'sc.py'}:score"}


# ------------------------------------------------------------------ 9. bench --resume is read first
@pytest.mark.parametrize("content, fragment", [
    ({"config": {}, "rows": [{"label": "x"}], "per_example": {}}, "rows[0] is not a row"),
    ({"config": {}, "rows": "abc", "per_example": {}}, "'rows' must be a JSON list"),
    ({"config": {}, "rows": [], "per_example": []}, "'per_example' must be a JSON object"),
    ({"config": [], "rows": [], "per_example": {}}, "'config' must be a JSON object"),
    ({"config": {}, "rows": ["a", "b"], "per_example": {}}, "rows[0] is not a row"),
    ({"config": {}, "rows": [{"method": "m", "label": "l"}] * 1_000_000, "per_example": {}}, "at most 10000"),
    ([1, 2], "expected a JSON object"),
], ids=["no-method", "string-rows", "list-per-example", "list-config", "string-row", "huge", "list"])
def test_bench_resume_is_checked_before_anything_is_loaded(tmp_path, content, fragment):
    resume = tmp_path / "old.json"
    resume.write_text(json.dumps(content))
    # a backbone that does not exist: were the backbone read first, the error would name it
    r = run(["bench", "--tasks", "rt_sentiment", "--backbone", tmp_path / "no-backbone", "--out", tmp_path / "res",
             "--resume", resume, "-q"])
    assert_one_line_error(r, "--resume", fragment)
    assert not (tmp_path / "res").exists()


def test_bench_resume_of_another_configuration_names_the_setting(tmp_path):
    from dataclasses import asdict

    from submerge.bench.session import BenchConfig

    cfg = asdict(BenchConfig(tasks=["rt_sentiment"]))
    cfg["n_train"] = 7
    (tmp_path / "old.json").write_text(json.dumps({"config": cfg, "rows": [], "per_example": {}}))
    r = run(["bench", "--tasks", "rt_sentiment", "--backbone", tmp_path / "nope", "--out", tmp_path / "res",
             "--resume", tmp_path / "old.json", "-q"])
    assert_one_line_error(r, "settings differ", "n_train")
    assert not (tmp_path / "res").exists()


# ------------------------------------------------------------------ 10/11. adapters: what PEFT refuses, validate refuses
@pytest.fixture(scope="module")
def lora(family, tmp_path_factory):
    from transformers import LlamaForCausalLM

    from test_lora_in import make_adapter

    base, _ = family
    root = tmp_path_factory.mktemp("lora")
    return base, make_adapter(LlamaForCausalLM, base, root / "adapter", r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"])


def _adapter_variant(lora, tmp_path, config_edit=None, tensor_edit=None) -> tuple[Path, Path]:
    base, adapter = lora
    a = tmp_path / "adapter"
    shutil.copytree(adapter, a)
    if config_edit is not None:
        cfg = json.loads((a / "adapter_config.json").read_text())
        config_edit(cfg)
        (a / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor_edit is not None:
        sd = load_file(a / "adapter_model.safetensors")
        tensor_edit(sd)
        save_file(sd, a / "adapter_model.safetensors")
    cfg_path = tmp_path / "m.yml"
    cfg_path.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                        "models": [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}}]}))
    return cfg_path, a


def _first(sd, part):
    return next(k for k in sorted(sd) if part in k)


def _set(key_part, fn):
    def edit(sd):
        k = _first(sd, key_part)
        sd[k] = fn(sd[k])
    return edit


@pytest.mark.parametrize("config_edit, tensor_edit, fragment", [
    (lambda c: c.update(lora_alpha="abc"), None, "lora_alpha must be a finite number"),
    (lambda c: c.update(lora_alpha=[1]), None, "lora_alpha must be a finite number"),
    (lambda c: c.update(alpha_pattern="abc"), None, "alpha_pattern must map"),
    (lambda c: c.update(alpha_pattern={"(": 4}), None, "is not a valid pattern"),
    (lambda c: c.update(alpha_pattern={"q_proj": "x"}), None, "must be a finite number"),
    (lambda c: c.update(r=0), None, "r must be a positive integer"),
    (lambda c: c.update(r=-4), None, "r must be a positive integer"),
    (lambda c: c.update(r=1e9), None, "r must be a positive integer"),
    (lambda c: c.update(r="four"), None, "r must be a positive integer"),
    (lambda c: c.update(r=8), None, "rank-4 lora_A/lora_B, but adapter_config.json gives it r = 8"),
    (lambda c: c.update(target_modules=["nope_proj"]), None, "target_modules ['nope_proj'] does not name"),
    (lambda c: c.update(target_modules=5), None, "target_modules must be"),
    (lambda c: c.update(rank_pattern={"q_proj": 0}), None, "rank_pattern"),
    (None, _set("q_proj.lora_A", lambda t: torch.zeros(4, 32)), "but the base model's"),
    (None, _set("q_proj.lora_A", lambda t: torch.zeros(t.shape[1])), "which do not multiply"),
    (None, _set("q_proj.lora_B", lambda t: torch.zeros(t.shape[0], 3)), "which do not multiply"),
    (None, _set("q_proj.lora_A", lambda t: torch.zeros(t.shape[0], t.shape[1] * 2)), "the base model's"),
    (None, lambda sd: sd.update({k: (torch.zeros(0, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 0))
                                 for k, v in list(sd.items())}), "rank-0 lora_A/lora_B"),
], ids=["alpha-abc", "alpha-list", "pattern-abc", "pattern-regex", "pattern-x", "r0", "r-4", "r1e9", "r-four",
        "r8-rank4", "targets-nope", "targets-5", "rank-pattern-0", "A-wide", "A-1d", "B-rank", "wrong-layer",
        "rank-0"])
def test_bad_adapters_are_refused_by_validate(lora, tmp_path, config_edit, tensor_edit, fragment):
    cfg, _ = _adapter_variant(lora, tmp_path, config_edit, tensor_edit)
    assert_one_line_error(run(["validate", cfg]), fragment)
    assert_one_line_error(run(["merge", cfg, tmp_path / "out"]), fragment)
    assert not (tmp_path / "out").exists()


def test_an_untouched_adapter_still_merges(lora, tmp_path):
    cfg, _ = _adapter_variant(lora, tmp_path)
    r = run(["validate", cfg])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ 12. surgery's files after a kill -9
def test_a_killed_surgery_write_is_cleaned_by_the_next_run(tmp_path, caplog):
    from submerge.routing.surgery import SURGERY_FILE, SurgerySet

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    stale = [tmp_path / f".{SURGERY_FILE}.submerge-tmp-{dead}-0123abcd", tmp_path / f".{SURGERY_FILE}.89abcdef"]
    for p in stale:
        p.write_bytes(b"half a file")
    live = tmp_path / f".{SURGERY_FILE}.submerge-tmp-{os.getpid()}-fedcba98"
    live.write_bytes(b"being written")
    s = SurgerySet(["a"], torch.zeros(1, 2, 4), torch.zeros(1, 4, 2), torch.zeros(1, 4), {})
    with caplog.at_level("WARNING", logger="submerge"):
        s.save(tmp_path)
    assert not any(p.exists() for p in stale)
    assert live.exists()  # a live owner's file is never taken
    assert "interrupted run" in caplog.text
    assert SurgerySet.load(tmp_path).tasks == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, SURGERY_FILE, "surgery.json"])


# ------------------------------------------------------------------ outputs other than merges are checked finite too
def test_tensor_files_are_checked_finite_before_they_are_written(tmp_path):
    from submerge.errors import NonFiniteError
    from submerge.io.writer import save_tensors
    from submerge.routing.surgery import SurgerySet

    with pytest.raises(NonFiniteError, match="tensor b holds 1 NaN/Inf"):
        save_tensors({"a": torch.zeros(2), "b": torch.tensor([0.0, float("nan")])}, tmp_path / "x.safetensors",
                     "test")
    assert not (tmp_path / "x.safetensors").exists()
    s = SurgerySet(["a"], torch.full((1, 2, 4), float("inf")), torch.zeros(1, 4, 2), torch.zeros(1, 4), {})
    with pytest.raises(NonFiniteError, match="surgery modules: tensor down"):
        s.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ issue 29's small things
def test_cache_lists_and_clears_only_submerges_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    experts = tmp_path / ".cache" / "submerge" / "experts"
    experts.mkdir(parents=True)
    (experts / "e.safetensors").write_bytes(b"x" * 2_000_000)
    hf = tmp_path / ".cache" / "huggingface"
    hf.mkdir()
    (hf / "keep").write_text("not ours")
    r = run(["cache"])
    assert r.exit_code == 0 and "experts" in r.output and "2.0 MB" in r.output and "(none yet)" in r.output
    assert_one_line_error(run(["cache", "clear"]), "--yes")  # no terminal to ask: refused, nothing removed
    assert experts.exists()
    r = run(["cache", "clear", "experts", "--yes"])
    assert r.exit_code == 0 and "removed 2.0 MB" in r.output
    assert not experts.exists() and (hf / "keep").exists()


def test_demo_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = run(["demo", "--method", "task_arithmetic"])
    assert r.exit_code == 0, r.output
    assert "finite=True" in r.output and "Writing model shards" not in r.output
    assert list(tmp_path.iterdir()) == []
    r = run(["demo", "--out", tmp_path / "kept"])
    assert r.exit_code == 0 and (tmp_path / "kept" / "merged-ties" / "model.safetensors").exists()


def test_extract_lora_output_is_readable_and_names_its_base_absolutely(llama_pair, tmp_path):
    root, base, ft = llama_pair
    r = run(["extract-lora", base.name, ft, tmp_path / "lora", "--rank", "2", "-q"], cwd=base.parent)
    assert r.exit_code == 0, r.output
    mode = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()
    assert f"base_model: {base.resolve()}" in (tmp_path / "lora" / "README.md").read_text()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base.resolve())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_thread_count_follows_what_the_process_may_use(monkeypatch):
    """--threads' default: the CPU affinity, capped by a cgroup quota; torch and BLAS child processes follow."""
    import torch

    from submerge import device

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(device, "_cgroup_quota", lambda: None)
    assert device.available_cpus() == 4
    monkeypatch.setattr(device, "_cgroup_quota", lambda: 1.5)  # a container limited to 1.5 CPUs
    assert device.available_cpus() == 2
    monkeypatch.setattr(device, "_cgroup_quota", lambda: 0.2)
    assert device.available_cpus() == 1
    before = torch.get_num_threads()
    monkeypatch.setattr(device, "_USER_SET", set())
    for var in device.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    try:
        assert device.use_threads(1) == 1 and torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
        r = run(["merge", "--help"])
        assert "--threads" in r.output and "affinity" in r.output
    finally:
        torch.set_num_threads(before)


_FAULTS = """
import resource, sys, torch
from submerge import device
setting = getattr(device, sys.argv[1]) if sys.argv[1] != "none" else (lambda: None)
took = setting()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(15):  # glibc's heap settles (holes between small blocks coalesce) within about 10 rounds
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB allocated, touched, freed
before = faults()
for _ in range(5):
    torch.empty(16 << 20).fill_(1.0)
print(took, faults() - before, setting())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="the allocator settings are glibc's")
def test_freed_tensor_memory_is_reused_or_handed_back_as_each_setting_says():
    """The allocator settings, each in a fresh process (a setting holds for the process), on a 64 MiB tensor freed
    and allocated again once the heap has settled: glibc's default maps it afresh each time (16,384 page faults);
    keep_freed_memory (the LLM bench) and reuse_freed_buffers (merge) reuse its pages; bound_heap (1 MiB) maps it
    afresh, as the default does for blocks this size.  The user's own MALLOC_ variable wins (then the setting
    answers False and the default holds)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages for every mapping: a fresh 64 MiB block faults in 32 pages, not 16,384")

    def faults(setting, **env):
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("MALLOC_") and k not in ("SUBMERGE_MALLOC", "SUBMERGE_MALLOC_TUNING", "LD_PRELOAD")}
        r = subprocess.run([sys.executable, "-c", _FAULTS, setting], env={**base, **env}, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        took, n, again = r.stdout.split()
        return took, int(n), again

    fresh = 5 * 16384 * 0.9
    took, n, _ = faults("none")
    assert n > fresh, n  # the default: a fresh mapping every time
    took, n, again = faults("keep_freed_memory")
    assert took == again == "True" and n < 2000, n  # asked once per process; a second call answers the same
    took, n, _ = faults("reuse_freed_buffers")
    assert took == "True" and n < 2000, n
    took, n, _ = faults("bound_heap")
    assert took == "True" and n > fresh, n
    took, n, _ = faults("reuse_freed_buffers", MALLOC_TRIM_THRESHOLD_="131072")  # each opt-out: the next test
    assert took == "False" and n > fresh, n


def test_the_allocator_is_left_alone_when_the_user_chose(monkeypatch):
    """Every allocator setting answers False, touching nothing, under SUBMERGE_MALLOC=system (or the older
    SUBMERGE_MALLOC_TUNING=0), a preloaded allocator (jemalloc, tcmalloc), glibc's own MALLOC_ variables or its
    malloc tunables; release_memory, which changes no setting, still runs."""
    from submerge import device

    for var in [k for k in os.environ if k.startswith("MALLOC_")] + ["SUBMERGE_MALLOC", "SUBMERGE_MALLOC_TUNING",
                                                                   "LD_PRELOAD", "GLIBC_TUNABLES"]:
        monkeypatch.delenv(var, raising=False)
    for var, value in (("SUBMERGE_MALLOC", "system"), ("SUBMERGE_MALLOC_TUNING", "0"),
                       ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=1"),
                       ("MALLOC_ARENA_MAX", "2")):
        monkeypatch.setattr(device, "_kept", None)
        with monkeypatch.context() as m:
            m.setenv(var, value)
            assert device.keep_freed_memory() is False
            assert device.reuse_freed_buffers() is False
            assert device.bound_heap() is False
            device.release_memory()
