"""Drift reports end to end: a real server (tiny model) logs what it serves; ``sonossl drift`` compares time windows
of that log with the model's reference. Three windows: new sweeps from the training simulator (no drift), sweeps
from a scanner set 12 dB brighter (drift), and real lung POCUS videos (drift)."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import start_server, stop_server


def _send(client, paths: list[Path]) -> tuple[datetime, datetime, int]:
    start = datetime.now(UTC)
    n = sum(client.infer_video(p)["probs"].shape[0] for p in paths)
    time.sleep(0.01)
    return start, datetime.now(UTC), n


def _videos(raw: Path) -> list[Path]:
    return [raw / line.split(",")[0] for line in (raw / "labels.csv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def served(drift_export, tiny_params, pocus_dir, tmp_path_factory):
    """The request log of one server that saw three windows of traffic; the windows' (since, until, frames)."""
    from sonossl.data.simulate import simulate
    from sonossl.serve.client import Client

    work = tmp_path_factory.mktemp("drift")
    sim = dataclasses.replace(tiny_params.simulate, seed=11)  # sweeps the model never saw, same scanner
    simulate(work / "heldout", sim, progress=False)
    simulate(work / "bright", dataclasses.replace(sim, gain_db=12.0), progress=False)
    import pandas as pd

    pocus = pd.read_csv(pocus_dir / "labels.csv")
    short = pocus[pocus.frames <= 40].sort_values("frames").head(8)  # small real videos, a few of each class
    srv = start_server(drift_export, work, str(work / "requests"))
    try:
        client = Client(srv.url)
        windows = {"heldout": _send(client, _videos(work / "heldout")),
                   "bright": _send(client, _videos(work / "bright")),
                   "pocus": _send(client, [pocus_dir / p for p in short.path])}
    finally:
        stop_server(srv)
    return work / "requests", windows


def test_three_windows_no_drift_then_drift_then_drift(served, drift_export, tmp_path):
    from sonossl.monitor.drift import drift_report

    log, windows = served
    results = {name: drift_report(drift_export, log, tmp_path / "reports", since=since, until=until, window=name)
               for name, (since, until, _) in windows.items()}
    for name, r in results.items():
        print(name, json.dumps({k: r.summary[k] for k in ("drifted", "columns", "embedding", "frames")}))
    assert not results["heldout"].drift_detected
    assert results["bright"].drift_detected
    assert results["pocus"].drift_detected
    for name, r in results.items():
        assert r.summary["frames"] == windows[name][2]  # every served frame was logged, none blank here
        assert Path(r.html).stat().st_size > 100_000 and json.loads(Path(r.json).read_text())["metrics"]
    index = json.loads((tmp_path / "reports/index.json").read_text())
    assert {e["window"]: e["drift_detected"] for e in index} == {"heldout": False, "bright": True, "pocus": True}
    html = (tmp_path / "reports/index.html").read_text()
    assert all(f'href="{w}/drift.html"' in html for w in windows)
    # the terminal's lines: each check's score against its threshold, the frame sizes' share too
    from sonossl.monitor.drift import summary_text

    fs = results["pocus"].summary["frame_size"]
    assert f"  frame size   {fs['unseen_share']:8.3f}  threshold   0.500  (share of frames at a size the training " \
           "data never had; window: " in summary_text(results["pocus"].summary)


