"""Models named by Hugging Face Hub id: ``org/name`` or ``org/name@revision``.

A model reference is a local path first (relative to the working directory, else to the config file);
only a reference that is not a local path and looks like a Hub id is resolved through ``huggingface_hub``
into the standard cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), and
only the files a merge reads are fetched: safetensors weights and their index (``.bin`` only for a repo
without safetensors), ``config.json``, generation and tokenizer files.  ``HF_HUB_OFFLINE=1`` resolves
from the cache alone.  :func:`preflight` checks every id of a config before any is downloaded, so a typo,
a gated repo or an uncached id offline is one error naming it, before gigabytes of the others arrive.
The resolved commit of each id is recorded (model card), so a merge is reproducible.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from submerge.errors import CheckpointError
from submerge.io.files import GENERATION_FILES, TOKENIZER_FILES

_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:@(?P<rev>[A-Za-z0-9_.\-/]+))?$")
METADATA = ["config.json", "adapter_config.json", *GENERATION_FILES, *TOKENIZER_FILES]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: Optional[str]  # as written (a branch, tag or commit); None = main

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(ref: str) -> Optional[HubRef]:
    """``org/name[@revision]`` as a :class:`HubRef`, or None for anything else (paths are never ids:
    ``./x/y``, ``/x/y``, ``~/x``, ``x/y/z``, Windows paths)."""
    m = _ID_RE.match(ref)
    if not m or ".." in ref:
        return None
    return HubRef(m.group("repo"), m.group("rev"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _explain(ref: HubRef, e: Exception) -> CheckpointError:
    from huggingface_hub import errors as hf

    name = type(e).__name__
    if isinstance(e, hf.GatedRepoError):
        why = "the repository is gated: accept its terms on the Hub and log in (`hf auth login`)"
    elif isinstance(e, hf.RepositoryNotFoundError):
        why = "no such repository (a typo, or private without a token)"
    elif isinstance(e, hf.RevisionNotFoundError):
        why = f"the repository has no revision {ref.revision!r}"
    elif isinstance(e, hf.LocalEntryNotFoundError) or "offline" in name.lower():
        why = ("not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline()
               else "not in the cache and the Hub could not be reached")
    else:
        why = f"{name}: {' '.join(str(e).split())[:200]}"
    return CheckpointError(f"model '{ref}': cannot resolve this Hub id ({why}); local paths take priority, so "
                           f"a folder of that name would be used if it existed")


def _cached_snapshot(ref: HubRef) -> Optional[Path]:
    """The cached snapshot folder of ``ref`` (revision resolved through ``refs/``), without any network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache_dir()),
                                      local_files_only=True))
    except Exception:  # not cached (the library raises several types)
        return None


def preflight(ref: HubRef) -> None:
    """Fail now, naming ``ref``, if it cannot be resolved; download nothing."""
    if _cached_snapshot(ref) is not None:
        return
    if offline():
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise _explain(ref, LocalEntryNotFoundError("offline"))
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(ref.repo_id, revision=ref.revision)
    except Exception as e:  # network and Hub errors: each is one line naming the id
        raise _explain(ref, e) from None


def resolve(ref: HubRef) -> Path:
    """The local snapshot folder of ``ref`` with the files a merge reads (downloaded unless cached)."""
    snap = _cached_snapshot(ref)
    if snap is not None and _has_weights(snap):
        return snap
    if offline():
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise _explain(ref, LocalEntryNotFoundError("offline"))
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache_dir()),
                                      allow_patterns=METADATA + SAFETENSORS))
        if not _has_weights(snap):  # an older repo with PyTorch .bin weights only
            snap = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache_dir()),
                                          allow_patterns=METADATA + TORCH_BIN))
    except Exception as e:
        raise _explain(ref, e) from None
    if not _has_weights(snap):
        raise CheckpointError(f"model '{ref}': the repository has no safetensors or pytorch_model*.bin weights")
    return snap


def _has_weights(folder: Path) -> bool:
    return (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
            or (folder / "adapter_model.bin").exists())


def commit_of(snapshot: Path) -> str:
    """The commit hash a cached snapshot folder stands for (its name, in the cache layout)."""
    return Path(snapshot).name
