"""Drift reports: what the endpoint saw (the request log) against the reference exported with the model.

An Evidently 0.7 report compares, per frame, the image statistics (``sonossl.monitor.image_stats``: mean grey level,
contrast, speckle SNR, sector coverage) with ``ValueDrift`` (normed Wasserstein distance) and the PCA-reduced
embeddings with ``EmbeddingsDrift`` (maximum mean discrepancy, RBF kernel at the median distance: scale-free). Each
score becomes a pass/fail test against its threshold.

Thresholds come from the model's own data, video by video. Frames of one video are alike, so a window holding a
handful of new videos lies further from the reference than per-frame statistics expect, even when nothing changed; a
fixed textbook threshold then cries drift at every report. So each report first draws ``null_draws`` windows of
whole held-out videos (the export's validation and test videos, which the model never trained on; half of them per
window), scores each against the reference exactly as the current window will be scored, and sets every threshold to
``margin`` times the ``quantile`` of those scores (never below Evidently's defaults: 0.1 for the statistics, 0.015
for the embeddings). Only unseen videos are drawn: windows of training videos lie closer to the reference, whose
encoder has fitted them (median embedding MMD 0.057 against 0.086 for unseen videos, five-video windows of the
default model), and thresholds learnt from them gave new videos from the training source false alarms. The
thresholds are set for windows of about that many videos: a window of many more is judged more leniently, one of a
single video more strictly. Drift is declared when at least ``drift_share`` of the statistics drift, or the
embeddings drift, or that share of frames comes at a frame size the training data never had.

Only rows of the model version being checked are compared (embeddings of another model are another space); blank
frames are left out, as training leaves them out. Reports are kept per time window: ``<out>/<window>/drift.html``
and ``drift.json`` (Evidently's), ``summary.json`` (ours), and an index (``index.html``, ``index.json``) listing every
window with its verdict and model version. ``out`` may be an ``s3://`` prefix.

    result = drift_report("models/export", "logs/requests", "reports/drift")
    result.drift_detected, result.summary["columns"]["mean"]
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from sonossl.monitor.image_stats import STAT_COLUMNS
from sonossl.monitor.request_log import is_s3

log = logging.getLogger(__name__)

EVIDENTLY_WASSERSTEIN = 0.1  # Evidently's default thresholds: the floors of ours
EVIDENTLY_MMD = 0.015


@dataclass(frozen=True)
class DriftParams:
    margin: float = 1.25  # threshold = margin x the quantile of scores of windows of unchanged videos
    quantile: float = 0.95
    null_draws: int = 40  # windows drawn to learn those scores
    drift_share: float = 0.5  # share of drifted statistics (or of frames at an unseen size) that is drift
    min_frames: int = 30  # fewer current frames than this is not enough to judge
    # At most this many of the window's frames are scored, evenly spaced in time: the embeddings' MMD holds an
    # (reference + window)^2 kernel in float64; against 2,000 reference frames, 5,000 window frames took 387 MiB
    # more peak memory and 10,000 took 1,113 MiB (MMDDriftMethod alone), so a busy day ran out of memory unbounded.
    max_frames: int = 5000
    # Videos per calibration window: 0 takes the window's requests (a video sent whole is one request; in parts,
    # each part is one; counted by their times, as every row of a request has its time, whatever id the client
    # gave), at most half the held-out videos; the thresholds are then made for windows of that many videos, so
    # that a window of one scan is judged against single unchanged videos, not against ten at once.
    window_videos: int = 0
    seed: int = 0
    columns: tuple[str, ...] = STAT_COLUMNS

    def __post_init__(self) -> None:
        checks = {"margin": self.margin > 0, "quantile": 0 < self.quantile < 1, "null_draws": self.null_draws >= 1,
                  "drift_share": 0 < self.drift_share <= 1, "min_frames": self.min_frames >= 1,
                  "max_frames": self.max_frames >= self.min_frames, "window_videos": self.window_videos >= 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            rules = {"margin": "> 0", "quantile": "in (0, 1)", "null_draws": ">= 1", "drift_share": "in (0, 1]",
                     "min_frames": ">= 1", "window_videos": ">= 0 (0: the window's requests)",
                     "max_frames": f">= min_frames (--min-frames) = {self.min_frames}: raise the one or lower "
                                   "the other"}
            raise ValueError("drift parameters out of range: " + "; ".join(
                f"{name} (--{name.replace('_', '-')}) = {getattr(self, name)!r}, must be {rules[name]}"
                for name in bad))


@dataclass
class DriftResult:
    drift_detected: bool
    summary: dict[str, Any]
    html: Path | str
    json: Path | str
    out: Path | str = field(default="")


def _local_model_dir(model_dir: str | Path, tmp: Path) -> Path:
    if is_s3(model_dir):
        from sonossl.storage import download

        return Path(download(str(model_dir).rstrip("/") + "/", tmp / "model"))
    return Path(model_dir)


def load_reference(model_dir: str | Path):
    """(model card, reference frame table, held-out frame table) of an export folder; tables hold the image
    statistics and ``emb_*`` columns."""
    import pandas as pd

    model_dir = Path(model_dir)
    ref_dir = model_dir / "reference"
    needed = [model_dir / "model_card.json", ref_dir / "embeddings.npy", ref_dir / "image_stats.parquet",
              ref_dir / "videos.npy", ref_dir / "heldout_embeddings.npy", ref_dir / "heldout_image_stats.parquet",
              ref_dir / "heldout_videos.npy"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: not a sonossl export with reference statistics (missing: "
                                f"{', '.join(missing)}); run `sonossl export` (or `dvc repro export`)")
    card = json.loads(needed[0].read_text())

    def table(emb_file: Path, stats_file: Path, videos_file: Path) -> pd.DataFrame:
        t = pd.read_parquet(stats_file)
        emb = np.load(emb_file)
        for j in range(emb.shape[1]):
            t[f"emb_{j}"] = emb[:, j]
        t["video"] = np.load(videos_file)
        return t

    return card, table(*needed[1:4]), table(*needed[4:7])


def calibration_videos(heldout, window_videos: int = 0) -> int:
    """Videos per drawn window: ``window_videos`` (the videos of the window being judged; 0: as many as allowed), at
    most half of the held-out videos, so that windows differ from one draw to the next."""
    most = int(heldout.video.nunique()) // 2
    return min(window_videos, most) if window_videos > 0 else most


def window_requests(current) -> int:
    """The requests that ``current``'s rows came from: the server gives every row of a request that request's time
    (``ts``), so distinct times count them; request ids would not, as a client may send every request with the same
    v2 ``id`` (or none)."""
    return int(current.ts.nunique())


def null_thresholds(reference, heldout, columns: list[str], emb_cols: list[str], floors: dict[str, float],
                    params: DriftParams, videos_per_window: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """(thresholds, quantiles): scores of windows of ``videos_per_window`` whole held-out videos (never trained on;
    see ``calibration_videos``) against the reference, computed as Evidently computes them (normed Wasserstein: the
    distance over the reference's standard deviation; MMD: Evidently's own ``MMDDriftMethod``)."""
    from evidently.metrics.embeddings import MMDDriftMethod
    from scipy.stats import wasserstein_distance

    videos = np.unique(heldout.video.to_numpy())
    if calibration_videos(heldout) < 2:
        raise ValueError(f"the export holds frames of {len(videos)} held-out videos (validation and test): too few to "
                         "learn drift thresholds from windows of unseen videos (need at least 4; train on more "
                         "videos)")
    rng = np.random.default_rng(params.seed)
    scores: dict[str, list[float]] = {k_: [] for k_ in [*columns, "embedding"]}
    norms = {c: max(float(np.std(reference[c])), 0.001) for c in columns}
    mmd = MMDDriftMethod()
    k = calibration_videos(heldout, videos_per_window)
    for _ in range(params.null_draws):
        cur = heldout[heldout.video.isin(rng.choice(videos, size=k, replace=False))]
        for c in columns:
            scores[c].append(float(wasserstein_distance(reference[c], cur[c])) / norms[c])
        scores["embedding"].append(float(mmd(cur[emb_cols], reference[emb_cols])[0]))
    quantiles = {c: float(np.quantile(v, params.quantile)) for c, v in scores.items()}
    return {c: max(floors[c], params.margin * q) for c, q in quantiles.items()}, quantiles


def _evidently_scores(reference, current, columns: list[str], emb_cols: list[str], thresholds: dict[str, float]):
    """Run the Evidently report; returns (snapshot, {column or 'embedding': score})."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import MMDDriftMethod
    from evidently.tests import lt

    definition = DataDefinition(numerical_columns=columns + emb_cols, embeddings={"embedding": emb_cols})
    metrics = [ValueDrift(column=c, method="wasserstein", threshold=thresholds[c]) for c in columns]
    metrics.append(EmbeddingsDrift(embeddings_name="embedding",
                                   drift_method=MMDDriftMethod(threshold=thresholds["embedding"]),
                                   tests=[lt(thresholds["embedding"])]))
    snap = Report(metrics, include_tests=True).run(
        current_data=Dataset.from_pandas(current[columns + emb_cols].reset_index(drop=True), data_definition=definition),
        reference_data=Dataset.from_pandas(reference[columns + emb_cols], data_definition=definition))
    scores = {}
    for m in snap.dict()["metrics"]:
        name = m["metric_name"]
        for c in columns:
            if name.startswith(f"ValueDrift(column={c},"):
                scores[c] = float(m["value"])
        if name.startswith("EmbeddingsDrift("):
            scores["embedding"] = float(m["value"])
    return snap, scores