def test_cli_exit_code_says_whether_there_is_drift(served, drift_export, tmp_path, capsys):
    from sonossl.cli import main

    log, windows = served
    common = ["drift", "--model-dir", str(drift_export), "--log", str(log), "--out", str(tmp_path)]
    since, until, _ = windows["heldout"]
    assert main([*common, "--since", since.isoformat(), "--until", until.isoformat(), "--window", "a"]) == 0
    assert "no drift" in capsys.readouterr().out
    since, until, _ = windows["bright"]
    assert main([*common, "--since", since.isoformat(), "--until", until.isoformat(), "--window", "b"]) == 1
    out = capsys.readouterr().out
    assert "DRIFT in" in out and "threshold" in out and "report:" in out
    # nothing to judge (no rows in the window, or too few): exit 3, no report, not the error code 2; a schedule
    # may make it 0 (--too-few-exit-code)
    for window in (["--since", "2031-01-01T00:00"], ["--until", "2000-01-01T00:00"]):
        assert main([*common, *window, "--window", "empty"]) == 3
        assert "too few frames to judge" in capsys.readouterr().err
        assert main([*common, *window, "--window", "empty", "--too-few-exit-code", "0"]) == 0
    assert not (tmp_path / "empty").exists()
    # --since not before --until (swapped in a backfill script) is bad input, not an empty window that a schedule's
    # --too-few-exit-code 0 would pass as success every day
    for until in (since, since - timedelta(days=1)):
        assert main([*common, "--since", since.isoformat(), "--until", until.isoformat(), "--window", "x",
                     "--too-few-exit-code", "0"]) == 2
        assert f"--since {since.isoformat()} is not before --until {until.isoformat()}" in capsys.readouterr().err
    # an exit code of its own: 0 or 3 to 125 (256 was 0, 1 meant drift)
    for code in ("1", "2", "256", "-1", "x"):
        with pytest.raises(SystemExit):
            main([*common, "--too-few-exit-code", code])
        assert "expected 0 or a number from 3 to 125" in capsys.readouterr().err


def test_a_log_nothing_was_written_to_for_days_is_an_error_with_stale_log_days(drift_export, tmp_path, capsys):
    """Too few frames in the window is an answer (exit 3, or 0 on a schedule), but a server that stopped logging
    looks the same: with --stale-log-days N, a log that got no part file in the N days up to the window's end is an
    error (exit 2) naming the days."""
    from sonossl.cli import main

    log = tmp_path / "log"
    (log / "date=2026-11-20").mkdir(parents=True)
    (log / "date=2026-11-20/part-1.jsonl").write_text('{"ts": "2026-11-20T12:00:00+00:00"}\n')
    common = ["drift", "--model-dir", str(drift_export), "--log", str(log), "--out", str(tmp_path / "reports"),
              "--since", "2026-11-27T00:00", "--until", "2026-11-28T00:00", "--too-few-exit-code", "0"]
    assert main(common) == 0  # without the option: a quiet day
    assert main([*common, "--stale-log-days", "3"]) == 2
    assert (f"request log {log}: nothing written to it from 2026-11-25 to 2026-11-28 (--stale-log-days 3)"
            in capsys.readouterr().err)
    (log / "date=2026-11-26").mkdir()
    (log / "date=2026-11-26/part-2.jsonl").write_text('{"ts": "2026-11-26T23:00:00+00:00"}\n')
    assert main([*common, "--stale-log-days", "3"]) == 0  # written two days ago: quiet, not stale
    assert main([*common, "--stale-log-days", "1"]) == 2
    # a part of a later day (a backfill's window; a replica whose clock runs ahead) does not make the days up to
    # --until written to: it turned the check off
    (log / "date=2026-11-26/part-2.jsonl").unlink()
    (log / "date=2027-03-01").mkdir()
    (log / "date=2027-03-01/part-3.jsonl").write_text('{"ts": "2027-03-01T00:00:01+00:00"}\n')
    assert main([*common, "--stale-log-days", "3"]) == 2
    with pytest.raises(SystemExit):
        main([*common, "--stale-log-days", "-1"])
    assert "expected a whole number 0 or more, got '-1'" in capsys.readouterr().err


