"""``submerge bench-export``: the benchmark's models and validation data as ordinary files, so ``submerge tune``
(or any tool) runs on them as on a user's own fine-tunes.

Layout of the folder::

    base/                        the pre-trained backbone (a Hugging Face folder)
    experts/<task>/              each task's expert (Hugging Face folder) + submerge_head.safetensors, its frozen
                                 zero-shot head (class-prompt embeddings; labels in the file's metadata)
    data/<task>.val.jsonl        the task's validation split ({"text", "label"}), as the benchmark scores it
    data/<task>.calib.jsonl      the benchmark's calibration inputs of the task (ESM, RegMean statistics)
    tune.yaml                    a tune config reproducing the benchmark's val-tuned rows of TA, TIES, TSV-M,
                                 Iso-CTS and ESM

No test example is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from submerge.bench.presets import tune_search
from submerge.bench.session import BenchConfig, BenchSession
from submerge.evaluate.scorers import HEAD_FILE
from submerge.io import atomic_folder
from submerge.io.ledger import one_run
from submerge.io.writer import check_finite, save_tensors

TUNE_METHODS = ("task_arithmetic", "ties", "tsv", "iso_cts", "esm")


@one_run
def export_bench(out_dir: str | Path, cfg: Optional[BenchConfig] = None, overwrite: bool = False,
                 methods: tuple[str, ...] = TUNE_METHODS) -> Path:
    from transformers.utils import logging as hf_logging

    cfg = cfg or BenchConfig.quick()
    S = BenchSession(cfg)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per saved folder says nothing here
    try:
        _write(out_dir, overwrite, cfg, S, methods)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    S.say(f"wrote {out_dir}: base, {len(S.tasks)} experts, validation data and tune.yaml")
    return Path(out_dir)


def _write(out_dir: str | Path, overwrite: bool, cfg: BenchConfig, S: BenchSession, methods: tuple[str, ...]) -> None:

    bb = S.bb
    with atomic_folder(out_dir, overwrite, "export folder") as tmp:
        bb.reset()
        bb.model.save_pretrained(tmp / "base", safe_serialization=True)
        bb.tokenizer.save_pretrained(tmp / "base")
        (tmp / "data").mkdir()
        models, tasks = [], {}
        for t, expert in zip(S.tasks, S.experts):
            d = tmp / "experts" / t.name
            bb.load(expert)
            check_finite(bb.model.state_dict(), f"export expert {t.name}")
            bb.model.save_pretrained(d, safe_serialization=True)
            bb.tokenizer.save_pretrained(d)
            bb.reset()
            save_tensors({"weight": S.heads[t.name]}, d / HEAD_FILE, f"export head {t.name}",
                         metadata={"format": "submerge-head/1", "pooling": "mean", "normalize": "true",
                                   "labels": json.dumps(list(t.class_names)),
                                   "logit_scale": str(cfg.recipe.logit_scale)})
            texts, labels = S.splits[t.name].val
            with open(tmp / "data" / f"{t.name}.val.jsonl", "w") as f:
                for x, y in zip(texts, labels):
                    f.write(json.dumps({"text": x, "label": int(y)}) + "\n")
            calib, _ = S.sample(t.name, cfg.calib_split, cfg.calib_n, 0)
            with open(tmp / "data" / f"{t.name}.calib.jsonl", "w") as f:
                for x in calib:
                    f.write(json.dumps({"text": x}) + "\n")
            models.append({"model": f"experts/{t.name}", "name": t.name,
                           "calibrate": {"inputs": f"data/{t.name}.calib.jsonl"}})
            tasks[t.name] = {"data": f"data/{t.name}.val.jsonl"}
        search = tune_search(methods)
        config = {
            "base_model": "base",
            "models": models,
            # the benchmark's statistics: its calib_n inputs, one batch, truncated as the experts were trained
            "calibrate": {"n": cfg.calib_n, "max_length": cfg.recipe.max_len, "batch_size": cfg.calib_n},
            "search": search,
            "eval": {"scorer": "classification", "max_length": cfg.recipe.max_len, "batch_size": 128,
                     "tasks": tasks},
            "objective": "mean",
        }
        head = (f"# Written by `submerge bench-export` (suite {cfg.suite if not cfg.tasks else 'custom'}, seed "
                f"{cfg.seed}).\n# Run: submerge tune {Path(out_dir).name}/tune.yaml tuned\n"
                f"# Validation data only; lambda/alpha: auto is the benchmark's own scale search.\n")
        (tmp / "tune.yaml").write_text(head + yaml.safe_dump(config, sort_keys=False))
