"""Output folders that never cost the user a file.

Every command that writes a folder (``merge``, ``calibrate``, ``fisher``, the ESM++ ``save``)
goes through :func:`atomic_folder`:

1. :func:`check_output_target` refuses, before anything is read or written, an OUT that
   resolves to ``/``, the home folder (or one of its ancestors), the current folder or one
   of its ancestors, a mount point, an existing file, or a folder that equals, contains or
   lies inside any input of the run: the inputs a command names, and every file and folder
   the run has read so far (:mod:`submerge.io.ledger`: models, eval data, scorer modules,
   statistics, tokenizers, the config file ...).  The check is made again, against every
   input read, just before the finished result replaces OUT;
2. a lock (``.<name>.submerge-lock`` beside OUT, ``flock``) makes a second run into the same
   OUT fail at once instead of racing it;
3. leftovers of killed runs (``.<name>.submerge-tmp-<pid>-*``, ``.<name>.submerge-old-<pid>-*``)
   are reported and cleaned: a previous OUT that was set aside but never replaced is put back;
4. free space is checked against the planned size;
5. the result is written into ``.<name>.submerge-tmp-<pid>-<id>``; then the old OUT is
   renamed aside, the new one renamed in, and the old one deleted.  A crash at any point
   leaves a complete old or a complete new OUT (plus leftovers that step 3 cleans).

SIGTERM and SIGHUP are turned into an exception while a folder is being written, so a
killed run removes its temporary folder as Ctrl-C does.

Files added to an existing folder (surgery modules and ESM++ experts beside a model) follow the same
rules file by file (:func:`write_files_atomically`): a lock, leftovers of killed runs reported and
removed, each file written under a temporary name and renamed in.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from submerge.errors import ConfigError, SubmergeError
from submerge.io.ledger import recorded, run_scope

log = logging.getLogger("submerge")

PathLike = Union[str, os.PathLike]
_TMP, _OLD, _LOCK = ".submerge-tmp-", ".submerge-old-", ".submerge-lock"
_MARGIN = 16 * 1024 * 1024  # metadata, model card, filesystem slack


class OutputError(SubmergeError):
    """OUT cannot be written safely (a refused location, a busy lock, no space, a read-only disk)."""


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM / SIGHUP while an output folder is being written."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _resolve(p: PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.path.expanduser(os.fspath(p)))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_target(out: PathLike, inputs: Iterable[Optional[PathLike]] = (),
                        what: str = "output folder") -> Path:
    """Refuse an OUT whose replacement could destroy anything but a previous output (see module doc).

    ``inputs`` are joined by every input the open run has read so far (:func:`~submerge.io.ledger.recorded`).
    Returns OUT resolved (symlinks followed).  Inputs that do not exist are ignored here (their
    own checks report them)."""
    raw = os.fspath(out)
    if not raw.strip():
        raise OutputError(f"{what}: an empty path is not a folder")
    res = _resolve(raw)
    shown = f"{what} {raw}" + (f" (= {res})" if str(res) != raw else "")
    if res == Path(res.anchor):
        raise OutputError(f"refusing {shown}: it is the filesystem root")
    home = _resolve(Path.home())
    if _inside(home, res):
        raise OutputError(f"refusing {shown}: it is the home folder or one of its ancestors")
    cwd = _resolve(os.getcwd())
    if _inside(cwd, res):
        raise OutputError(f"refusing {shown}: it is the current folder or one of its ancestors; "
                          f"name a new sub-folder instead")
    if res.exists():
        if os.path.ismount(res):
            raise OutputError(f"refusing {shown}: it is a mount point")
        if not res.is_dir():
            raise OutputError(f"refusing {shown}: it exists and is not a folder")
    for inp in [*inputs, *recorded()]:
        if inp is None:
            continue
        # the input as named and as resolved: a symlinked file is safe only if neither lies in OUT
        for ip in dict.fromkeys((_resolve(inp), Path(os.path.abspath(os.path.expanduser(os.fspath(inp)))))):
            if not os.path.lexists(ip):
                continue
            if ip == res:
                raise OutputError(f"refusing {shown}: it is an input of this run ({inp})")
            if _inside(ip, res):
                raise OutputError(f"refusing {shown}: it contains an input of this run ({inp})")
            if _inside(res, ip):
                raise OutputError(f"refusing {shown}: it lies inside an input of this run ({inp})")
    return res



def _leftover_re(name: str) -> re.Pattern:
    # "-<pid>-<hex>" since leftovers carry their owner's pid; "-<hex>" from versions before it; "stages": the
    # intermediate results of a multi-stage merge into OUT
    return re.compile(re.escape(f".{name}") + r"\.submerge-(tmp|old|stages)-(?:(\d+)-)?[0-9a-f]+$")


def stages_folder(out: Path) -> Path:
    """Where a multi-stage merge into ``out`` keeps its intermediate results while it runs: beside ``out``, named
    so that the next run into ``out`` removes it if this one is killed."""
    import uuid

    return out.parent / f".{out.name}.submerge-stages-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> list[str]:
    """Clean what killed runs left beside OUT (call with OUT's lock held); returns what was done."""
    done: list[str] = []
    parent = out.parent
    if not parent.is_dir():
        return done
    rx = _leftover_re(out.name)
    found = sorted(((m.group(1), int(m.group(2)) if m.group(2) else None, parent / n)
                    for n in os.listdir(parent) if (m := rx.match(n))), key=lambda f: (f[0], str(f[2])))
    for kind, pid, path in found:
        if kind == "stages" and pid == os.getpid():
            continue  # this run's own stages, in use
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            # we hold OUT's lock, so its owner is not a submerge run writing OUT now; the pid may have
            # been reused, but a live process is never robbed of a folder it may still be using
            done.append(f"left {path.name} alone: a process with its owner's pid {pid} is running")
            continue
        if kind == "old" and not os.path.lexists(out):
            os.rename(path, out)
            done.append(f"an interrupted run had set the previous {out.name} aside as {path.name}; "
                        f"restored it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            what = {"tmp": "an incomplete result", "stages": "the stages of a multi-stage merge"}.get(
                kind, "the replaced previous version")
            done.append(f"removed {path.name}, {what} left by an interrupted run"
                        + (f" (pid {pid})" if pid is not None else ""))
    return done


@contextlib.contextmanager
def _lock(out: Path, what: str) -> Iterator[None]:
    import fcntl

    lock_path = out.parent / f".{out.name}{_LOCK}"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create {what} {out}: {e.strerror} ({out.parent})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"another submerge run (pid {holder}) is writing {what} {out}; "
                              f"wait for it or choose another folder") from None
        try:  # the lock file may have been removed (and recreated) by its previous holder
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM / SIGHUP raise :class:`Terminated` in the main thread (cleanup runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover - platform without it
            pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def check_free_space(folder: Path, planned_bytes: int, what: str) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    need = planned_bytes + _MARGIN
    if free < need:
        raise OutputError(f"not enough free space for {what} in {folder}: {need / 1e9:.2f} GB needed "
                          f"(planned output {planned_bytes / 1e9:.2f} GB + margin), {free / 1e9:.2f} GB free")


def os_error_message(e: OSError, where: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"the disk holding {where} is full ({e.strerror})"
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only filesystem"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {where}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {where}"
    return f"cannot write {where}: {e.strerror or e}"


def _raise_disk_error(e: OSError, where: Path) -> None:
    """A full, read-only or forbidden disk while writing is one line (:class:`OutputError`); other errors pass."""
    if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
        raise OutputError(os_error_message(e, where)) from None


@contextlib.contextmanager
def atomic_folder(out: PathLike, overwrite: bool = False, what: str = "output folder", *,
                  inputs: Iterable[Optional[PathLike]] = (), planned_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary folder to fill; it becomes ``out`` when the block ends without error.

    ``out`` is checked (:func:`check_output_target`, with this run's ``inputs``), locked and
    cleaned of killed runs' leftovers first; an existing ``out`` is an error unless ``overwrite``,
    and is replaced only after the new folder is complete, after a last check against every input the run
    has read (the block runs in a :func:`~submerge.io.ledger.run_scope`).  On any error, Ctrl-C or SIGTERM
    the temporary folder is removed and ``out`` is left as it was."""
    with run_scope():
        with _atomic_folder(out, overwrite, what, list(inputs), planned_bytes) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_folder(out: PathLike, overwrite: bool, what: str, inputs: list,
                   planned_bytes: int) -> Iterator[Path]:
    out = check_output_target(out, inputs, what)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(os_error_message(e, parent)) from None
    with _lock(out, what):
        for line in recover(out):
            log.warning("%s: %s", out, line)
        if out.exists() and not overwrite:
            raise ConfigError(f"{what} {out} already exists (pass overwrite=True / --overwrite to replace it)")
        if planned_bytes:
            check_free_space(parent, planned_bytes, what)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = parent / f".{out.name}{_TMP}{tag}"
        aside = parent / f".{out.name}{_OLD}{tag}"
        with terminate_as_exception():
            try:
                tmp.mkdir()
            except OSError as e:
                raise OutputError(os_error_message(e, parent)) from None
            try:
                try:
                    yield tmp
                except OSError as e:
                    _raise_disk_error(e, out)
                    raise
                check_output_target(out, inputs, what)  # every input read while writing counts too
                _swap_in(tmp, out, aside, overwrite, what)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise


def _swap_in(tmp: Path, out: Path, aside: Path, overwrite: bool, what: str) -> None:
    """tmp → out; an existing out is set aside first and deleted only once the new one is in place."""
    if os.path.lexists(out):
        if not overwrite:
            raise ConfigError(f"{what} {out} appeared while this run was writing; not replacing it")
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_files_atomically(folder: Path, writers: dict[str, Callable[[Path], Any]]) -> None:
    """Write files into an existing ``folder``: ``writers`` maps each file name to a function that writes the
    file at a path it is given.  Under a lock (``.<first name>.submerge-lock``), temporary files a killed run
    left (``.<name>.submerge-tmp-<pid>-<id>``) are reported and removed; every file is written under such a
    temporary name, then all are renamed in the given order (put a manifest last), so a failure, Ctrl-C or
    SIGTERM while writing leaves the folder as it was and a reader never sees half a file.  Nothing else in
    the folder is touched."""
    folder = Path(folder)
    names = list(writers)
    with _lock(folder / names[0], "files in"):
        for name in names:
            for line in _recover_files(folder, name):
                log.warning("%s: %s", folder, line)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmps = {name: folder / f".{name}{_TMP}{tag}" for name in names}
        with terminate_as_exception():
            try:
                for name, write in writers.items():
                    write(tmps[name])
                for name, tmp in tmps.items():
                    os.replace(tmp, folder / name)
            except OSError as e:
                _raise_disk_error(e, folder)
                raise
            finally:
                for tmp in tmps.values():
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)


def _recover_files(folder: Path, name: str) -> list[str]:
    """Remove the temporary copies of file ``name`` that killed writers left in ``folder`` (their owner's pid
    no longer runs); also the ``.<name>.<8 hex>`` copies of versions before the pid was part of the name."""
    rx = _leftover_re(name)
    legacy = re.compile(re.escape(f".{name}.") + r"[0-9a-f]{8}$")
    done = []
    for n in sorted(os.listdir(folder)):
        m = rx.match(n)
        if m is None and not legacy.match(n):
            continue
        pid = int(m.group(2)) if m is not None and m.group(2) else None
        if pid is not None and _pid_alive(pid):
            done.append(f"left {n} alone: a process with its owner's pid {pid} is running")
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / n)
        done.append(f"removed {n}, an incomplete {name} left by an interrupted run"
                    + (f" (pid {pid})" if pid is not None else ""))
    return done