def test_too_few_frames_and_other_model_versions(served, drift_export, tmp_path, tiny_export):
    from sonossl.monitor.drift import drift_report
    from sonossl.monitor.request_log import RequestLog, read_request_log

    log, windows = served
    rows = read_request_log(log)
    other = tmp_path / "log"
    rl = RequestLog(other)
    rl.append([{**r, "model_version": "someoldmodel"} for r in rows.assign(ts=rows.ts.astype(str)).to_dict("records")])
    rl.close()
    with pytest.raises(ValueError, match=r"0 usable frames of model .* \d+ rows of other model versions"):
        drift_report(drift_export, other, tmp_path / "reports")
    since, _, _ = windows["heldout"]
    with pytest.raises(ValueError, match="need at least 30"):
        drift_report(drift_export, log, tmp_path / "reports", since=since, until=since)
    with pytest.raises(FileNotFoundError, match="not a sonossl export"):
        drift_report(tmp_path, log, tmp_path / "reports")
    # the tiny profile's 4 sweeps: too few videos to learn thresholds from
    from sonossl.monitor.drift import DriftParams, load_reference, null_thresholds

    _, ref, held = load_reference(tiny_export)
    with pytest.raises(ValueError, match="too few to learn drift thresholds"):
        null_thresholds(ref, held, ["mean"], ["emb_0"], {"mean": 0.1, "embedding": 0.015}, DriftParams())


def test_drift_reports_to_s3(served, drift_export, s3_server, tmp_path):
    from sonossl.monitor.drift import drift_report
    from sonossl.storage import StorageError

    log, windows = served
    since, until, _ = windows["pocus"]
    prefix = f"s3://{s3_server.bucket}/drift"
    r = drift_report(drift_export, log, prefix, since=since, until=until, window="pocus")
    assert r.drift_detected and r.html == f"{prefix}/pocus/drift.html"
    keys = set(s3_server.objects())
    assert {"drift/index.json", "drift/index.html", "drift/pocus/drift.html", "drift/pocus/summary.json"} <= keys
    since, until, _ = windows["bright"]
    drift_report(drift_export, log, prefix, since=since, until=until, window="bright")
    index = json.loads(s3_server.objects()["drift/index.json"])
    assert [e["window"] for e in index] == ["pocus", "bright"]
    # an index that cannot be read (here: copied in by another tool, without its checksum) stops the report; it
    # is never taken for a first report and overwritten with the one window
    body = s3_server.objects()["drift/index.json"]
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="drift/index.json", Body=body)
    with pytest.raises(StorageError, match="drift/index.json: object has no sha256 metadata"):
        drift_report(drift_export, log, prefix, since=since, until=until, window="bright-again")
    assert s3_server.objects()["drift/index.json"] == body
    assert not [k for k in s3_server.objects() if k.startswith("drift/bright-again/")]  # nothing of it written


def test_thresholds_are_learnt_from_windows_of_held_out_videos_only():
    """Windows of training videos lie closer to the reference than new videos do; the calibration must not draw them.
    Here every held-out video lies 3 reference standard deviations away: so must the learnt 95th percentile."""
    import numpy as np
    import pandas as pd

    from sonossl.monitor.drift import DriftParams, calibration_videos, null_thresholds

    rng = np.random.default_rng(0)

    def table(videos, shift):
        v = np.repeat(videos, 30)
        return pd.DataFrame({"mean": rng.normal(shift, 1.0, len(v)), "emb_0": rng.normal(shift, 1.0, len(v)),
                             "emb_1": rng.normal(0.0, 1.0, len(v)), "video": v})

    reference, heldout = table(np.arange(20), 0.0), table(np.arange(20, 28), 3.0)
    floors = {"mean": 0.1, "embedding": 0.015}
    thresholds, quantiles = null_thresholds(reference, heldout, ["mean"], ["emb_0", "emb_1"], floors, DriftParams())
    assert calibration_videos(heldout) == 4
    assert 2.5 < quantiles["mean"] < 3.5 and thresholds["mean"] == pytest.approx(1.25 * quantiles["mean"])
    assert quantiles["embedding"] > 0.1  # far from the reference, not the ~0 of training-like windows
    with pytest.raises(ValueError, match="3 held-out videos .*need at least 4"):
        null_thresholds(reference, heldout[heldout.video < 23], ["mean"], ["emb_0", "emb_1"], floors, DriftParams())


