from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from submerge.synthetic import llama_config, make_family


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny fp32 Llama base + 3 fine-tunes (4 layers)."""
    root = tmp_path_factory.mktemp("fam32")
    return make_family(root, config=llama_config(layers=4), n_finetunes=3, seed=0)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("fam16")
    return make_family(root, config=llama_config(layers=4), n_finetunes=3, dtype=torch.bfloat16, seed=1)


@pytest.fixture(scope="session")
def family_sharded(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Same architecture, saved as sharded safetensors (several shards per model)."""
    root = tmp_path_factory.mktemp("famshard")
    return make_family(root, config=llama_config(layers=4), n_finetunes=2, seed=2, max_shard_size="40KB")


# Tests never reach the Hub: Hub ids resolve from caches the tests lay out themselves.
os.environ["HF_HUB_OFFLINE"] = "1"
