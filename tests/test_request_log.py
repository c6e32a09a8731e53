"""The request log's writer: rows are built off the request path, at flush time; a failing builder or a storage
outage loses nothing else."""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import UTC, datetime

from sonossl.monitor import request_log
from sonossl.monitor.request_log import RequestLog, read_request_log


def _rows(n: int, tag: str) -> list[dict]:
    return [{"ts": "2026-11-27T10:00:00+00:00", "request_id": tag, "frame": i} for i in range(n)]


def test_row_builders_run_at_flush_not_when_queued(tmp_path):
    built = threading.Event()

    def builder():
        built.set()
        return _rows(3, "a")

    log = RequestLog(tmp_path / "log", flush_seconds=60)
    try:
        log.append(builder, n_rows=3)
        log.append(_rows(2, "b"))
        time.sleep(0.3)
        assert not built.is_set() and log.written_rows == 0  # queued, not built: the request path is left alone
        log.flush()
        assert built.is_set() and log.written_rows == 5
    finally:
        log.close()
    frame = read_request_log(tmp_path / "log")
    assert sorted(frame.request_id) == ["a", "a", "a", "b", "b"]


def test_max_rows_counts_queued_builders_and_a_bad_builder_loses_only_its_rows(tmp_path):
    log = RequestLog(tmp_path / "log", flush_seconds=60, max_rows=4)
    try:
        log.append(lambda: 1 / 0, n_rows=1)  # a builder that fails is logged and skipped
        log.append(lambda: _rows(3, "c"), n_rows=3)  # 4 rows queued: written without waiting for the timer
        deadline = time.monotonic() + 10
        while log.written_rows < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.written_rows == 3
    finally:
        log.close()
    assert list(read_request_log(tmp_path / "log").request_id) == ["c"] * 3


def test_rows_are_kept_and_written_once_storage_is_back(tmp_path):
    blocker = tmp_path / "log"
    log = RequestLog(blocker, flush_seconds=60)
    try:
        day = blocker / f"date={datetime.now(UTC):%Y-%m-%d}"
        day.write_text("in the way")  # a file where today's partition goes: the write fails
        log.append(lambda: _rows(2, "d"), n_rows=2)
        log.flush()
        assert log.written_rows == 0
        day.unlink()
        log.flush()
        assert log.written_rows == 2
    finally:
        log.close()
    assert list(read_request_log(blocker).request_id) == ["d", "d"]


def test_an_s3_log_reads_its_own_prefix_not_a_sibling_s(s3_server):
    """s3://b/logs/sonossl is a folder: the parts of s3://b/logs/sonossl-staging are another service's log."""
    for name, rid in (("sonossl", "prod"), ("sonossl-staging", "staging")):
        log = RequestLog(f"s3://{s3_server.bucket}/logs/{name}")
        log.append(_rows(2, rid))
        log.close()
    assert list(read_request_log(f"s3://{s3_server.bucket}/logs/sonossl").request_id) == ["prod", "prod"]
    assert list(read_request_log(f"s3://{s3_server.bucket}/logs/sonossl/").request_id) == ["prod", "prod"]


def test_a_failing_store_is_retried_after_a_back_off_not_at_every_request(tmp_path, monkeypatch):
    """While writes fail, requests keep coming: each is built into rows, but the writes back off (0.05 s, then
    0.1, 0.2...), and once storage is back every row is written."""
    import sonossl.atomic

    attempts, failing, write = [], [True], sonossl.atomic.atomic_write_bytes

    def flaky(path, data):
        attempts.append(time.monotonic())
        if failing[0]:
            raise OSError("disk full")
        return write(path, data)

    monkeypatch.setattr(sonossl.atomic, "atomic_write_bytes", flaky)
    log = RequestLog(tmp_path / "log", flush_seconds=0.05, max_rows=1)
    try:
        for i in range(60):  # 0.6 s of one-row requests, every one at max_rows
            log.append(_rows(1, f"r{i}"))
            time.sleep(0.01)
        assert 2 <= len(attempts) <= 6, attempts  # without the back-off: one attempt per request
        assert log.written_rows == 0 and log.dropped_rows == 0
        failing[0] = False
        log.flush()
        assert log.written_rows == 60
    finally:
        log.close()
    assert len(read_request_log(tmp_path / "log")) == 60


