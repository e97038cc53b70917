"""Rows kept between runs: each finished method's rows cached beside the experts (a stopped run resumes at the next
method), and an earlier run's ``results.json`` read and checked for ``bench --resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from submerge.bench.evaluate import pack_correct, unpack_correct
from submerge.bench.presets import METHOD_SETTINGS
from submerge.bench.session import BenchConfig, BenchSession
from submerge.errors import ConfigError, quoted
from submerge.version import __version__


def row_settings(cfg: dict) -> dict:
    """The settings (a config as a dict) that change every method's numbers: less what only picks methods or
    prints, and less the settings one method alone reads (``METHOD_SETTINGS``: they key that method's rows)."""
    own = {k for keys in METHOD_SETTINGS.values() for k in keys}
    return {k: v for k, v in cfg.items() if k not in ("methods", "quiet", "cache_dir") and k not in own}

class RowCache:
    """Each finished method's rows and per-example test correctness, kept beside the experts
    (``<cache>/bench-rows/<settings>/<method>.json``), so a run that is stopped (a full text8 run is hours on
    2 cores) resumes at the next method.  Keyed by every setting that changes a number: the config (less
    what only picks methods or prints), the experts and the submerge version."""

    def __init__(self, S: "BenchSession", cfg: BenchConfig):
        settings = row_settings(asdict(cfg))
        # a setting only one method reads keys that method's file alone (so adding one keeps the others' rows)
        self.suffix = {m: "-" + hashlib.sha256(json.dumps([getattr(cfg, k, None) for k in keys]).encode()).hexdigest()[:8]
                       for m, keys in METHOD_SETTINGS.items()}
        questions = {"questions": S.questions_key} if getattr(S, "questions_key", None) else {}
        blob = json.dumps({"cfg": settings, "experts": S.expert_keys, "backbone": S.fingerprint,
                           "version": __version__, **questions}, sort_keys=True, default=str)
        self.folder = S.cache / "bench-rows" / hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.sizes = {name: S.test_size(name) for name in S.names}

    def _name(self, method: str, part: str = "") -> str:
        return f"{method}{self.suffix.get(method, '')}{part}.json"

    def get(self, method: str) -> Optional[tuple[list[dict], dict]]:
        return self._read(self._name(method))

    def put(self, method: str, rows: list[dict], test_correct: dict) -> None:
        self._write(self._name(method), rows, test_correct)
        (self.folder / self._name(method, ".partial")).unlink(missing_ok=True)

    def partial(self, method: str) -> "PartialRows":
        """The rows of ``method`` finished so far, kept one by one (a method of many slow rows, ESM++'s routed
        scoring, resumes at its next row); dropped when the method's rows are :meth:`put`."""
        return PartialRows(self, self._name(method, ".partial"))

    def _read(self, name: str) -> Optional[tuple[list[dict], dict]]:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            hit = json.loads(path.read_text())
            correct_ = {label: {k: unpack_correct(v, self.sizes[k]) for k, v in per.items()}
                        for label, per in hit["correct"].items()}
        except (ValueError, KeyError, TypeError):  # a damaged file: the rows are computed again
            return None
        return hit["rows"], correct_

    def _write(self, name: str, rows: list[dict], test_correct: dict) -> None:
        labels = [r["label"] for r in rows]
        blob = {"rows": rows, "correct": {lab: {k: pack_correct(v) for k, v in test_correct[lab].items()}
                                          for lab in labels}}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(json.dumps(blob))
        tmp.replace(self.folder / name)


class PartialRows:
    """One method's finished rows (by label) in the row cache, before the method is done."""

    def __init__(self, cache: RowCache, name: str):
        self.cache, self.name = cache, name
        hit = cache._read(name) if cache.folder.is_dir() else None
        self.rows: list[dict] = hit[0] if hit else []
        self.correct: dict = hit[1] if hit else {}

    def get(self, label: str) -> Optional[tuple[dict, dict]]:
        row = next((r for r in self.rows if r["label"] == label), None)
        return None if row is None or label not in self.correct else (row, self.correct[label])

    def put(self, row: dict, correct: dict) -> None:
        self.rows = [r for r in self.rows if r["label"] != row["label"]] + [row]
        self.correct[row["label"]] = correct
        self.cache._write(self.name, self.rows, self.correct)

MAX_RESUME_BYTES = 256 * 1024 * 1024


MAX_RESUME_ROWS = 10_000


def read_resume(path: str | Path, cfg: "BenchConfig") -> dict:
    """An earlier run's ``results.json``, read and checked before anything else of a run is done (no backbone,
    data or expert is loaded for a file that cannot be used): a regular JSON file whose ``config`` holds this
    run's settings (less what only picks methods or prints), whose ``rows`` are objects naming their
    ``method`` and ``label``, and whose ``per_example`` maps to objects.  Returns the parsed file."""
    from submerge.io.files import read_user_text

    path = Path(path)
    where = f"--resume {path}"
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror})") from None
    if size > MAX_RESUME_BYTES:
        raise ConfigError(f"{where}: {size / 1e6:.0f} MB, larger than a bench results.json can be")
    try:
        old = json.loads(read_user_text(path, "--resume file"))
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: not a readable bench results.json (not valid JSON: "
                          f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{where}: not a bench results.json (expected a JSON object)")
    for key, kind in (("config", dict), ("rows", list), ("per_example", dict)):
        if not isinstance(old.get(key), kind):
            raise ConfigError(f"{where}: not a bench results.json ('{key}' must be a JSON "
                              f"{'object' if kind is dict else 'list'}, got {type(old.get(key)).__name__})")
    if len(old["rows"]) > MAX_RESUME_ROWS:
        raise ConfigError(f"{where}: {len(old['rows'])} rows; a bench results.json holds at most {MAX_RESUME_ROWS}")
    for i, row in enumerate(old["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("method"), str) or not isinstance(row.get("label"), str):
            raise ConfigError(f"{where}: rows[{i}] is not a row (an object with 'method' and 'label' strings)")
    if not all(isinstance(v, dict) for v in old["per_example"].values()):
        raise ConfigError(f"{where}: per_example must map to objects (per row / model, per task)")
    # the suite's name is not compared: a task list is "custom" in results.json; the tasks are compared later
    mine = {k: v for k, v in row_settings(asdict(cfg)).items() if k != "suite"}
    theirs = {k: v for k, v in row_settings(old["config"]).items() if k != "suite"}
    differ = sorted(k for k in set(mine) | set(theirs)
                    if json.dumps(mine.get(k), sort_keys=True, default=str)
                    != json.dumps(theirs.get(k), sort_keys=True, default=str))
    if differ:
        raise ConfigError(f"{where}: that run's settings differ from this one's in "
                          + ", ".join(f"{k} ({quoted(theirs.get(k))} there, {quoted(mine.get(k))} here)"
                                      for k in differ[:6]) + (" ..." if len(differ) > 6 else ""))
    old["_path"] = str(path)
    return old

def check_same_scores(path: str, which: str, names: Sequence[str], packed: dict, scores: dict) -> None:
    """Refuse a resumed run (``path``) whose ``which`` models (finetuned or zeroshot) scored some test example
    differently (``packed``: its per-task bits as a results file keeps them) from this session's ``scores``."""
    bad = [t for t in names if packed.get(t) != pack_correct(scores[t])]
    if bad:
        raise ConfigError(f"--resume {path}: the {which} models there score test examples differently from "
                          f"this session's on {', '.join(bad)} — other experts (fine-tuning not reproduced "
                          f"here); its rows cannot be mixed with this run's")


def import_rows(S: "BenchSession", cache: RowCache, old: dict, methods: Sequence[str]) -> list[str]:
    """Put the rows of an earlier run's ``results.json`` (read and checked by :func:`read_resume`) into the row
    cache, so this run computes only the methods (or rows: ``multitask``) it lacks and writes one results.json
    with all of them.  Refused unless that run had the same backbone, tasks and the same experts — their
    per-example test correctness must equal this session's, which retrained experts meet only when
    fine-tuning is reproducible.  Rows of a method whose own settings differ, and rows saved without
    per-example correctness, are left out (computed again).  Returns the methods imported."""
    path, cfg = old["_path"], S.cfg
    old_cfg, old_rows, per = old["config"], old["rows"], old["per_example"]
    backbone = old.get("backbone")
    if old.get("tasks") != S.names or not isinstance(backbone, dict) or backbone.get("sha256") != S.fingerprint:
        raise ConfigError(f"--resume {path}: another backbone or task list ({quoted(old.get('tasks'))})")
    for which, scores in (("finetuned", S.ft_test), ("zeroshot", S.zs_test)):
        check_same_scores(path, which, S.names, per.get(which) or {}, scores)
    by_method: dict[str, list[dict]] = {}
    for row in old_rows:
        by_method.setdefault(row["method"], []).append(row)
    imported = []
    for method, rows in by_method.items():
        if method != "multitask" and method not in methods:
            continue
        own = METHOD_SETTINGS.get(method, ())
        if any(json.dumps(old_cfg.get(k)) != json.dumps(getattr(cfg, k)) for k in own):
            continue
        try:
            correct_ = {r["label"]: {t: unpack_correct(per["rows"][r["label"]][t], cache.sizes[t]) for t in S.names}
                        for r in rows}
        except (KeyError, TypeError, ValueError):
            continue
        if method == "multitask":  # how it was trained, as the fine-tuning log said
            log = (old.get("finetune_log") or {}).get("multitask (all tasks jointly)")
            rows = [{**r, "train_log": r.get("train_log", log or {})} for r in rows]
        cache.put(method, rows, correct_)
        imported.append(method)
    return imported