def _window_name(current, window: str | None) -> str:
    if window:
        if "/" in window or window.startswith("."):
            raise ValueError(f"window name {window!r} must be a plain name (no '/', not starting with '.')")
        return window
    first, last = current.ts.min(), current.ts.max()
    return f"{first:%Y%m%dT%H%M%S}_{last:%Y%m%dT%H%M%S}"


def _index_html(entries: list[dict[str, Any]]) -> str:
    def esc(value: Any) -> str:  # window names and model versions come from the command line and the log
        return html.escape(str(value), quote=True)

    rows = "\n".join(
        f"<tr class=\"{'drift' if e['drift_detected'] else 'ok'}\"><td>"
        f"<a href=\"{esc(urllib.parse.quote(e['window']))}/drift.html\">{esc(e['window'])}</a></td>"
        f"<td>{esc(e['from'])}</td><td>{esc(e['to'])}</td><td>{esc(e['frames'])}</td>"
        f"<td>{'DRIFT' if e['drift_detected'] else 'no drift'}</td><td>{esc(', '.join(e['drifted']) or '-')}</td>"
        f"<td><code>{esc(e['model_version'])}</code></td></tr>"
        for e in sorted(entries, key=lambda e: e["from"], reverse=True))
    return ("<!doctype html><meta charset=utf-8><title>sonossl drift reports</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 10px;text-align:left}"
            "tr.drift{background:#fdd}tr.ok{background:#dfd}</style>"
            "<h1>sonossl drift reports</h1><p>One row per time window, newest first; open a window for Evidently's "
            "report.</p><table><tr><th>window</th><th>from</th><th>to</th><th>frames</th><th>verdict</th>"
            f"<th>over threshold</th><th>model version</th></tr>\n{rows}\n</table>\n"
            "<p>Over threshold: the checks whose score passed their threshold; drift needs the embeddings, or a "
            "share of the statistics (or of the frames at an unseen size) of at least the report's drift_share.</p>\n")


