"""Drift monitoring, shown on the default model: serve traffic from four sources, then one drift report per window.

Starts ``python -m sonossl.serve`` on 127.0.0.1 with a request log, sends, one after another:
1. ``heldout``: sweeps of the independent test set ``data/raw/sim_test`` (other fetuses; never trained on, and not
   among the held-out videos that drift thresholds are learnt from): expect no drift;
2. ``fresh``:   new sweeps from the training simulator (another seed): expect no drift;
3. ``bright``:  new sweeps from the same simulator with the scanner gain 6 dB higher: expect drift;
4. ``pocus``:   real lung POCUS videos (``../shared/data/pocus``): expect drift;
and runs ``sonossl.monitor.drift.drift_report`` on each time window. Writes ``benchmarks/results/drift_cases.json``
and the reports under ``reports/drift-demo/`` (index.html lists the windows).

    python benchmarks/drift_cases.py [--model-dir models/export] [--videos 10]

``tests/test_benchmarks.py`` runs it on a tiny model (``--profile tiny``, ``--pocus``, ``--record``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from sonossl.atomic import atomic_write_text
from sonossl.machine import describe

REPO = Path(__file__).resolve().parents[1]
POCUS = REPO.parent / "shared" / "data" / "pocus"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=REPO / "models/export")
    ap.add_argument("--test-raw", type=Path, default=REPO / "data/raw/sim_test",
                    help="the heldout window's sweeps: a raw dataset the export never saw")
    ap.add_argument("--videos", type=int, default=10, help="videos per window")
    ap.add_argument("--gain-db", type=float, default=6.0)
    ap.add_argument("--profile", default=None,
                    help="params.yaml profile of the fresh and bright windows' simulator (default: its active one)")
    ap.add_argument("--pocus", type=Path, default=POCUS, help="the pocus window's raw dataset (labels.csv + videos)")
    ap.add_argument("--out", type=Path, default=REPO / "reports/drift-demo", help="the reports' folder")
    ap.add_argument("--record", type=Path, default=REPO / "benchmarks/results/drift_cases.json",
                    help="the figures' JSON file")
    ap.add_argument("--port", type=int, default=18181)
    args = ap.parse_args(argv)
    if args.videos < 1:
        ap.error("--videos: at least 1")
    for raw in (args.test_raw, args.pocus):
        if not (raw / "labels.csv").is_file():
            ap.error(f"{raw}: no labels.csv (a raw dataset: labels.csv and its videos)")

    from sonossl.config import load_params
    from sonossl.data.simulate import simulate
    from sonossl.monitor.drift import drift_report, summary_text
    from sonossl.serve.client import Client

    params = load_params(REPO / "params.yaml", args.profile).simulate
    test_paths = sorted(pd.read_csv(args.test_raw / "labels.csv").path)
    with tempfile.TemporaryDirectory(prefix="sonossl-drift-demo-") as tmp:
        tmp = Path(tmp)
        fresh = dataclasses.replace(params, videos=args.videos, seed=params.seed + 101)
        simulate(tmp / "fresh", fresh, progress=False)
        simulate(tmp / "bright", dataclasses.replace(fresh, seed=params.seed + 202, gain_db=args.gain_db),
                 progress=False)
        pocus = pd.read_csv(args.pocus / "labels.csv")
        pocus = pocus.sort_values("path").groupby("label").head(max(1, args.videos // 3 + 1))
        sources = {
            "heldout": [args.test_raw / p for p in test_paths[: args.videos]],
            "fresh": sorted((tmp / "fresh/videos").glob("*.mp4")),
            "bright": sorted((tmp / "bright/videos").glob("*.mp4")),
            "pocus": [args.pocus / p for p in pocus.path],
        }
        log_dir = tmp / "requests"
        server = subprocess.Popen([sys.executable, "-m", "sonossl.serve", "--model-dir", str(args.model_dir),
                                   "--http-port", str(args.port), "--host", "127.0.0.1", "--request-log",
                                   str(log_dir), "--log-flush-seconds", "1", "--max-frames", "4000",
                                   "--max-body-mb", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        windows = {}
        try:
            client = Client(f"http://127.0.0.1:{args.port}", timeout=600)
            client.wait_ready(timeout=120, process=server)
            for name, paths in sources.items():
                since = datetime.now(UTC)
                frames = sum(client.infer_video(p)["probs"].shape[0] for p in paths)
                time.sleep(0.01)
                windows[name] = (since, datetime.now(UTC), len(paths), frames)
                print(f"{name}: {len(paths)} videos, {frames} frames served", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
        results = {}
        for name, (since, until, videos, frames) in windows.items():
            r = drift_report(args.model_dir, log_dir, args.out, since=since, until=until, window=name)
            print(summary_text(r.summary), flush=True)
            results[name] = {"videos": videos, "frames_served": frames, **{k: r.summary[k] for k in (
                "drift_detected", "drifted", "frames", "frames_blank", "columns", "embedding", "frame_size")}}
    out = args.record
    atomic_write_text(out, json.dumps({"model_version": json.loads((args.model_dir / "model_card.json").read_text())[
        "model_version"], "gain_db": args.gain_db, "windows": results, "machine": describe()}, indent=2) + "\n")
    print(f"wrote {out}; reports: {args.out}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