def test_requests_beyond_the_queue_bound_are_dropped_and_counted(tmp_path, monkeypatch):
    """A writer stuck in a slow write does not let the queue (and the frames its requests hold) grow: beyond
    MAX_QUEUED rows the newest requests are dropped, counted, and append never blocks."""
    import sonossl.atomic

    stuck, release, write = threading.Event(), threading.Event(), sonossl.atomic.atomic_write_bytes

    def slow(path, data):
        stuck.set()
        release.wait(10)
        return write(path, data)

    monkeypatch.setattr(sonossl.atomic, "atomic_write_bytes", slow)
    monkeypatch.setattr(request_log, "MAX_QUEUED", 10)
    log = RequestLog(tmp_path / "log", flush_seconds=60, max_rows=1)
    try:
        log.append(_rows(1, "first"))  # the writer takes it and hangs in the write
        assert stuck.wait(10)
        t = time.monotonic()
        for i in range(8):
            log.append(_rows(2, f"r{i}"))  # 5 fit (10 rows), 3 are dropped
        assert time.monotonic() - t < 1 and log.dropped_rows == 6
        release.set()
        log.flush()
        assert log.written_rows == 11
    finally:
        release.set()
        log.close()
    assert sorted(set(read_request_log(tmp_path / "log").request_id)) == ["first", "r0", "r1", "r2", "r3", "r4"]



def test_times_on_a_whole_second_read_beside_the_others(tmp_path):
    """isoformat() leaves out the microseconds of a time on a whole second: one row in a million, and pandas, left
    to guess, took the first row's form for all of them and failed the whole read on it."""
    log = RequestLog(tmp_path / "log")
    log.append([{"ts": "2026-11-27T10:00:00.250000+00:00", "request_id": "a"},
                {"ts": "2026-11-27T10:00:01+00:00", "request_id": "b"}])
    log.close()
    frame = read_request_log(tmp_path / "log")
    assert list(frame.request_id) == ["a", "b"] and frame.ts[1].second == 1


def test_a_line_that_is_not_a_row_or_not_text_names_the_file_and_line(tmp_path):
    import pytest

    part = tmp_path / "log/date=2026-11-27/part-1.jsonl"
    part.parent.mkdir(parents=True)
    part.write_text('{"ts": "2026-11-27T10:00:00+00:00", "request_id": "a"}\n5\n')
    with pytest.raises(ValueError, match=r"part-1\.jsonl: line 2 is JSON but not an object .*got int"):
        read_request_log(tmp_path / "log")
    part.write_bytes(b'{"ts": "2026-11-27T10:00:00+00:00", "request_id": "\xff"}\n')
    with pytest.raises(ValueError, match=r"part-1\.jsonl: not UTF-8 text .* at byte 51"):
        read_request_log(tmp_path / "log")


def test_damaged_lines_are_errors_or_with_a_skipped_list_left_out_and_named(tmp_path, caplog):
    """One damaged line (not JSON, a bad time, a part not UTF-8) stopped every drift report that read its part,
    backfills included, and a bad `ts` did not name its file. Strict by default, naming file and line; with a
    `skipped` list (what drift passes) the rest is read and the damage described; nothing readable is an error."""
    import pytest

    log = tmp_path / "log/date=2026-11-27"
    log.mkdir(parents=True)
    (log / "part-1.jsonl").write_text('{"ts": "2026-11-27T10:00:00+00:00", "request_id": "a"}\n'
                                      '{"ts": "2026-11-27T10:00:01+00:00", "request_id": "b"}\n'
                                      '{"ts":"2026-11-27T10:00:02+00:00","model_ver\n'
                                      '{"ts": "yesterday", "request_id": "c"}\n')
    (log / "part-2.jsonl").write_bytes(b'{"ts": "2026-11-27T10:00:03+00:00", "request_id": "\xff"}\n')
    (log / "part-3.jsonl").write_text('{"request_id": "d"}\n')
    with pytest.raises(ValueError, match=r"part-1\.jsonl: line 3 is not JSON \(Unterminated string"):
        read_request_log(tmp_path / "log")
    skipped: list[str] = []
    frame = read_request_log(tmp_path / "log", skipped=skipped)
    assert list(frame.request_id) == ["a", "b"]
    assert [x.split("/")[-1] for x in skipped] == [
        "part-1.jsonl: line 3 is not JSON (Unterminated string starting at)",
        "part-1.jsonl: line 4: `ts` 'yesterday' is not an ISO 8601 time",
        "part-2.jsonl: not UTF-8 text (invalid start byte at byte 51); is this a request log?",
        "part-3.jsonl: rows have no `ts` column; is this a sonossl request log?"]
    assert caplog.text.count("request log: left out: ") == 4
    # only damage that may hold a row of the window is described: a part written by the day after `until` (or
    # outside a date= folder); a later part's is warned about, not counted against every window before it
    later = tmp_path / "log/date=2026-12-01"
    later.mkdir()
    (later / "part-9.jsonl").write_text('{"ts": "2026-12-01T10:00:00+00:00", "request_id": "e"}\n{"ts"\n')
    window: list[str] = []
    frame = read_request_log(tmp_path / "log", datetime(2026, 11, 27), datetime(2026, 11, 28), skipped=window)
    assert list(frame.request_id) == ["a", "b"] and len(window) == 4
    window = []
    read_request_log(tmp_path / "log", datetime(2026, 11, 27), datetime(2026, 11, 30), skipped=window)
    assert len(window) == 5 and window[-1].endswith("part-9.jsonl: line 2 is not JSON (Expecting ':' delimiter)")
    caplog.clear()
    (later / "part-9.jsonl").unlink()
    (log / "part-1.jsonl").write_text('{"ts": "yesterday"}\n')
    with pytest.raises(ValueError, match=r"part-1\.jsonl: line 1: `ts` 'yesterday' is not an ISO 8601 time"):
        read_request_log(tmp_path / "log")  # the file named (it was pandas' message alone)
    with pytest.raises(ValueError, match=r"no readable row, 3 damaged line\(s\) or file\(s\)"):
        read_request_log(tmp_path / "log", skipped=[])