INDEX_KEYS = ("window", "from", "to", "frames", "drift_detected", "drifted", "model_version")  # one index row


def _index_entries(data: bytes, where: str | Path) -> list[dict[str, Any]]:
    """The rows of an existing ``index.json``, checked: a damaged index fails naming itself, before anything of
    the new report is written."""
    try:
        entries = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{where}: not a readable drift report index ({e}); move it aside (the reports' "
                         "folders keep their summary.json) and run again") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and set(INDEX_KEYS) <= set(e) for e in entries):
        raise ValueError(f"{where}: not a drift report index (expected a JSON list of windows, each with "
                         f"{list(INDEX_KEYS)}); move it aside and run again")
    return entries


INDEX_ATTEMPTS = 10  # tries at replacing the S3 index while other reports replace it too


def _merged(entries: list[dict[str, Any]], window: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in entries if e["window"] != window] + [row]


def _s3_index(prefix: str) -> tuple[list[dict[str, Any]], str | None]:
    """The S3 index's rows, checked, and its ETag (None: no index yet, the first report)."""
    from sonossl.storage import StorageNotFound, get_bytes_etag

    try:
        data, etag = get_bytes_etag(f"{prefix}/index.json")
    except StorageNotFound:  # the first report; any other failure must not wipe the index
        return [], None
    return _index_entries(data, f"{prefix}/index.json"), etag