def test_a_scheduled_report_covers_yesterday_on_the_served_model(served, drift_export, tmp_path, monkeypatch):
    """The monitoring pipeline's step: the last whole UTC days before the run (a daily schedule: yesterday's
    requests, the window named by the date), and with no model_uri the model the InferenceService serves."""
    from datetime import timedelta

    import pandas as pd

    from sonossl.config import ParamsError
    from sonossl.monitor.request_log import RequestLog, read_request_log
    from sonossl.pipeline import steps

    now = datetime(2026, 3, 1, 5, 0, tzinfo=UTC)
    assert steps.report_window(1, now) == (datetime(2026, 2, 28, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC),
                                           "2026-02-28")
    assert steps.report_window(7, now)[2] == "2026-02-22_2026-02-28" and steps.report_window(0, now) == (None,) * 3
    with pytest.raises(ParamsError, match="window_days=-1: must be at least 1, or 0"):
        steps.report_window(-1, now)

    log, windows = served
    rows = read_request_log(log)
    since, until, n = windows["heldout"]
    held = (rows.ts >= pd.Timestamp(since)) & (rows.ts < pd.Timestamp(until))
    run = datetime.now(UTC)
    yesterday = run.replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=1)
    rows.loc[held, "ts"] = yesterday  # the held-out sweeps were served yesterday, the bright ones today
    rows.loc[~held, "ts"] = run
    moved = tmp_path / "log"
    rl = RequestLog(moved)
    rl.append(rows.assign(ts=rows.ts.map(lambda t: t.isoformat())).to_dict("records"))
    rl.close()

    served_now = {"model-uri": str(drift_export)}
    monkeypatch.setattr("sonossl.deploy.served_model", lambda name, namespace: served_now)
    detected, summary = steps.drift_step("", str(moved), tmp_path / "r.html", str(tmp_path / "reports"), now=run)
    assert not detected and summary["frames"] == n and (tmp_path / "r.html").stat().st_size > 100_000
    index = json.loads((tmp_path / "reports/index.json").read_text())
    assert [e["window"] for e in index] == [f"{yesterday:%Y-%m-%d}"]
    served_now = {}
    with pytest.raises(ValueError, match="model_uri is empty and InferenceService sonossl/sonossl names no model"):
        steps.drift_step("", str(moved), tmp_path / "r.html", now=run)



