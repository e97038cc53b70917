"""Fine-tuning one expert per task: encoder only, the task's zero-shot head frozen (the CLIP protocol)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from submerge.bench.backbone import Backbone
from submerge.io.writer import save_tensors


@dataclass(frozen=True)
class Recipe:
    """AdamW on the encoder (pooler excluded), linear warm-up then decay, dropout on."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    epochs: int = 1
    batch_size: int = 32
    max_len: int = 64
    logit_scale: float = 30.0


def cache_key(backbone: Backbone, task_fingerprint: str, n_train: int, recipe: Recipe, seed: int) -> str:
    blob = json.dumps({"backbone": backbone.fingerprint, "task": task_fingerprint, "n_train": n_train,
                       "recipe": asdict(recipe), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_path(cache_dir: Path, key: str) -> Path:
    """Where the fine-tune keyed ``key`` is cached."""
    return Path(cache_dir) / f"{key}.safetensors"


def load_cached(path: Optional[Path]) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """A cached fine-tune (tensors + its log, marked ``cached``), or None."""
    if path is None or not path.exists():
        return None
    meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
    return load_file(path), {**meta, "cached": True}


def save_cached(path: Path, state: dict[str, torch.Tensor], log: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_tensors(state, tmp, f"fine-tuned expert {path.stem}")
    tmp.rename(path)
    path.with_suffix(".json").write_text(json.dumps(log, indent=2))


def start_training(backbone: Backbone, recipe: Recipe, steps: int):
    """Reset the encoder, unfreeze its trainable tensors; AdamW with linear warm-up then decay.
    Returns (trainable names, optimizer, scheduler)."""
    backbone.reset()
    model = backbone.model
    names = set(backbone.trainable_names())
    params = [p for n, p in model.named_parameters() if n in names]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm = max(1, int(recipe.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    return names, opt, sched


def task_loss(backbone: Backbone, recipe: Recipe, texts: list[str], labels: list[int], idx: list[int],
              head: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the frozen head (logit scale x cosine) on the examples ``idx``."""
    emb = backbone.forward_embed(backbone.tokenize([texts[i] for i in idx]))
    logits = recipe.logit_scale * emb @ head.T
    return torch.nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in idx]))


def stop_training(backbone: Backbone, names: set[str]) -> dict[str, torch.Tensor]:
    """Freeze the encoder again and return a copy of the trained tensors."""
    model = backbone.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None  # the last step's gradients (a model's size) are not needed past training
    sd = model.state_dict()
    return {n: sd[n].detach().clone() for n in sorted(names)}


def finetune(backbone: Backbone, texts: list[str], labels: list[int], head: torch.Tensor, recipe: Recipe,
             seed: int, cache_dir: Optional[Path] = None, key: Optional[str] = None,
             desc: str = "fine-tune", quiet: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Returns the fine-tuned encoder tensors (trainable ones) and a log; cached by ``key``."""
    path = cached_path(cache_dir, key) if cache_dir and key else None
    cached = load_cached(path)
    if cached is not None:
        return cached
    steps = recipe.epochs * math.ceil(len(texts) / recipe.batch_size)
    names, opt, sched = start_training(backbone, recipe, steps)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=quiet, leave=False)
    for _ in range(recipe.epochs):
        order = list(range(len(texts)))
        rng.shuffle(order)
        for s in range(0, len(order), recipe.batch_size):
            loss = task_loss(backbone, recipe, texts, labels, order[s:s + recipe.batch_size], head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    bar.close()
    state = stop_training(backbone, names)
    k = max(1, len(losses) // 10)
    log = {"seconds": time.perf_counter() - t0, "steps": steps, "loss_first": sum(losses[:k]) / k,
           "loss_last": sum(losses[-k:]) / k,
           "task_vector_norm": float(torch.sqrt(sum(((state[n] - backbone.pretrained[n]) ** 2).sum() for n in state)))}
    if path is not None:
        save_cached(path, state, log)
    backbone.reset()
    return state, {**log, "cached": False}


def multitask_finetune(backbone: Backbone, tasks: list[tuple[list[str], list[int], torch.Tensor]],
                       weights: list[float], recipe: Recipe, seed: int, cache_path: Optional[Path] = None,
                       desc: str = "multitask fine-tune", quiet: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """One encoder fine-tuned on ``Σ_t w_t ℓ_t`` over ``tasks`` (texts, labels, frozen head): each step one batch
    of every task with a nonzero weight, as many steps as an expert of the largest task (the experts' recipe);
    cached at ``cache_path``.  Returns the trainable tensors and a log."""
    cached = load_cached(cache_path)
    if cached is not None:
        return cached
    n_max = max(len(texts) for texts, _, _ in tasks)
    steps = recipe.epochs * math.ceil(n_max / recipe.batch_size)
    names, opt, sched = start_training(backbone, recipe, steps)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    orders: list[list[int]] = [[] for _ in tasks]
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, disable=quiet, leave=False):
        opt.zero_grad(set_to_none=True)
        for i, ((texts, labels, head), w) in enumerate(zip(tasks, weights)):
            if w == 0:
                continue
            if len(orders[i]) < recipe.batch_size:
                more = list(range(len(texts)))
                rng.shuffle(more)
                orders[i] += more
            idx, orders[i] = orders[i][:recipe.batch_size], orders[i][recipe.batch_size:]
            # the gradient of Σ w_t ℓ_t, accumulated one task at a time: one batch's activations in memory, not
            # T (8 tasks held ~5 GB at once)
            (w * task_loss(backbone, recipe, texts, labels, idx, head)).backward()
        opt.step()
        sched.step()
    state = stop_training(backbone, names)
    info = {"weights": list(weights), "steps": steps, "seconds": time.perf_counter() - t0}
    if cache_path is not None:
        save_cached(cache_path, state, info)
    backbone.reset()
    return state, {**info, "cached": False}
