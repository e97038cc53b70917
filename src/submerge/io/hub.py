"""Models named by Hugging Face Hub id: ``org/name`` or ``org/name@revision``.

A model reference is a local path first (relative to the working directory, else to the config file);
only a reference that is not a local path and looks like a Hub id is resolved through ``huggingface_hub``
into the standard cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), and
only the files a merge reads are fetched: safetensors weights and their index (``.bin`` only for a repo
without safetensors), ``config.json``, generation and tokenizer files.  ``HF_HUB_OFFLINE=1`` resolves
from the cache alone.  :func:`preflight` checks every id of a config before any is downloaded, so a typo,
a gated repo or an uncached id offline is one error naming it, before gigabytes of the others arrive.
The resolved commit of each id is recorded (model card), so a merge is reproducible.

Nothing in a reference or in the cache is taken as a path: a revision is a 40-hex commit or a branch or tag
name (git's rules: no ``..``, no leading ``/`` or ``.``, no empty component); a ``refs/<name>`` file is a
regular file holding a commit hash; and the snapshot folder must resolve inside that repository's cache
folder.  Anything else is one error naming the id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from submerge.errors import CheckpointError, quoted
from submerge.io.files import GENERATION_FILES, TOKENIZER_FILES, read_small_text

_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:@(?P<rev>.*))?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REF_PART_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
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
    ``./x/y``, ``/x/y``, ``~/x``, ``x/y/z``, Windows paths).  An id whose revision is not a commit, branch or
    tag name (``org/x@/some/path``, ``org/x@../y``) is an error naming it."""
    m = _ID_RE.match(ref)
    if not m or ".." in m.group("repo"):
        return None
    rev = m.group("rev")
    if rev is not None and not valid_revision(rev):
        raise CheckpointError(f"model '{ref[:200]}': revision {quoted(rev)} is not a commit hash, branch or tag name "
                              f"(letters, digits, '_', '-', '.', and '/' between parts)")
    return HubRef(m.group("repo"), rev)


def valid_revision(rev: str) -> bool:
    """A 40-hex commit, or a branch / tag name by git's rules (``check-ref-format``, restricted to the
    characters the Hub allows): never a path that leaves ``refs/``."""
    if not rev or len(rev) > 255:
        return False
    if _COMMIT_RE.match(rev):
        return True
    parts = rev.split("/")
    return all(_REF_PART_RE.match(p) and not p.endswith((".lock", ".")) and ".." not in p for p in parts)


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


def repo_folder(ref: HubRef) -> Path:
    """The repository's folder in the cache (``models--org--name``)."""
    return cache_dir() / ("models--" + ref.repo_id.replace("/", "--"))


def _cached_snapshot(ref: HubRef) -> Optional[Path]:
    """The cached snapshot folder of ``ref`` (a branch or tag resolved through ``refs/``), without any network;
    None when it is not cached.  The cache is read as data, never followed as paths (see the module doc)."""
    repo = repo_folder(ref)
    rev = ref.revision or "main"
    if _COMMIT_RE.match(rev):
        commit = rev
    else:
        ref_file = repo / "refs" / rev
        if not os.path.lexists(ref_file):
            return None
        commit = read_small_text(ref_file, repo, f"model '{ref}'", limit=4096).strip()
        if not _COMMIT_RE.match(commit):
            raise CheckpointError(f"model '{ref}': the cache's {ref_file} holds {quoted(commit)}, not a commit hash "
                                  f"(a damaged Hugging Face cache?)")
    snap = repo / "snapshots" / commit
    if not snap.is_dir():
        return None
    return _inside_repo(snap, repo, ref)


def _inside_repo(snap: Path, repo: Path, ref: HubRef) -> Path:
    real, bound = Path(os.path.realpath(snap)), Path(os.path.realpath(repo))
    if bound not in real.parents:
        raise CheckpointError(f"model '{ref}': its snapshot folder {snap} resolves to {real}, outside the "
                              f"repository's cache folder {repo}; submerge reads a Hub model only from its cache")
    return snap


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
    snap = _inside_repo(snap, repo_folder(ref), ref)
    if not _has_weights(snap):
        raise CheckpointError(f"model '{ref}': the repository has no safetensors or pytorch_model*.bin weights")
    return snap


def _has_weights(folder: Path) -> bool:
    return (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
            or (folder / "adapter_model.bin").exists())


def commit_of(snapshot: Path) -> str:
    """The commit hash a cached snapshot folder stands for (its name, in the cache layout)."""
    return Path(snapshot).name