def test_a_window_of_one_video_is_judged_against_single_unchanged_videos(served, drift_export, tmp_path, capsys):
    """The thresholds were made for windows of half the held-out videos whatever the window held: one unchanged scan
    on a quiet day (a late promotion) was DRIFT in every check. The calibration now draws windows of as many videos
    as the window has requests (at most half the held-out ones; --window-videos sets it) and says so. Requests are
    counted by their times, not ids: a client that sends every request with one v2 id made a day one video and
    its thresholds lenient. A damaged line of the log is left out and counted, not a failed report; with too few
    frames in the window it is an error, as the window's rows may be the damaged ones."""
    import shutil

    from sonossl.cli import main
    from sonossl.monitor.drift import DriftParams, drift_report, summary_text
    from sonossl.monitor.request_log import read_request_log

    log, windows = served
    since, until, _ = windows["heldout"]
    rows = read_request_log(log, since, until)
    n = rows.ts.nunique()
    assert n == rows.request_id.nunique()  # the client's ids are unique here
    end_of_first = rows[rows.request_id == rows.request_id.iloc[0]].ts.max() + timedelta(milliseconds=1)
    one = drift_report(drift_export, log, tmp_path / "r", since=since, until=end_of_first, window="one")
    assert one.summary["calibration"]["window_videos"] == one.summary["calibration"]["window_requests"] == 1
    assert ("thresholds from 40 windows of 1 unchanged held-out video(s) (the window's requests: 1; --window-videos "
            "sets the number)") in summary_text(one.summary)
    most = drift_report(drift_export, log, tmp_path / "r", since=since, until=until, window="most",
                        params=DriftParams(window_videos=10_000)).summary["calibration"]["window_videos"]
    whole = drift_report(drift_export, log, tmp_path / "r", since=since, until=until, window="all")
    assert n > 1 and whole.summary["calibration"]["window_requests"] == n
    assert whole.summary["calibration"]["window_videos"] == min(n, most) > 1
    # --window-videos 1 (clients sending a video in many requests set it): the one-video window's thresholds
    assert main(["drift", "--model-dir", str(drift_export), "--log", str(log), "--out", str(tmp_path / "r"),
                 "--since", since.isoformat(), "--until", until.isoformat(), "--window", "w1",
                 "--window-videos", "1"]) in (0, 1)
    w1 = json.loads((tmp_path / "r/w1/summary.json").read_text())
    assert {c: s["threshold"] for c, s in w1["columns"].items()} == {
        c: s["threshold"] for c, s in one.summary["columns"].items()}
    assert w1["embedding"]["threshold"] == one.summary["embedding"]["threshold"]
    capsys.readouterr()

    same_id = tmp_path / "same_id"
    shutil.copytree(log, same_id)
    for part in same_id.rglob("*.jsonl"):
        part.write_text("".join(json.dumps({**json.loads(line), "request_id": "1"}) + "\n"
                                for line in part.read_text().splitlines()))
    again = drift_report(drift_export, same_id, tmp_path / "r", since=since, until=until, window="same")
    assert again.summary["calibration"] == whole.summary["calibration"]
    assert again.summary["columns"] == whole.summary["columns"]

    damaged = tmp_path / "log"
    shutil.copytree(log, damaged)
    part = sorted(damaged.rglob("*.jsonl"))[0]
    part.write_text(part.read_text() + '{"ts":"2026-12-01T00:00:01+00:00","model_ver\n')
    r = drift_report(drift_export, damaged, tmp_path / "r", since=since, until=until, window="damaged")
    assert r.summary["log_damaged"] == 1 and r.summary["frames"] == whole.summary["frames"]
    assert f"1 damaged line(s) or file(s) of the log left out, e.g. {part}: line " in summary_text(r.summary)
    # too few frames beside a damaged line: the window's rows may be the damaged ones, so not "nothing to judge"
    # (exit 3, or 0 on the CronJob) but an error (exit 2)
    late = since - timedelta(seconds=1)
    assert main(["drift", "--model-dir", str(drift_export), "--log", str(damaged), "--out", str(tmp_path / "r"),
                 "--since", (late - timedelta(minutes=1)).isoformat(), "--until", late.isoformat(),
                 "--too-few-exit-code", "0"]) == 2
    assert ("damaged line(s) or file(s) of the log that may hold rows of the window were left out"
            in capsys.readouterr().err)


def test_the_index_page_escapes_what_it_shows():
    """Window names (any text without '/') and model versions reach the index page as text, not as markup."""
    from sonossl.monitor.drift import _index_html

    page = _index_html([{"window": "<img src=x onerror=alert(1)>", "from": "2026-11-27T00:00:00+00:00",
                         "to": "2026-11-28T00:00:00+00:00", "frames": 40, "drift_detected": True,
                         "drifted": ["mean"], "model_version": "a&b\"c"}])
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert 'href="%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E/drift.html"' in page
    assert "<code>a&amp;b&quot;c</code>" in page


def test_a_busy_window_is_scored_on_at_most_max_frames_evenly_spaced(served, drift_export, tmp_path):
    """The embedding check's memory grows with the square of the frames compared: a window is thinned to
    ``max_frames``, evenly spaced in time, and the summary says how many it held and how many were scored."""
    from sonossl.monitor.drift import DriftParams, drift_report

    log, windows = served
    since, until, n = windows["pocus"]
    r = drift_report(drift_export, log, tmp_path / "reports", since=since, until=until, window="thin",
                     params=DriftParams(max_frames=40))
    assert r.summary["frames"] == n > 40 and r.summary["frames_scored"] == 40
    full = drift_report(drift_export, log, tmp_path / "reports", since=since, until=until, window="full")
    assert full.summary["frames_scored"] == n
    assert (r.summary["from"], r.summary["to"]) == (full.summary["from"], full.summary["to"])  # the whole window
    scored = json.loads((tmp_path / "reports/thin/drift.json").read_text())
    assert scored["metrics"] and r.drift_detected  # real lung videos still drift on 40 of their frames


