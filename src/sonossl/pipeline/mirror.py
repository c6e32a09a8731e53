"""Checkpoints that outlive a Kubeflow task's pod: a GPU step's output folder mirrored to S3 while it runs.

KFP's launcher uploads a task's output artefacts only when the task succeeds, and a retry starts a new pod with an
empty output folder, so without help a retried step trains again from its first epoch. With a checkpoint store (the
pipelines' ``checkpoint_store`` parameter, an ``s3://`` prefix), ``mirrored`` first restores what an earlier attempt
at the same work left at ``<store>/<step>/<key>`` into the output folder (``key``: a hash of what the step computes
from, ``sonossl.pipeline.steps``: the same data, parameters and code give the same key, in a retry as in a later
run), then copies the folder there every ``interval`` seconds and once more when the step ends, fails or is sent
SIGTERM (a preempted node's pod gets SIGTERM and a grace period). The training loop's own ``resume`` then continues
the last checkpoint, which it accepts only from the same run (``sonossl.train.loop.fingerprint``). Files are written
atomically under hidden temporary names, which are never copied; unchanged files are not sent again (their SHA-256
is compared, ``sonossl.storage``).

    with mirrored("/tmp/outputs/encoder", store_uri("s3://bucket/checkpoints", "pretrain", key)):
        pretrain(clips, "/tmp/outputs/encoder", params, resume=True)

``sonossl pretrain --checkpoint-store URI`` does the same outside Kubeflow, under torchrun from rank 0 only and
without the restore (rank 0's node restores before torchrun starts, ``sonossl artifacts pull --missing-ok URI
FOLDER``, ``k8s/pretrain``, and rank 0 sends the checkpoint to the other ranks, so that every rank resumes the same
epoch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SYNC_SECONDS = 60.0
INTERVAL_ENV = "SONOSSL_CHECKPOINT_SYNC_SECONDS"  # how often the folder is copied (default SYNC_SECONDS)


def store_uri(store: str, step: str, key: str) -> str:
    """``<store>/<step>/<key>``, checked: an ``s3://`` store, a step name and a key, each a name without '/'."""
    if not store.startswith("s3://"):
        raise ValueError(f"pipeline parameter checkpoint_store={store!r}: give an s3:// prefix (or leave it empty)")
    for what, value in (("step name", step), ("key", key)):
        if not value or "/" in value:
            raise ValueError(f"checkpoint store {store}: the {what} {value!r} must be a non-empty name without '/'")
    return f"{store.rstrip('/')}/{step}/{key}"


def _files(folder: Path) -> list[Path]:
    """The folder's files, without hidden ones (the temporary names of atomic writes start with a dot)."""
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def push(folder: str | Path, uri: str, client=None) -> int:
    """Copy the folder's files to ``uri``; a file that vanishes meanwhile (replaced by a newer one) is skipped, as
    the next push sends its successor. Returns the number of files it holds there."""
    from sonossl import storage

    folder, sent = Path(folder), 0
    s3 = client or storage.client()
    for path in _files(folder):
        try:  # at DEBUG: one line per file per copy would drown the step's log
            storage.upload(path, f"{uri}/{path.relative_to(folder).as_posix()}", client=s3, log_level=logging.DEBUG)
            sent += 1
        except FileNotFoundError:
            continue
    return sent


def restore(uri: str, folder: str | Path, client=None) -> int:
    """Copy what ``uri`` holds into ``folder`` (files already there are replaced); 0 when it holds nothing."""
    from sonossl import storage

    s3 = client or storage.client()
    if not storage.holds(uri, client=s3):
        return 0
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="sonossl-restore-") as tmp:
        staged = storage.download(uri, Path(tmp) / "staged", client=s3)  # every file sha256-verified first
        files = _files(staged)
        for path in files:
            dest = folder / path.relative_to(staged)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, dest)
    return len(files)


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV) or str(SYNC_SECONDS)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{INTERVAL_ENV}={text!r}: expected a number of seconds above 0")
    return value


@contextlib.contextmanager
def mirrored(folder: str | Path, uri: str | None, interval: float | None = None,
             restore_first: bool = True) -> Iterator[str | None]:
    """Mirror ``folder`` to the ``s3://`` prefix ``uri`` while the block runs, after restoring what it holds
    (``restore_first``; see the module); no ``uri`` mirrors nothing. Yields ``uri``."""
    if not uri:
        yield None
        return
    from sonossl import storage

    if not uri.startswith("s3://"):
        raise ValueError(f"checkpoint store {uri!r}: give an s3:// prefix")
    interval = _interval() if interval is None else interval
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s3 = storage.client()
    if restore_first:
        try:
            restored = restore(uri, folder, client=s3)
        except storage.ChecksumMismatch as e:  # a damaged store must not fail every retry and every later run
            log.warning("checkpoint store %s: cannot be restored (%s); deleting what it holds and starting fresh",
                        uri, e)
            storage.delete_prefix(uri, client=s3)
            restored = None
        if restored is not None:
            log.info("checkpoint store %s: %s", uri, f"restored {restored} file(s) of an earlier attempt"
                     if restored else "nothing there yet; starting fresh")
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                push(folder, uri, client=s3)
            except Exception as e:  # a failed copy is retried at the next tick; training goes on
                log.warning("checkpoint store %s: copy failed (%s); retrying in %.0f s", uri, e, interval)

    def on_sigterm(signum, frame):  # a pod being stopped: end the step here, through the last copy below
        raise SystemExit(128 + signum)

    thread = threading.Thread(target=loop, name="checkpoint-mirror", daemon=True)
    thread.start()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield uri
    finally:
        stop.set()
        thread.join()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:  # the last state, whether the step finished, failed or was asked to stop
            push(folder, uri, client=s3)
            log.info("checkpoint store %s: folder copied", uri)
        except Exception as e:  # never hides the step's own outcome (its result, or the error that stopped it)
            log.warning("checkpoint store %s: the last copy failed (%s); a retry resumes from an earlier one",
                        uri, e)
