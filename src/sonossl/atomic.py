"""Atomic writes: an artefact is either complete at its final path or absent.

Every file and dataset directory sonossl produces goes through here, so that an interrupted run (Ctrl-C,
``kill -9``, a full disk) never leaves a half-written artefact for DVC to cache or for a later step to read.

    with atomic_dir("data/clips/sim") as staging:
        (staging / "frames.npy").write_bytes(...)
    # only now does data/clips/sim exist, complete
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
# [a-z0-9_]: `.<name>.<random>.tmp`, `.<name>.tmp-<pid><suffix>`, `.<name>.staging-<random>`, `.<name>.old-<pid>`
# (the replaced folder, between its two renames), `.<name>.<random>.part`.
_TEMPORARY = re.compile(r"\..+\.(?:[a-z0-9_]{8}\.(?:tmp|part)|tmp-\d+(?:\.[^./]+)?|staging-[a-z0-9_]{8}|old-\d+)")


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
    there are several, and is deleted otherwise. One writer per ``path`` at a time: a second one would delete the
    first one's staging folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of runs that were killed before they could clean up.
    for stale in [*path.parent.glob(f".{path.name}.staging-*"), *path.parent.glob(f".{path.name}.trash-*")]:
        _remove_tree(stale)
    swapped = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.lstat().st_mtime_ns)
    if swapped and not (path.exists() or path.is_symlink()):
        os.replace(swapped.pop(), path)
    for old in swapped:
        _remove_tree(old)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    try:
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


def _remove_tree(path: Path) -> None:
    """Delete a folder, or a symlink (to one) without following it."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