def test_drift_parameters_out_of_range_fail_naming_the_option(drift_export, tmp_path, capsys):
    from sonossl.cli import main
    from sonossl.monitor.drift import DriftParams

    for bad, match in [({"drift_share": 0.0}, r"drift_share \(--drift-share\) = 0.0, must be in \(0, 1\]"),
                       ({"margin": -1.0}, "margin"), ({"quantile": 1.0}, "quantile"), ({"min_frames": 0}, "min_frames"),
                       ({"max_frames": 10},
                        r"max_frames .* must be >= min_frames \(--min-frames\) = 30: raise the one")]:
        with pytest.raises(ValueError, match=match):
            DriftParams(**bad)
    code = main(["drift", "--model-dir", str(drift_export), "--log", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--drift-share", "0"])
    assert code == 2 and "--drift-share" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_window_of_only_another_models_traffic_is_too_few_frames_whatever_its_columns(served, drift_export,
                                                                                         tmp_path, capsys):
    """The day a model with a larger embedding is promoted late: the window holds only the old model's rows, which
    lack the new model's embedding columns. That is nothing to judge (exit 3), not an error (exit 2)."""
    from sonossl.cli import main
    from sonossl.monitor.drift import TooFewFrames, drift_report
    from sonossl.monitor.request_log import RequestLog, read_request_log

    log, _ = served
    rows = read_request_log(log)
    old = rows.drop(columns=[c for c in rows.columns if c.startswith("emb_") and c != "emb_0"])
    rl = RequestLog(tmp_path / "log")
    rl.append([{**r, "model_version": "oldmodel"} for r in old.assign(ts=old.ts.astype(str)).to_dict("records")])
    rl.close()
    with pytest.raises(TooFewFrames, match=r"0 usable frames of model \w+ .* \d+ rows of other model versions, "
                                           r"none of this one"):
        drift_report(drift_export, tmp_path / "log", tmp_path / "reports")
    assert main(["drift", "--model-dir", str(drift_export), "--log", str(tmp_path / "log"), "--out",
                 str(tmp_path / "reports")]) == 3
    assert "too few frames to judge" in capsys.readouterr().err
    # this model's own rows without its embedding columns are still an error that names them
    ours = rows.drop(columns=["emb_1"])
    rl = RequestLog(tmp_path / "log2")
    rl.append(ours.assign(ts=ours.ts.astype(str)).to_dict("records"))
    rl.close()
    with pytest.raises(ValueError, match=r"the rows of model \w+ lack the columns \['emb_1'\]"):
        drift_report(drift_export, tmp_path / "log2", tmp_path / "reports")


def test_a_damaged_index_stops_the_report_before_it_writes_anything(served, drift_export, tmp_path):
    from sonossl.monitor.drift import drift_report

    log, windows = served
    since, until, _ = windows["heldout"]
    (tmp_path / "reports").mkdir()
    for body in ("", '{"window": "a"}', '[{"window": "a"}]'):  # unreadable, not a list, rows lacking fields
        (tmp_path / "reports/index.json").write_text(body)
        with pytest.raises(ValueError, match=r"reports/index.json: not a (readable )?drift report index"):
            drift_report(drift_export, log, tmp_path / "reports", since=since, until=until, window="w")
        assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [".index.lock", "index.json"]


def test_frame_sizes_seen_in_training_are_every_training_videos(drift_export):
    """The card lists every training video's size, which the drift check counts as seen even where no sampled
    reference frame came from that video."""
    from sonossl.data.clips import load_clip_dataset

    card = json.loads((drift_export / "model_card.json").read_text())
    clips = load_clip_dataset(drift_export.parent / "clips")
    train = set(clips.index.video_idx[clips.index.split == "train"])
    expected = {f"{v['width']}x{v['height']}" for v in clips.meta["videos"] if v["video_idx"] in train}
    assert card["reference"]["frame_sizes"] == sorted(expected) and expected


def test_a_frame_size_of_any_training_video_counts_as_seen(served, drift_export, tmp_path):
    """The sizes the card lists are the training videos' (not only the sampled reference frames'): a window at a
    size the card lists is not "unseen", the same window against a card without it is."""
    import shutil

    from sonossl.monitor.drift import drift_report
    from sonossl.monitor.request_log import RequestLog, read_request_log

    log, windows = served
    since, until, _ = windows["heldout"]
    rows = read_request_log(log, since, until).assign(height=999, width=777)  # a size no reference frame has
    rl = RequestLog(tmp_path / "log")
    rl.append(rows.assign(ts=rows.ts.astype(str)).to_dict("records"))
    rl.close()
    unseen = drift_report(drift_export, tmp_path / "log", tmp_path / "r1").summary["frame_size"]
    assert unseen["unseen_share"] == 1.0 and unseen["drift"]
    listed = tmp_path / "export"
    shutil.copytree(drift_export, listed)
    card = json.loads((listed / "model_card.json").read_text())
    card["reference"]["frame_sizes"].append("777x999")
    (listed / "model_card.json").write_text(json.dumps(card))
    seen = drift_report(listed, tmp_path / "log", tmp_path / "r2").summary["frame_size"]
    assert seen["unseen_share"] == 0.0 and not seen["drift"] and "777x999" in seen["reference"]


def _row(window: str) -> dict:
    return {"window": window, "from": f"2026-11-{window[-2:]}T00:00:00+00:00", "to": "-", "frames": 50,
            "drift_detected": False, "drifted": [], "model_version": "abc"}


def test_reports_written_at_once_each_keep_their_row_in_the_s3_index(s3_server):
    """A backfill beside the daily CronJob: each report reads the index, adds its row and writes it back. The
    index is replaced only over the version read, so a report that read before another wrote adds its row to the
    other's instead of dropping it; and the page ends up listing what the index lists."""
    import threading

    from sonossl.monitor.drift import _s3_index, _s3_update_index

    prefix = f"s3://{s3_server.bucket}/drift"
    stale, etag = _s3_index(prefix)  # read before the report below wrote
    assert (stale, etag) == ([], None)
    _s3_update_index(prefix, "w01", _row("w01"), *_s3_index(prefix))
    _s3_update_index(prefix, "w02", _row("w02"), stale, etag)
    assert [e["window"] for e in json.loads(s3_server.objects()["drift/index.json"])] == ["w01", "w02"]

    stale, etag = _s3_index(prefix)  # eight reports at once, each from the same read
    threads = [threading.Thread(target=_s3_update_index, args=(prefix, f"w{i:02d}", _row(f"w{i:02d}"), stale, etag))
               for i in range(3, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index = json.loads(s3_server.objects()["drift/index.json"])
    assert sorted(e["window"] for e in index) == [f"w{i:02d}" for i in range(1, 11)]
    page = s3_server.objects()["drift/index.html"].decode()
    assert all(f">w{i:02d}</a>" in page for i in range(1, 11))


class _Snapshot:  # what _write_outputs asks of Evidently's snapshot: its two files
    def save_html(self, path: str) -> None:
        Path(path).write_text("<html></html>")

    def save_json(self, path: str) -> None:
        Path(path).write_text("{}")


def test_a_local_index_is_updated_by_one_report_at_a_time(tmp_path):
    """On disk the index is read, merged and written under an exclusive lock: a report waits while another holds it,
    then adds its row to what that one wrote."""
    import fcntl
    import threading

    from sonossl.monitor.drift import _write_outputs

    out = tmp_path / "reports"
    _write_outputs(out, "w01", _Snapshot(), _row("w01"))
    with open(out / ".index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another report is writing
        waiting = threading.Thread(target=_write_outputs, args=(out, "w02", _Snapshot(), _row("w02")))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not (out / "w02").exists()
        index = json.loads((out / "index.json").read_text())
        index.append(_row("w03"))  # what that other report wrote meanwhile
        (out / "index.json").write_text(json.dumps(index))
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiting.join(10)
    assert [e["window"] for e in json.loads((out / "index.json").read_text())] == ["w01", "w03", "w02"]
    assert (out / "w02/summary.json").is_file() and ">w03</a>" in (out / "index.html").read_text()
