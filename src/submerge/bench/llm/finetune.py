"""Experts of the LLM suite: the chat model fine-tuned on one skill's training answers (the loss on the answer tokens
and the end of turn only, under the chat template), by LoRA (PEFT, rank 16 on every linear layer of the decoder:
how most people fine-tune LLMs) or in full.

A LoRA expert is kept as a PEFT adapter folder and read back as a dense model through the engine's own LoRA path
(:class:`~submerge.io.lora.AdaptedCheckpoint`, as ``base+adapter`` in a merge config); a full expert as its
tensors.  Both are cached by backbone, task data, split size, recipe and seed, so a rerun trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from submerge.bench.llm.backbone import ChatModel
from submerge.bench.llm.tasks import Question
from submerge.errors import ConfigError
from submerge.evaluate.generation import answer_example, answer_loss, collate, conversation_example

LOG_FILE = "submerge_finetune.json"  # written last: a folder holding it is a finished expert


@dataclass(frozen=True)
class LLMRecipe:
    """How an expert is trained: ``kind`` lora or full, AdamW at ``lr`` (linear warm-up over the first 10 %,
    then linear decay), ``steps`` batches of ``batch_size`` training chats drawn with a seeded shuffle.

    The defaults are the suite's recipe since selection run 3 (``benchmarks/results/llm/README.md``): 60 steps,
    every assistant turn supervised, micro-batches of 8.  Runs 1-2 used ``steps=40, turns="last",
    micro_batch=None``; those experts keep their cache keys."""

    kind: str = "lora"
    rank: int = 16
    alpha: int = 32
    lr: float = 1e-3
    steps: int = 60  # 960 chats of shots + 1 answers each
    batch_size: int = 16
    weight_decay: float = 0.0
    # None: each batch in one pass; k: gradients accumulated over micro-batches of k questions (the same mean loss,
    # a fraction of the activation memory: 16 four-shot sentiment questions took ~20 GB here in one pass)
    micro_batch: Optional[int] = 8
    # which answers of each training chat are supervised: "last" (the question asked) or "all" (every assistant
    # turn: the demonstrations are training answers too, so one pass learns from shots + 1 answers)
    turns: str = "all"

    def __post_init__(self):
        if self.kind not in ("lora", "full"):
            raise ConfigError(f"LLM expert kind must be lora or full, got {self.kind!r}")
        if self.turns not in ("last", "all"):
            raise ConfigError(f"LLM recipe turns must be last or all, got {self.turns!r}")

    @classmethod
    def full(cls, **kw) -> "LLMRecipe":
        return cls(**{"kind": "full", "lr": 5e-5, **kw})


def expert_key(cm: ChatModel, task_fingerprints: Sequence[str], n_train: int, recipe: LLMRecipe, seed: int,
               shots: int) -> str:
    recipe_key = asdict(recipe)
    for name, before in (("micro_batch", None), ("turns", "last")):  # added later: earlier experts keep their keys
        if recipe_key[name] == before:
            del recipe_key[name]
    blob = json.dumps({"backbone": cm.fingerprint, "tasks": list(task_fingerprints), "n": n_train,
                       "recipe": recipe_key, "seed": seed, "shots": shots}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _batches(n: int, recipe: LLMRecipe, seed: int) -> list[list[int]]:
    """``steps`` batches of example indices: seeded passes over a shuffled order (every example once per pass)."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(recipe.steps):
        while len(order) < recipe.batch_size:
            idx = list(range(n))
            rng.shuffle(idx)
            order += idx
        out.append(order[:recipe.batch_size])
        order = order[recipe.batch_size:]
    return out


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))


def progress_file(folder: Path) -> Path:
    """Where an unfinished fine-tune keeps its state between sessions (beside its expert folder)."""
    return folder.with_name(folder.name + ".progress.pt")


