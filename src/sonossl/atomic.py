"""Atomic writes: an artefact is either complete at its final path or absent.

Every file and dataset directory sonossl produces goes through here, so that an interrupted run (Ctrl-C,
``kill -9``, a full disk) never leaves a half-written artefact for DVC to cache or for a later step to read.

    with atomic_dir("data/clips/sim") as staging:
        (staging / "frames.npy").write_bytes(...)
    # only now does data/clips/sim exist, complete
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class OutputRefused(ValueError):
    """An output path that cannot be written: replacing it would destroy what is not an earlier output of the same
    step, or another process is writing it now."""


def check_replaceable(path: str | os.PathLike, marker: str, what: str) -> None:
    """Refuse, before any work, an output folder whose replacement would delete something else: the working
    directory or a folder above it, a file or symbolic link in the folder's place, or a folder that holds anything
    but lacks ``marker``, the file every ``what`` holds (an earlier output of the same step is replaced, as
    ``atomic_dir`` does; an empty folder is filled)."""
    path = Path(path)
    where, here = path.resolve(), Path.cwd().resolve()
    if where == here or where in here.parents:
        raise OutputRefused(f"{path}: is the working directory{'' if where == here else ' or a folder above it'}, "
                            f"which the {what} would replace: give a folder of its own")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise OutputRefused(f"{path}: is {kind}, which the {what} would replace: give a folder path "
                            f"{'(the folder it links to) ' if path.is_symlink() else ''}instead")
    if path.is_dir() and not (path / marker).is_file():
        held = sorted(p.name for p in path.iterdir())
        if held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise OutputRefused(f"{path}: holds {len(held)} file(s) or folder(s) ({shown}) but no file {marker}, so it "
                                f"is not an earlier {what}, and writing one there would delete them: give a new or "
                                "empty folder, or delete this one first")


# This process's writer locks (see atomic_dir). A forked child (a worker pool) closes its copies: a lock is shared by
# every copy of its descriptor, so a child that outlives its writer (idle pool workers left by a writer killed with
# SIGKILL) would otherwise hold the output locked for as long as it lives.
_WRITER_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _WRITER_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _WRITER_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
# A new staging folder's name until its writer holds its lock (microseconds): one this old was left by a kill then
NEW_STALE_S = 60.0


def _held_by_another(folder: Path) -> bool:
    """Whether a running ``atomic_dir`` holds ``folder`` (its staging folder, or the one it has just put in place):
    it keeps a lock on it while it writes, which the kernel drops when the process ends, however it ends."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on folders here (see atomic_dir): nothing to tell
        return False
    finally:
        os.close(fd)  # and with it our lock
    return False


def current_umask() -> int:
    """The process's umask (read by setting it, then setting it back): the permissions a new file would get."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# The temporary names of the writes below (and of storage's downloads), `tempfile`'s random part being 8 of
# [a-z0-9_]: `.<name>.<random>.tmp`, `.<name>.tmp-<pid><suffix>`, `.<name>.staging-<random>` (`.<name>.new-<random>`
# until its writer locks it), `.<name>.old-<pid>` (the replaced folder, between its two renames),
# `.<name>.<random>.part`.
_TEMPORARY = re.compile(r"\..+\.(?:[a-z0-9_]{8}\.(?:tmp|part)|tmp-\d+(?:\.[^./]+)?"
                        r"|(?:staging|new)-[a-z0-9_]{8}|old-\d+)")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of the temporary names of an atomic write or a download (left behind
    by a killed process): not data, never to be copied elsewhere."""
    return _TEMPORARY.fullmatch(name) is not None


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's contents to the disk before it is renamed into place: a rename is durable only with its
    data, or a power loss can leave the new name on a truncated file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    For writers that want a file name rather than bytes (PyAV, numpy, PIL).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``path`` as a whole, on error it is deleted.

    An existing ``path`` is kept until the new one is complete, then swapped out and removed. A run killed in
    between leaves its pieces, which the next run puts right: a staging folder or a half-deleted old one
    (``.name.trash-PID``) is deleted; a swapped-out previous one (``.name.old-PID``, whole: it is renamed to trash
    before any of it is deleted) comes back when ``path`` is missing (killed between the two renames), the newest if
    there are several, and is deleted otherwise. One writer per ``path`` at a time: while another process is writing
    it (its staging folder, or the new ``path`` until it is done, is locked), OutputRefused, before anything is
    touched.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputRefused(f"{path}: name the output folder itself (not '.' or '..')")
    path.parent.mkdir(parents=True, exist_ok=True)
    name = glob.escape(path.name)

    def staging_folders() -> list[Path]:
        return sorted(path.parent.glob(f".{name}.staging-*"))

    _refuse_if_busy(path, [*staging_folders(), path])
    # Leftovers of runs that were killed before they could clean up (a staging folder that another writer has
    # locked since the check above is its, not a leftover)
    for stale in [*staging_folders(), *path.parent.glob(f".{name}.trash-*")]:
        if not _held_by_another(stale):
            _remove_tree(stale)
    for new in path.parent.glob(f".{name}.new-*"):
        if time.time() - new.lstat().st_mtime > NEW_STALE_S and not _held_by_another(new):
            _remove_tree(new)
    swapped = sorted(path.parent.glob(f".{name}.old-*"), key=lambda p: p.lstat().st_mtime_ns)
    if swapped and not (path.exists() or path.is_symlink()):
        os.replace(swapped.pop(), path)
    for old in swapped:
        _remove_tree(old)
    # The staging folder gets its name only once locked, so that no other writer takes it for a leftover. The lock is
    # on the folder, whatever its name: held until the end, after the swap too. A file system without locks on
    # folders (NFS emulates flock with byte-range write locks, which a folder opened to read cannot take) writes
    # unguarded, as before.
    fresh = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    lock = os.open(fresh, os.O_RDONLY | os.O_DIRECTORY)
    _WRITER_LOCKS.add(lock)
    with contextlib.suppress(OSError):
        fcntl.flock(lock, fcntl.LOCK_EX)
    staging = path.parent / f".{path.name}.staging-{fresh.name[len(f'.{path.name}.new-'):]}"
    os.replace(fresh, staging)
    try:
        # a writer that started at the same moment, past the check above: give way (if both do, neither writes)
        _refuse_if_busy(path, [p for p in staging_folders() if p != staging])
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    fsync_file(Path(root, name))
            _fsync_dir(Path(root))
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
            os.replace(old, trash)  # no longer a whole dataset to bring back once its deletion starts
            _remove_tree(trash)
        else:
            os.replace(staging, path)
        _fsync_dir(path.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        _WRITER_LOCKS.discard(lock)
        os.close(lock)


def _refuse_if_busy(path: Path, folders: list[Path]) -> None:
    busy = [p for p in folders if _held_by_another(p)]
    if busy:
        raise OutputRefused(f"{path}: another process is writing it now ({busy[0].name} is in use): wait for it to "
                            "finish, or stop it, then run again")


def _remove_tree(path: Path) -> None:
    """Delete a folder, or a symlink (to one) without following it."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