def _s3_update_index(prefix: str, window: str, row: dict[str, Any], entries: list[dict[str, Any]],
                     etag: str | None) -> list[dict[str, Any]]:
    """Add ``row`` to the S3 index read as ``entries`` at ``etag``, and render its page; returns the rows written.

    Reports may run at once (a backfill beside the daily CronJob), each reading the index, adding its row and
    writing it back: unguarded, the later write drops the earlier report's row. So the index is replaced only if it
    is still the version read (a conditional write); a report that lost reads it again and adds its row to the
    other's. The page is rendered from the index this report wrote, then checked against the index as it is now: a
    report that wrote a newer index may have written its page before this one, so an older page never stays last.
    """
    import random
    import time

    from sonossl.storage import StorageConflict, StorageError, put_bytes, put_bytes_if

    uri = f"{prefix}/index.json"
    for attempt in range(1, INDEX_ATTEMPTS + 1):
        entries = _merged(entries, window, row)
        try:
            etag = put_bytes_if((json.dumps(entries, indent=2) + "\n").encode(), uri, etag)
            break
        except StorageConflict:
            if attempt == INDEX_ATTEMPTS:
                raise StorageError(f"{uri}: other reports replaced the index {attempt} times while this one tried "
                                   f"to add window {window!r}; its report {prefix}/{window}/ is whole: run it again "
                                   "to list it") from None
            log.info("%s: another report replaced the index; reading it again (attempt %d of %d)", uri, attempt,
                     INDEX_ATTEMPTS)
            time.sleep(random.uniform(0.05, 0.2) * attempt)
            entries, etag = _s3_index(prefix)
    written = entries
    for _ in range(INDEX_ATTEMPTS):
        put_bytes(_index_html(entries).encode(), f"{prefix}/index.html")
        now, now_etag = _s3_index(prefix)
        if now_etag == etag:
            return written
        entries, etag = now, now_etag
    log.warning("%s/index.html: the index kept changing while its page was written; the next report renders it "
                "again", prefix)
    return written