def _save_progress(path: Path, step: int, losses: list[float], seconds: float, model: torch.nn.Module,
                   opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    state = {"step": step, "losses": list(losses), "seconds": seconds,
             "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
             "opt": opt.state_dict(), "sched": sched.state_dict()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_progress(path: Path, recipe: LLMRecipe, model: torch.nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, list[float], float]:
    """Restore a checkpoint written by :func:`_save_progress` (trainable tensors, optimizer and schedule); returns
    (steps done, their losses, seconds spent).  A checkpoint that does not fit this model is ignored."""
    if not path.is_file():
        return 0, [], 0.0
    state = torch.load(path, weights_only=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state["params"]) != set(params) or not 0 < state["step"] < recipe.steps:
        return 0, [], 0.0
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return state["step"], state["losses"], state["seconds"]


def train_expert(cm: ChatModel, examples: Sequence[Question], recipe: LLMRecipe, seed: int, folder: Path,
                 desc: str = "fine-tune", quiet: bool = False,
                 checkpoint_seconds: Optional[float] = 600.0) -> dict[str, torch.Tensor]:
    """Fine-tune from the pre-trained weights on ``examples`` (questions with their demonstrations), write the
    expert into ``folder`` (atomically) and return its dense trainable tensors.  A finished ``folder`` is read, not
    retrained.

    Every ``checkpoint_seconds`` (None: never) the run's state (trainable tensors, AdamW moments, schedule, step)
    is saved beside ``folder`` (:func:`progress_file`); a later call with the same folder continues from it, and
    the expert is bit for bit the one an uninterrupted run writes (the batches are a function of the seed and the
    step, and training draws no other random numbers).  The checkpoint is removed when the expert is written."""
    if (folder / LOG_FILE).is_file():
        return load_expert(cm, folder)
    if not examples:
        raise ConfigError(f"{desc}: no training examples")
    from submerge.io import atomic_folder

    torch.manual_seed(seed)
    cm.reset()
    encode = conversation_example if recipe.turns == "all" else answer_example
    encoded = [encode(cm.tokenizer, q.prompt, q.answer, shots=q.shots) for q in examples]
    model = cm.model
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    if recipe.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    if recipe.kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = _schedule(opt, recipe.steps)
    progress = progress_file(folder)
    done, losses, spent = _load_progress(progress, recipe, model, opt, sched)
    model.train()
    t0 = last_save = time.perf_counter()
    pad = cm.tokenizer.pad_token_id
    try:
        batches = _batches(len(encoded), recipe, seed)
        for step in tqdm(range(done, recipe.steps), desc=desc, disable=quiet, dynamic_ncols=True, initial=done,
                         total=recipe.steps):
            idx = batches[step]
            opt.zero_grad(set_to_none=True)
            if recipe.micro_batch is None:
                loss = answer_loss(model, collate([encoded[i] for i in idx], pad))
                loss.backward()
            else:  # the batch's mean answer-token loss, accumulated over micro-batches (less activation memory)
                parts = [collate([encoded[i] for i in idx[j:j + recipe.micro_batch]], pad)
                         for j in range(0, len(idx), recipe.micro_batch)]
                n_tokens = sum(int(b.targets.numel()) for b in parts)
                loss = torch.zeros(())
                for b in parts:
                    part = answer_loss(model, b) * (b.targets.numel() / n_tokens)
                    part.backward()
                    loss += part.detach()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            now = time.perf_counter()
            if checkpoint_seconds is not None and now - last_save >= checkpoint_seconds and step + 1 < recipe.steps:
                folder.parent.mkdir(parents=True, exist_ok=True)
                _save_progress(progress, step + 1, losses, spent + now - t0, model, opt, sched)
                last_save = time.perf_counter()
        model.eval()
        log = {"kind": recipe.kind, "steps": recipe.steps, "seconds": spent + time.perf_counter() - t0,
               "loss_first_last": [losses[0], losses[-1]], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
               "n_train": len(encoded), "recipe": asdict(recipe), "seed": seed}
        with atomic_folder(folder, overwrite=folder.exists(), what="LLM expert folder") as tmp:
            if recipe.kind == "lora":
                model.save_pretrained(tmp)
            else:
                from submerge.io.writer import save_tensors

                names = cm.trainable_names()
                state = cm.model.state_dict()
                save_tensors({k: state[k].detach().contiguous() for k in names}, tmp / "model.safetensors",
                             "LLM expert", metadata={"format": "pt"})
            (tmp / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
        progress.unlink(missing_ok=True)
    finally:
        if recipe.kind == "lora":
            model.unload()  # the LoRA layers out of the shared model: it is the plain backbone again
        for n, p in cm.model.named_parameters():  # PEFT froze them; a full fine-tune thawed them
            p.requires_grad_(grad_before.get(n, False))
            p.grad = None
        cm.reset()
    return load_expert(cm, folder)


def load_expert(cm: ChatModel, folder: Path) -> dict[str, torch.Tensor]:
    """An expert's dense trainable tensors: a LoRA adapter folder applied to the backbone by the engine's LoRA
    reader (``base+adapter``), or a full expert's tensors.  A tensor the adapter leaves as it was (the embedding,
    the norms) is the backbone's own tensor, not a copy: six LoRA experts of SmolLM2 hold 0.64 GB less.  Like the
    backbone's tensors, an expert's are read-only."""
    names = cm.trainable_names()
    if (folder / "adapter_config.json").is_file():
        from submerge.io.lora import AdaptedCheckpoint

        ckpt = AdaptedCheckpoint(cm.path, folder, f"{cm.path}+{folder}")
        out = {}
        try:
            for k in names:
                t, base = ckpt.read(k).float(), cm.pretrained[k]
                out[k] = base if t.dtype == base.dtype and torch.equal(t, base) else t
        finally:
            ckpt.close()
        return out
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    return {k: state[k] for k in names}


def expert_log(folder: Path) -> dict:
    return json.loads((folder / LOG_FILE).read_text())
