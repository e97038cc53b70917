"""``submerge bench-export --suite llm``: the LLM suite's models and validation data as ordinary files, so
``submerge tune`` (or any tool) runs on them as on a user's own chat fine-tunes.

Layout of the folder::

    base/                      the chat model (a Hugging Face folder: safetensors, tokenizer, chat template)
    experts/<skill>/           each skill's expert: a PEFT LoRA adapter (merged as base+experts/<skill>), or a full
                               model folder (--experts full)
    stats/<skill>/             calibration statistics of the skill's expert (submerge calibrate's format), for ESM
    data/<skill>.val.jsonl     the skill's validation questions ({"prompt", "answer", "shots"}), as the suite asks
    tune.yaml                  a tune config: TA, TIES, TSV-M, Iso-CTS and ESM with their scale searched, scored by
                               the generation scorer (exact match)

No test question is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from submerge.bench.llm.session import LLMBenchConfig, LLMSession
from submerge.bench.presets import tune_search
from submerge.io import atomic_folder
from submerge.io.files import checked_folder, copy_regular_file
from submerge.io.ledger import one_run
from submerge.io.writer import save_tensors

LLM_TUNE_METHODS = ("task_arithmetic", "ties", "tsv", "iso_cts", "esm")


def _copy_folder(src: Path, dst: Path) -> None:
    checked_folder(src, f"folder {src}")  # regular files, or links to them inside the folder
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            copy_regular_file(f, dst / f.name)


@one_run
def export_llm(out_dir: str | Path, cfg: Optional[LLMBenchConfig] = None, overwrite: bool = False,
               methods: tuple[str, ...] = LLM_TUNE_METHODS, backbone: Optional[str | Path] = None) -> Path:
    cfg = cfg or LLMBenchConfig()
    S = LLMSession(cfg, backbone)
    stats = S.calibration() if any(m == "esm" for m in methods) else None
    with atomic_folder(out_dir, overwrite, "export folder") as tmp:
        _copy_folder(S.cm.path, tmp / "base")
        (tmp / "data").mkdir()
        models, tasks = [], {}
        for i, t in enumerate(S.tasks):
            folder = S.cache / "experts" / S.expert_keys[i]
            if (folder / "adapter_config.json").is_file():
                _copy_folder(folder, tmp / "experts" / t.name)
                ref = f"base+experts/{t.name}"
            else:  # a full expert: its tensors with the base's config and tokenizer
                _copy_folder(S.cm.path, tmp / "experts" / t.name)
                save_tensors({k: v.contiguous() for k, v in S.experts[i].items()},
                             tmp / "experts" / t.name / "model.safetensors", f"export expert {t.name}",
                             metadata={"format": "pt"})
                ref = f"experts/{t.name}"
            entry = {"model": ref, "name": t.name}
            if stats is not None:
                stats[i].save(tmp / "stats" / t.name)
                entry["calibration"] = f"stats/{t.name}"
            models.append(entry)
            with open(tmp / "data" / f"{t.name}.val.jsonl", "w") as f:
                for q in S.splits[t.name].val:
                    f.write(json.dumps({"prompt": q.prompt, "answer": q.answer,
                                        "shots": [list(s) for s in q.shots]}) + "\n")
            tasks[t.name] = {"data": f"data/{t.name}.val.jsonl"}
        search = tune_search(methods)
        config = {
            "base_model": "base",
            "models": models,
            "search": search,
            "eval": {"scorer": "generation", "batch_size": cfg.eval_batch, "tasks": tasks},
            "objective": "mean",
        }
        head = (f"# Written by `submerge bench-export --suite llm` (seed {cfg.seed}, {cfg.recipe.kind} experts).\n"
                f"# Run: submerge tune {Path(out_dir).name}/tune.yaml tuned\n"
                f"# Validation questions only; scored by exact match of greedy decoding (the generation scorer).\n")
        (tmp / "tune.yaml").write_text(head + yaml.safe_dump(config, sort_keys=False))
    S.say(f"wrote {out_dir}: base, {len(S.tasks)} experts, validation questions and tune.yaml")
    return Path(out_dir)
