"""The request log: what the endpoint saw, one row per frame, for drift monitoring.

Each served frame becomes a row with the timestamp, request id and model version, the PCA-reduced embedding
(``emb_0``...), the image statistics of ``sonossl.monitor.image_stats`` (computed on the preprocessed frame, as for
the reference exported with the model), the predicted label and its probability, and whether the frame was blank.
Raw images are never logged.

Rows are queued by the request handler and written by a background thread, so logging adds no latency to a request:
a request queues a callable that builds its rows, and the thread builds them all at flush time (building them as
requests arrive took the interpreter lock from the next request: 3-20 % of a short clip's latency). Every
``flush_seconds`` (or ``max_rows`` rows) one part file ``date=YYYY-MM-DD/part-<time>-<host>-<pid>-<n>.jsonl`` is
written whole, atomically on a local disk and as one object on S3 (``s3://bucket/prefix``, through
``sonossl.storage``). A failed write is logged and retried after a back-off (``flush_seconds``, doubling up to
``MAX_BACKOFF_S``), not at every request; meanwhile queued requests are still built into rows (which frees their
frames). Both the rows not yet written (``MAX_PENDING``) and the rows queued but not yet taken by the writer
(``MAX_QUEUED``) are bounded, the oldest pending rows and the newest requests dropped and counted (``dropped_rows``)
beyond them, so a storage outage costs log rows, never memory or requests. ``close`` (SIGTERM's shutdown) tries the
last rows again a few times (``CLOSE_RETRY_S``) within ``CLOSE_TIMEOUT_S``; rows still unwritten are counted as
dropped and logged as an error.

    log = RequestLog("logs/requests")            # or "s3://bucket/sonossl/requests"
    log.append(rows); log.flush(); log.close()
    frame = read_request_log("logs/requests")    # DataFrame, oldest first
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_PENDING = 100_000  # rows held while storage is unreachable; older rows are dropped beyond this
MAX_QUEUED = 20_000  # rows of requests queued and not yet taken by the writer (each holds its frames until built)
MAX_SKIPPED_SHOWN = 5  # damaged lines or files named in the warnings of one read (the rest counted)
MAX_BACKOFF_S = 300.0  # longest wait between two attempts to write while storage fails
CLOSE_RETRY_S = (1.0, 2.0, 4.0)  # pauses between the last tries at shutdown, while close()'s time lasts
# how long close() waits for the last write: a pod's grace period is 30 s by default, and with storage down the
# server took 35 s to exit when this was 30 (a review's measurement; the server's own shutdown besides), so the last
# log line, which counts the rows lost, came after the SIGKILL; with 20 it exited after 22 s
CLOSE_TIMEOUT_S = 20.0


def is_s3(uri: str | Path) -> bool:
    """Whether a log or report location is an S3 prefix (s3://bucket/...) rather than a local folder."""
    return str(uri).startswith("s3://")


def _safe_name(text: str) -> str:
    """``text`` with anything but letters, digits, '.', '_' and '-' replaced, for a file or object name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "host"


def _join(uri: str | Path, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts]) if is_s3(uri) else str(Path(uri, *parts))


class RequestLog:
    """Append-only request log in a local folder or under an S3 prefix, written off the request path."""

    def __init__(self, uri: str | Path, flush_seconds: float = 5.0, max_rows: int = 2000):
        if flush_seconds <= 0 or max_rows < 1:
            raise ValueError(f"request log: flush_seconds must be > 0 and max_rows >= 1, got {flush_seconds}, {max_rows}")
        self.uri = str(uri)
        self.flush_seconds, self.max_rows = flush_seconds, max_rows
        self._queue: queue.Queue[Any] = queue.Queue()
        self._queued_rows = 0  # rows in self._queue, bounded by MAX_QUEUED
        self._count_lock = threading.Lock()  # request threads and the writer both change the counts
        self._backoff = 0.0  # seconds to wait after a failed write (0: the last write worked)
        self._retry_at = 0.0  # monotonic time before which no write is tried (unless flushed)
        self._pending: list[str] = []  # rows built (JSON lines), not yet written
        self._writer = f"{_safe_name(socket.gethostname())}-{os.getpid()}"
        self._deferred: list[Any] = []  # row builders queued since the last flush
        self._deferred_rows = 0
        self._parts = 0
        self._s3 = None
        self._close_by = float("inf")  # close() sets when the last write must be done
        self._given_up = False  # close() stopped waiting for the writer
        self.written_rows = 0
        self.dropped_rows = 0
        if not is_s3(self.uri):
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="sonossl-request-log", daemon=True)
        self._thread.start()

    def append(self, rows: list[dict[str, Any]] | Any, n_rows: int = 1) -> None:
        """Queue rows, or a callable returning ``n_rows`` rows (built in the writer thread at the next flush, so it
        holds whatever it needs until then); never blocks. Beyond ``MAX_QUEUED`` rows waiting for the writer (it
        is stuck in a slow write) the rows are dropped and counted."""
        n = len(rows) if isinstance(rows, list) else n_rows
        with self._count_lock:
            full = self._queued_rows + n > MAX_QUEUED
            if not full:
                self._queued_rows += n
        if full:
            self._drop(n, "the writer is behind (a slow write): the newest")
        else:
            self._queue.put((rows, n))

    def _drop(self, n: int, which: str) -> None:
        """Count ``n`` dropped rows; warn at the first and then once per 10,000, not at every request."""
        with self._count_lock:
            before, self.dropped_rows = self.dropped_rows, self.dropped_rows + n
        if before == 0 or before // 10_000 != self.dropped_rows // 10_000:
            log.warning("request log %s: %s rows dropped, %d so far", self.uri, which, self.dropped_rows)

    def flush(self, timeout: float = 30.0) -> None:
        """Write everything queued so far; blocks until it is written (or ``timeout`` seconds)."""
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout):
            raise TimeoutError(f"request log {self.uri}: not flushed within {timeout} s")

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued and stop the writer, within ``timeout`` seconds. Rows still unwritten then (storage
        slow or down: one failed S3 write can outlast it) are counted as dropped and logged as an error, as the
        process is about to exit with them."""
        if not self._thread.is_alive():
            return
        self._close_by = time.monotonic() + timeout
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            with self._count_lock:
                unwritten = len(self._pending) + self._deferred_rows + self._queued_rows
                self._given_up = True  # the writer, if it ever finishes, does not count them again
            self._drop(unwritten, "storage too slow at shutdown: the last")
            log.error("request log %s: still writing when close() gave up after %g s; %d rows not written are lost "
                      "when the process exits (%d dropped in all)", self.uri, timeout, unwritten, self.dropped_rows)

    def _run(self) -> None:
        deadline = time.monotonic() + self.flush_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = ...
            if item is None:
                self._last_write()
                return
            if isinstance(item, threading.Event):
                self._write()
                item.set()
                continue
            if item is not ...:
                rows, n = item
                with self._count_lock:
                    self._queued_rows -= n
                self._deferred.append(rows)
                self._deferred_rows += n
            if len(self._pending) + self._deferred_rows >= self.max_rows or time.monotonic() >= deadline:
                if time.monotonic() >= self._retry_at:
                    self._write()
                else:  # storage failed a moment ago: build the rows (freeing their frames), write later
                    self._build()
                deadline = time.monotonic() + self.flush_seconds

    def _last_write(self) -> None:
        """At shutdown: write what is left, trying again a few times (``CLOSE_RETRY_S`` apart) while storage fails;
        rows still unwritten then are counted as dropped, and said so: nothing is lost silently."""
        for pause in (*CLOSE_RETRY_S, None):
            if self._write():
                return
            if pause is None or time.monotonic() + pause >= self._close_by:
                break  # no time left for another try
            time.sleep(pause)
        lost = len(self._pending)
        self._pending = []
        with self._count_lock:
            if self._given_up:  # close() stopped waiting and counted them already
                return
        self._drop(lost, "storage unavailable at shutdown: the last")
        log.error("request log %s: %d rows could not be written before shutdown and are lost (%d dropped in all)",
                  self.uri, lost, self.dropped_rows)

    def _build(self) -> None:
        for item in self._deferred:
            try:  # to JSON here: a row JSON cannot write is dropped with its request, not the writer thread
                lines = [json.dumps(r, separators=(",", ":")) + "\n" for r in (item() if callable(item) else item)]
            except Exception:  # noqa: BLE001 - a bad row must never stop the writer
                log.exception("request log: could not build log rows")
                continue
            self._pending.extend(lines)
        self._deferred, self._deferred_rows = [], 0
        if len(self._pending) > MAX_PENDING:
            self._drop(len(self._pending) - MAX_PENDING, "storage unavailable: the oldest")
            del self._pending[: len(self._pending) - MAX_PENDING]

    def _write(self) -> bool:
        """Write the pending rows as one part file; False when storage failed (the rows stay pending)."""
        self._build()
        if not self._pending:
            return True
        now = datetime.now(UTC)
        self._parts += 1
        # the host names the writer: every replica's server is process 1 of its own pod
        name = f"part-{now:%Y%m%dT%H%M%S%f}-{self._writer}-{self._parts:06d}.jsonl"
        body = "".join(self._pending).encode()
        target = _join(self.uri, f"date={now:%Y-%m-%d}", name)
        try:
            if is_s3(self.uri):
                from sonossl.storage import client, put_bytes

                if self._s3 is None:  # one client for the writer thread (boto3 clients are thread-safe anyway)
                    self._s3 = client()
                put_bytes(body, target, client=self._s3)
            else:
                from sonossl.atomic import atomic_write_bytes

                Path(target).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, body)
        except Exception as e:  # noqa: BLE001 - the server keeps serving; rows are retried after a back-off
            self._backoff = min(MAX_BACKOFF_S, max(self.flush_seconds, 2 * self._backoff))
            self._retry_at = time.monotonic() + self._backoff
            log.warning("request log: could not write %s (%s); %d rows kept, next try in %.0f s", target, e,
                        len(self._pending), self._backoff)
            return False
        self.written_rows += len(self._pending)
        self._pending = []
        self._backoff, self._retry_at = 0.0, 0.0
        return True


