"""Synthetic model families for demos and speed benchmarks (never for quality claims).

A family is a randomly initialised base model saved as a Hugging Face folder and
``n`` "fine-tunes" = base + a random low-rank update on every matrix + small
noise, saved the same way, so merges of it exercise every code path of a real
checkpoint (config.json, sharding, dtypes) without any download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def llama_config(hidden: int = 64, layers: int = 2, heads: int = 4, inter: int = 128,
                 vocab: int = 128, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=256, tie_word_embeddings=False, **extra)


def make_family(root: str | Path, config=None, n_finetunes: int = 3, rank: int = 4,
                update_scale: float = 0.02, noise: float = 1e-3, dtype: torch.dtype = torch.float32,
                seed: int = 0, max_shard_size: Optional[str] = None) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/ft{i}``; returns their paths."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    config = config or llama_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    base_dir = root / "base"
    model.save_pretrained(base_dir, **kw)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    ft_dirs = []
    for i in range(n_finetunes):
        sd = {}
        for name, w in base_sd.items():
            w32 = w.float()
            if w.dim() == 2:
                a = torch.randn(w.shape[0], rank, generator=gen)
                b = torch.randn(rank, w.shape[1], generator=gen)
                upd = (a @ b) * (update_scale * w32.std() / rank ** 0.5)
            else:
                upd = torch.zeros_like(w32)
            upd += noise * torch.randn(w.shape, generator=gen)
            sd[name] = (w32 + upd).to(dtype)
        model.load_state_dict(sd)
        d = root / f"ft{i}"
        model.save_pretrained(d, **kw)
        ft_dirs.append(d)
    return base_dir, ft_dirs