def test_a_window_reads_only_the_days_it_can_hold_and_takes_naive_times_as_utc(tmp_path):
    """A part file is written after every row in it, so the parts of days more than a day before ``since`` are never
    read (here one of them is not even JSON; the day before is, for a clock stepped back), while a later day's part
    may hold a late-written row of the window (a storage outage delays writes). A part outside any ``date=`` folder is read. A naive ``since``/``until`` is UTC, as the CLI's
    times are: pandas refused to compare one with the log's times."""
    root = tmp_path / "log"
    parts = {"date=2026-11-25/part-1.jsonl": "not json\n",
             "date=2026-11-26/part-1.jsonl": '{"ts": "2026-11-26T23:59:59+00:00", "request_id": "before"}\n',
             "date=2026-11-27/part-1.jsonl": '{"ts": "2026-11-27T10:00:00+00:00", "request_id": "in"}\n',
             "date=2026-11-28/part-1.jsonl": ('{"ts": "2026-11-27T23:59:58+00:00", "request_id": "late"}\n'
                                              '{"ts": "2026-11-28T00:00:01+00:00", "request_id": "after"}\n'),
             "part-old.jsonl": '{"ts": "2026-11-27T12:00:00+00:00", "request_id": "loose"}\n'}
    for name, text in parts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    naive = read_request_log(root, since=datetime(2026, 11, 27), until=datetime(2026, 11, 28))
    aware = read_request_log(root, since=datetime(2026, 11, 27, tzinfo=UTC), until=datetime(2026, 11, 28, tzinfo=UTC))
    assert list(naive.request_id) == list(aware.request_id) == ["in", "loose", "late"]
    import pytest

    with pytest.raises(ValueError, match=r"date=2026-11-25/part-1\.jsonl: line 1 is not JSON"):
        read_request_log(root, since=datetime(2026, 11, 25, 12))  # that day's part may hold the window: read
    later = read_request_log(root, since=datetime(2026, 12, 1))  # every part written before it: no rows, no error
    assert later.empty and "ts" in later.columns
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no log files"):  # a log with no parts at all: a wrong location
        read_request_log(tmp_path / "empty")


def test_a_row_json_cannot_write_is_dropped_not_the_writer(tmp_path, caplog):
    """Rows become JSON lines where they are built: one that JSON cannot write (an object, a numpy scalar) is logged
    and dropped with its request, and the writer goes on; it used to end the writer thread, and every later row.
    Part names carry the host: in pods every replica's server is process 1."""
    log = RequestLog(tmp_path / "log", flush_seconds=60)
    try:
        log.append([{"ts": "2026-11-27T10:00:00+00:00", "request_id": "bad", "x": object()}])
        log.append(_rows(2, "good"))
        log.flush()
        log.append(_rows(1, "later"))
        log.flush()
        assert log.written_rows == 3
    finally:
        log.close()
    assert list(read_request_log(tmp_path / "log").request_id) == ["good", "good", "later"]
    assert "could not build log rows" in caplog.text
    writer = f"-{request_log._safe_name(socket.gethostname())}-{os.getpid()}-"  # replicas are all process 1
    assert all(writer in p.name for p in (tmp_path / "log").rglob("part-*.jsonl"))