def _written_on(name: str) -> date | None:
    """The day a part file was written, from its ``date=YYYY-MM-DD`` folder; None for a file outside one."""
    folder = Path(name).parent.name  # a local path or an s3:// URI alike
    if not folder.startswith("date="):
        return None
    try:
        return date.fromisoformat(folder[5:])
    except ValueError:
        return None


def _part_files(uri: str, first_day: date | None = None) -> list[str]:
    """The log's part files; on S3 from the ``date=`` folder of ``first_day`` on (the earlier ones are not listed,
    as S3 lists keys in order), with the parts outside any ``date=`` folder that sort after it."""
    if is_s3(uri):
        from sonossl.storage import list_uris, parse_s3_uri

        # the prefix as a folder: s3://b/logs/sonossl must not read s3://b/logs/sonossl-staging's parts
        folder = uri.rstrip("/") + "/"
        after = ""
        if first_day is not None:  # after every key of the day before: "~" sorts after a part's name
            after = parse_s3_uri(folder)[1] + f"date={first_day - timedelta(days=1):%Y-%m-%d}/~"
        return sorted(u for u in list_uris(folder, start_after=after) if u.endswith(".jsonl"))
    root = Path(uri)
    if not root.is_dir():
        raise FileNotFoundError(f"request log {uri}: no such folder")
    return [str(p) for p in sorted(root.rglob("*.jsonl"))]


