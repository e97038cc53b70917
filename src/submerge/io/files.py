"""Containment: which files of a model folder submerge may read or copy.

A model folder is read only through its own regular files.  A symlink is followed only when
its target is a regular file inside the same folder or, for the Hugging Face cache layout
(``models--org--name/snapshots/<rev>/f -> ../../blobs/<hash>``), inside that repository's cache
folder.  FIFOs, devices and sockets are refused (they hang or never end), as are index entries
that name anything but a plain file name in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator, Optional

from submerge.errors import CheckpointError, ConfigError
from submerge.io.ledger import record

MAX_JSON_BYTES = 64 * 1024 * 1024  # config / index / manifest files larger than this are not metadata

# Metadata a merged model carries over: generation settings (from the reference model) and tokenizer files.
GENERATION_FILES = ("generation_config.json",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)


def bounds_of(folder: Path) -> Path:
    """The folder that symlinks inside ``folder`` may point into (see module doc)."""
    root = Path(os.path.realpath(folder))
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        return root.parent.parent
    return root


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def checked_file(path: Path, folder: Optional[Path], what: str) -> Path:
    """``path`` if it may be read: a regular file, or a symlink to one inside ``folder``'s bounds.

    ``folder=None``: a file the user named directly (any regular file, symlinks followed).
    Returns ``path`` itself (its name keeps the suffix a format is told by; a HF cache blob has none);
    raises :class:`CheckpointError` naming the file otherwise.  The file (and ``folder``) are recorded as
    inputs of the open run (:mod:`submerge.io.ledger`)."""
    path = Path(path)
    record(path)
    record(folder)
    try:
        lst = os.lstat(path)
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read {path} ({e.strerror})") from None
    target = path
    if stat.S_ISLNK(lst.st_mode):
        target = Path(os.path.realpath(path))
        if folder is not None:
            _link_within(path, target, folder, what)
    try:
        st = os.stat(target)
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read {path} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what}: {path} is {_kind(st.st_mode)}, not a regular file")
    return path


def _link_within(path: Path, target: Path, folder: Path, what: str) -> None:
    """A symlink of ``folder`` may point only inside the folder's bounds (:func:`bounds_of`)."""
    bound = bounds_of(folder)
    if target != bound and bound not in target.parents:
        raise CheckpointError(f"{what}: {path} is a symlink to {target}, outside the model folder {folder}; submerge "
                              f"follows symlinks only within the folder (or its Hugging Face cache repository)")


def checked_folder(folder: Path, what: str) -> Path:
    """``folder`` before it is handed to a library that reads files from it by itself (transformers'
    ``from_pretrained``, PEFT): every entry the library could open is held to :func:`checked_file`'s rule — a
    regular file, or a symlink to one inside the folder's bounds (FIFOs, devices, sockets and links out of the
    folder are refused, naming the entry).  Sub-folders are not read by those loaders and are left alone.
    The folder is recorded as an input of the open run."""
    folder = Path(folder)
    record(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read folder {folder} ({e.strerror})") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            continue
        if entry.is_symlink() and os.path.isdir(entry.path):
            _link_within(Path(entry.path), Path(os.path.realpath(entry.path)), folder, what)
            continue
        checked_file(Path(entry.path), folder, what)
    return folder


def read_small_text(path: Path, folder: Optional[Path], what: str, limit: int = MAX_JSON_BYTES) -> str:
    """A checked metadata file's text (UTF-8), refusing binary or oversized files with one line."""
    p = checked_file(path, folder, what)
    size = p.stat().st_size
    if size > limit:
        raise CheckpointError(f"{what}: {path} is {size / 1e6:.0f} MB, too large for a metadata file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{what}: {path} is not UTF-8 text (binary?)") from None
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read {path} ({e.strerror})") from None


def is_plain_name(name: object) -> bool:
    """A file name with no folder part: what an index may name."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name))


def copy_regular_file(src: Path, dst: Path) -> None:
    """Copy a file already passed through :func:`checked_file`: its content, never the link itself."""
    shutil.copyfile(src, dst)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_user_text(path: Path, what: str = "input file") -> str:
    """A UTF-8 text file the user named (a config, calibration inputs, eval data), or a one-line
    :class:`ConfigError`; recorded as an input of the open run."""
    try:
        checked_file(path, None, what)
        return path.read_bytes().decode("utf-8")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the inputs as UTF-8") from None


def read_config_text(path: Path, what: str = "config file", limit: int = MAX_JSON_BYTES) -> str:
    """A config file the user named (YAML), as text: a regular UTF-8 file under ``limit`` bytes, else one
    :class:`ConfigError` line; recorded as an input of the open run."""
    p = Path(path)
    if not os.path.lexists(p):
        raise ConfigError(f"{what} {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder")
    try:
        checked_file(p, None, what)
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {p} ({e.strerror})") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {p} is larger than {limit // 2**20} MB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None


def jsonl_values(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-empty line of a JSONL text; a bad line is a one-line error."""
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield i + 1, json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}:{i + 1}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