def test_an_s3_window_lists_only_the_days_it_can_hold(s3_server, monkeypatch):
    """On S3 a window's read starts the listing after the day before its first day (S3 lists keys in order): a
    year of parts is not listed for yesterday's report. Parts outside any date= folder sort after the folders and
    are still read; a window after the last part is empty, not a missing log."""
    import pytest

    from sonossl import storage
    from sonossl.storage import put_bytes

    log = f"s3://{s3_server.bucket}/logs/sonossl"
    for day, rid in (("2026-11-20", "old"), ("2026-11-26", "eve"), ("2026-11-27", "in"), ("2026-11-28", "late")):
        ts = "2026-11-27T23:00:00+00:00" if rid == "late" else f"{day}T12:00:00+00:00"
        put_bytes(f'{{"ts": "{ts}", "request_id": "{rid}"}}\n'.encode(), f"{log}/date={day}/part-1.jsonl")
    put_bytes(b'{"ts": "2026-11-27T13:00:00+00:00", "request_id": "loose"}\n', f"{log}/part-loose.jsonl")
    listed = []
    real = storage.list_uris

    def recording(prefix, **kw):
        got = real(prefix, **kw)
        listed.extend(got)
        return got

    monkeypatch.setattr(storage, "list_uris", recording)
    rows = read_request_log(log, since=datetime(2026, 11, 27, tzinfo=UTC), until=datetime(2026, 11, 28, tzinfo=UTC))
    assert list(rows.request_id) == ["in", "loose", "late"]
    assert not any("date=2026-11-20" in u for u in listed)  # the old day: never listed
    assert any("date=2026-11-26" in u for u in listed)  # the day before: kept for a clock stepped back
    assert read_request_log(log, since=datetime(2027, 1, 1, tzinfo=UTC)).empty
    old = f"s3://{s3_server.bucket}/logs/old"  # only parts of days long before the window: no rows, no error
    put_bytes(b'{"ts": "2026-11-20T12:00:00+00:00", "request_id": "old"}\n', f"{old}/date=2026-11-20/part-1.jsonl")
    assert read_request_log(old, since=datetime(2027, 1, 1, tzinfo=UTC)).empty
    with pytest.raises(FileNotFoundError, match="no log files"):  # nothing there at all: a wrong location
        read_request_log(f"s3://{s3_server.bucket}/logs/none", since=datetime(2027, 1, 1, tzinfo=UTC))


def test_rows_that_cannot_be_written_at_shutdown_are_retried_then_counted_as_lost(tmp_path, monkeypatch, caplog):
    """close() (the server's SIGTERM) with storage down: the last rows are tried again a few times; if storage
    comes back meanwhile they are written, otherwise they are counted as dropped and an error says how many."""
    import logging

    import sonossl.atomic

    attempts, fail_first, write = [], [99], sonossl.atomic.atomic_write_bytes

    def flaky(path, data):
        attempts.append(path)
        if len(attempts) <= fail_first[0]:
            raise OSError("storage down")
        return write(path, data)

    monkeypatch.setattr(sonossl.atomic, "atomic_write_bytes", flaky)
    monkeypatch.setattr(request_log, "CLOSE_RETRY_S", (0.01, 0.01))
    log = RequestLog(tmp_path / "down", flush_seconds=60)
    log.append(_rows(5, "a"))
    with caplog.at_level(logging.ERROR, logger="sonossl.monitor.request_log"):
        log.close()
    assert len(attempts) == 3 and log.written_rows == 0 and log.dropped_rows == 5
    assert "5 rows could not be written before shutdown and are lost" in caplog.text
    attempts.clear()
    fail_first[0] = 1  # storage back after one more failure: nothing lost
    log = RequestLog(tmp_path / "back", flush_seconds=60)
    log.append(_rows(5, "b"))
    log.close()
    assert len(attempts) == 2 and log.written_rows == 5 and log.dropped_rows == 0
    assert len(read_request_log(tmp_path / "back")) == 5


def test_a_shutdown_whose_last_write_outlasts_close_counts_the_rows_once(tmp_path, monkeypatch, caplog):
    """One failed S3 write can take longer than close()'s wait: close() then counts what is unwritten as dropped and
    says so, and the writer, finishing later, does not count the same rows again."""
    import logging

    import sonossl.atomic

    def slow_failure(path, data):
        time.sleep(0.5)
        raise OSError("storage down")

    monkeypatch.setattr(sonossl.atomic, "atomic_write_bytes", slow_failure)
    monkeypatch.setattr(request_log, "CLOSE_RETRY_S", (0.01, 0.01))
    log = RequestLog(tmp_path / "slow", flush_seconds=60)
    log.append(_rows(7, "a"))
    with caplog.at_level(logging.ERROR, logger="sonossl.monitor.request_log"):
        log.close(timeout=0.2)
    assert log.dropped_rows == 7 and "still writing when close() gave up after 0.2 s; 7 rows" in caplog.text
    log._thread.join(timeout=5)  # the writer's own last try fails later, and stops: no time left for another
    assert not log._thread.is_alive() and log.dropped_rows == 7 and log.written_rows == 0