def last_written(uri: str | Path, first_day: date, last_day: date | None = None) -> date | None:
    """The last day from ``first_day`` to ``last_day`` (default: no end) on which the log got a part file (its
    ``date=`` folders), or None: a log that nothing was written to in those days (no traffic, or a server that
    stopped logging). Parts of later days do not count: they cannot show that the log was written to then (a
    backfill's window, or a replica whose clock runs days ahead)."""
    days = [d for d in map(_written_on, _part_files(str(uri), first_day))
            if d is not None and d >= first_day and (last_day is None or d <= last_day)]
    return max(days, default=None)


def _holds_anything(uri: str) -> bool:
    """Whether an S3 log prefix holds any object (one short listing): a log with parts, none of them listed for a
    window after its last day, is a log with no rows there, not a wrong location."""
    from sonossl.storage import holds

    return holds(uri.rstrip("/") + "/")


def as_utc(t: datetime | None) -> datetime | None:
    """An aware time as it is, a naive one taken as UTC (as the log's own times are written; also the CLI's
    ``--since`` and ``--until``)."""
    return t if t is None or t.tzinfo else t.replace(tzinfo=UTC)


def read_request_log(uri: str | Path, since: datetime | None = None, until: datetime | None = None,
                     skipped: list[str] | None = None):
    """All rows of a request log (local folder or ``s3://`` prefix), oldest first, within [since, until); a naive
    ``since`` or ``until`` is UTC. A part file is written after every row it holds, so those under a ``date=``
    folder more than a day before ``since`` are neither read nor, on S3, listed: a window costs the days it covers
    (and the files written after it), not the whole history. (The day's margin: a wall clock stepped back across
    midnight can write a row of the next day into the day before.)

    A line that is not a JSON object, a row whose ``ts`` is not an ISO 8601 time, or a part that is not UTF-8 text
    (the server writes none of these: another tool, or damage) is an error naming the file and line; with a
    ``skipped`` list, it is left out with a warning instead, unless nothing could be read at all, and described in
    ``skipped`` when it may hold a row of the window: a part written by the day after ``until`` (a part's rows are
    written before it, the day's margin for a clock), or outside any ``date=`` folder. (Rows held through a storage
    outage can land in a later part; damage there is warned about, not counted against every window before it.)"""
    import pandas as pd

    uri = str(uri)
    since, until = as_utc(since), as_utc(until)
    first_day = since.astimezone(UTC).date() - timedelta(days=1) if since is not None else None
    frames = []
    names = _part_files(uri, first_day)
    if not names and not (first_day is not None and is_s3(uri) and _holds_anything(uri)):
        raise FileNotFoundError(f"request log {uri}: no log files (part-*.jsonl) found")
    bad: list[str] = []  # every damaged line or file read
    in_window: list[str] = []  # those that may hold a row of the window
    last_day = until.astimezone(UTC).date() + timedelta(days=1) if until is not None else None

    def damaged(problem: str) -> None:  # of the part being read (``day``: its date, None outside a date= folder)
        if skipped is None:
            raise ValueError(problem)
        bad.append(problem)
        if last_day is None or day is None or day <= last_day:
            in_window.append(problem)

    for name in names:
        day = _written_on(name)
        if first_day is not None and day is not None and day < first_day:
            continue
        if is_s3(uri):
            from sonossl.storage import get_bytes

            data = get_bytes(name)
        else:
            data = Path(name).read_bytes()
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            damaged(f"{name}: not UTF-8 text ({e.reason} at byte {e.start}); is this a request log?")
            continue
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                damaged(f"{name}: line {n} is not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                damaged(f"{name}: line {n} is JSON but not an object (a request log row is one), got "
                        f"{type(row).__name__}")
                continue
            rows.append(row)
            lines.append(n)
        if not rows:
            continue
        part = pd.DataFrame(rows)
        if "ts" not in part.columns:
            damaged(f"{name}: rows have no `ts` column; is this a sonossl request log?")
            continue
        # ISO 8601 in any of its forms: isoformat() leaves out the fraction of a time on a whole second (1 in 10^6
        # requests), and pandas would otherwise take the first row's form for every row and fail on such a one
        ts = pd.to_datetime(part["ts"], utc=True, format="ISO8601", errors="coerce")
        for i in ts.index[ts.isna()]:  # a RangeIndex: positions
            damaged(f"{name}: line {lines[i]}: `ts` {part['ts'].iloc[i]!r} is not an ISO 8601 time")
        frames.append(part.assign(ts=ts)[ts.notna()])
    if bad:
        for problem in bad[:MAX_SKIPPED_SHOWN]:
            log.warning("request log: left out: %s", problem)
        if len(bad) > MAX_SKIPPED_SHOWN:
            log.warning("request log: left out %d more damaged line(s) or file(s)", len(bad) - MAX_SKIPPED_SHOWN)
        if not any(len(f) for f in frames):
            raise ValueError(f"request log {uri}: no readable row, {len(bad)} damaged line(s) or file(s), e.g. "
                             f"{bad[0]}; is this a sonossl request log?")
        skipped.extend(in_window)  # type: ignore[union-attr]  # only filled when skipped is a list
    frames = [f for f in frames if len(f)]
    if not frames:  # every part is of a day before the window, or empty
        return pd.DataFrame({"ts": pd.Series([], dtype="datetime64[ns, UTC]")})
    out = pd.concat(frames, ignore_index=True)
    if since is not None:
        out = out[out.ts >= pd.Timestamp(since)]
    if until is not None:
        out = out[out.ts < pd.Timestamp(until)]
    return out.sort_values("ts", kind="stable").reset_index(drop=True)