@contextlib.contextmanager
def _index_lock(out: Path) -> Iterator[None]:
    """One report at a time updates a local folder's index (an exclusive ``flock`` on ``<out>/.index.lock``)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".index.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_outputs(out: str | Path, window: str, snap, summary: dict[str, Any]) -> tuple[str, str]:
    """Window folder + updated index, atomically on disk or object by object on S3. The index is read and checked
    before anything is written (a report whose index cannot be read writes nothing), and updated so that reports
    running at once each keep their row: under a lock on disk, by conditional writes on S3."""
    from sonossl.atomic import atomic_write_text

    row = {k: summary[k] for k in INDEX_KEYS}
    with tempfile.TemporaryDirectory(prefix="sonossl-drift-") as tmp:
        stage = Path(tmp)
        snap.save_html(str(stage / "drift.html"))
        snap.save_json(str(stage / "drift.json"))
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if is_s3(out):
            from sonossl.storage import upload

            prefix = str(out).rstrip("/")
            entries, etag = _s3_index(prefix)
            upload(stage, f"{prefix}/{window}/")
            _s3_update_index(prefix, window, row, entries, etag)
            return f"{prefix}/{window}/drift.html", f"{prefix}/{window}/drift.json"
        out = Path(out)
        index, target = out / "index.json", out / window
        with _index_lock(out):
            entries = _merged(_index_entries(index.read_bytes(), index) if index.is_file() else [], window, row)
            target.mkdir(parents=True, exist_ok=True)
            for name in ("drift.html", "drift.json", "summary.json"):
                atomic_write_text(target / name, (stage / name).read_text())
            atomic_write_text(index, json.dumps(entries, indent=2) + "\n")
            atomic_write_text(out / "index.html", _index_html(entries))
        return str(target / "drift.html"), str(target / "drift.json")


class TooFewFrames(ValueError):
    """The window holds too few usable frames of the model to judge drift: no report (``sonossl drift`` exits 3 by
    default, ``--too-few-exit-code``). A day without traffic, or one that served another model until a late
    promotion, is not an error."""


def drift_report(model_dir: str | Path, log: str | Path, out_dir: str | Path, *, params: DriftParams | None = None,
                 since: datetime | None = None, until: datetime | None = None,
                 window: str | None = None) -> DriftResult:
    """Compare the request log (folder or ``s3://`` prefix) in [since, until) with the model's reference."""
    from sonossl.monitor.request_log import read_request_log

    params = params or DriftParams()
    with tempfile.TemporaryDirectory(prefix="sonossl-model-") as tmp:
        card, reference, heldout = load_reference(_local_model_dir(model_dir, Path(tmp)))
    version = card["model_version"]
    skipped: list[str] = []  # damaged lines of the log that may hold rows of the window: left out, counted
    rows = read_request_log(log, since, until, skipped=skipped)

    def too_few(message: str) -> Exception:
        """Too few frames is an answer (exit 3, or 0 on a schedule) only when no damaged line may have held the
        window's rows; otherwise it cannot be told from a day whose rows are all unreadable: an error."""
        if not skipped:
            return TooFewFrames(message)
        return ValueError(f"{message}, and {len(skipped)} damaged line(s) or file(s) of the log that may hold rows of "
                          f"the window were left out, e.g. {skipped[0]}: repair or move aside the damaged part(s)")

    if rows.empty:
        raise too_few(f"request log {log}: no rows in the window (need at least {params.min_frames} usable frames of "
                      f"model {version})")
    columns = list(params.columns)
    emb_cols = [c for c in reference.columns if c.startswith("emb_")]
    if "model_version" not in rows.columns:
        raise ValueError(f"request log {log}: rows lack the column 'model_version'; is it a sonossl request log?")
    other = rows[rows.model_version != version]
    ours = rows[rows.model_version == version]  # another model's rows may have other columns (embedding size)
    if ours.empty:
        raise too_few(f"request log {log}: 0 usable frames of model {version} in the window (need at least "
                      f"{params.min_frames}; {len(other)} rows of other model versions, none of this one)")
    missing = [c for c in columns + emb_cols + ["blank", "height", "width"] if c not in ours.columns
               or ours[c].isna().all()]
    if missing:
        raise ValueError(f"request log {log}: the rows of model {version} lack the columns {missing}; is it a log "
                         "of this model?")
    blank = ours.blank.astype(bool)
    usable = ours[~blank]
    if len(usable) < params.min_frames:
        raise too_few(f"request log {log}: {len(usable)} usable frames of model {version} in the window (need at "
                      f"least {params.min_frames}; {len(other)} rows of other model versions, {int(blank.sum())} "
                      "blank frames left out)")
    current = usable.iloc[np.linspace(  # read_request_log sorts the rows by time
        0, len(usable) - 1, min(params.max_frames, len(usable))).astype(int)]
    if len(current) < len(usable):
        logging.getLogger(__name__).info(  # `log` here is the request log's location
            "drift: %d usable frames in the window; scoring %d of them, evenly spaced in time (max_frames)",
            len(usable), len(current))

    floors = {**{c: EVIDENTLY_WASSERSTEIN for c in columns}, "embedding": EVIDENTLY_MMD}
    requests = window_requests(usable)
    n_videos = params.window_videos or requests  # the window's videos, for the calibration
    thresholds, baseline = null_thresholds(reference, heldout, columns, emb_cols, floors, params, n_videos)
    snap, scores = _evidently_scores(reference, current, columns, emb_cols, thresholds)

    seen_sizes = set(map(tuple, reference[["height", "width"]].astype(int).to_numpy()))
    for size in card.get("reference", {}).get("frame_sizes", []):  # every training video's (where the card lists them)
        w, h = map(int, size.split("x"))
        seen_sizes.add((h, w))
    sizes = current[["height", "width"]].astype(int).apply(tuple, axis=1)
    unseen_share = float((~sizes.isin(seen_sizes)).mean())
    col_drift = {c: scores[c] >= thresholds[c] for c in columns}
    share = sum(col_drift.values()) / len(columns)
    emb_drift = scores["embedding"] >= thresholds["embedding"]
    size_drift = unseen_share >= params.drift_share
    detected = share >= params.drift_share or emb_drift or size_drift
    name = _window_name(usable, window)
    summary = {
        "window": name, "from": str(usable.ts.min()), "to": str(usable.ts.max()),
        "model_version": version, "feature_version": card["data"]["feature_version"],
        "frames": int(len(usable)), "frames_scored": int(len(current)), "frames_other_versions": int(len(other)),
        "frames_blank": int(blank.sum()),
        # lines or files of the log that could not be read (not JSON, a bad time, not UTF-8): left out, the first named
        "log_damaged": len(skipped), "log_damaged_first": skipped[:5],
        "reference_frames": int(len(reference)), "heldout_frames": int(len(heldout)),
        "calibration": {"window_videos": calibration_videos(heldout, n_videos), "draws": params.null_draws,
                        "window_requests": requests,
                        "quantile": params.quantile, "margin": params.margin},
        "drift_detected": bool(detected),
        "drifted": [c for c in columns if col_drift[c]] + (["embedding"] if emb_drift else [])
        + (["frame_size"] if size_drift else []),
        "columns": {c: {"score": round(scores[c], 4), "threshold": round(thresholds[c], 4),
                        "baseline": round(baseline[c], 4), "drift": bool(col_drift[c])} for c in columns},
        "embedding": {"score": round(scores["embedding"], 4), "threshold": round(thresholds["embedding"], 4),
                      "baseline": round(baseline["embedding"], 4), "drift": bool(emb_drift)},
        "frame_size": {"unseen_share": round(unseen_share, 4), "reference": sorted(f"{w}x{h}" for h, w in seen_sizes),
                       "current": sorted({f"{w}x{h}" for h, w in sizes}), "drift": bool(size_drift)},
        "drifted_share": round(share, 4), "params": asdict(params),
        "method": "normed Wasserstein distance per statistic; MMD of the embeddings; thresholds = margin x the "
                  "quantile of the scores of windows of held-out videos from the training source (at least 0.1 "
                  "and 0.015, Evidently's defaults)",
    }
    page, js = _write_outputs(out_dir, name, snap, summary)
    return DriftResult(drift_detected=bool(detected), summary=summary, html=page, json=js, out=str(out_dir))


def summary_text(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: the verdict and every score against its threshold (a check over its threshold
    in a window without drift is marked as such, not as drift)."""
    over = summary["drifted"]
    verdict = ("DRIFT in " + ", ".join(over) if summary["drift_detected"] else
               "no drift" + (f" (over threshold: {', '.join(over)}; not enough for drift)" if over else ""))
    lines = [f"drift report {summary['window']} (model {summary['model_version']}, {summary['frames']} frames): "
             + verdict]
    mark = "  DRIFT" if summary["drift_detected"] else "  over threshold"
    for name, s in [*summary["columns"].items(), ("embedding", summary["embedding"])]:
        lines.append(f"  {name:<12} {s['score']:8.3f}  threshold {s['threshold']:7.3f}  (unchanged videos: "
                     f"{s['baseline']:.3f})"
                     + (mark if s["drift"] else ""))
    fs = summary["frame_size"]
    share = summary["params"]["drift_share"]  # the share of frames at unseen sizes that is drift
    lines.append(f"  frame size   {fs['unseen_share']:8.3f}  threshold {share:7.3f}  (share of frames at a size the "
                 f"training data never had; window: {', '.join(fs['current'])}; training: "
                 f"{', '.join(fs['reference'])})" + (mark if fs["drift"] else ""))
    cal = summary.get("calibration", {})
    if cal.get("window_videos"):
        lines.append(f"  thresholds from {cal['draws']} windows of {cal['window_videos']} unchanged held-out video(s)"
                     f" (the window's requests: {cal.get('window_requests')}; --window-videos sets the number)")
    if summary.get("log_damaged"):
        lines.append(f"  {summary['log_damaged']} damaged line(s) or file(s) of the log left out, e.g. "
                     f"{summary['log_damaged_first'][0]}")
    return "\n".join(lines)
