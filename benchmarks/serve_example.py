"""The README's serving example, measured: one held-out sweep through the real server, sent as the README's curl
command sends it.

Starts ``python -m sonossl.serve`` on 127.0.0.1 with the exported model, posts the sweep's mp4 as a v2 ``BYTES``
input (base64 in JSON, the body of ``curl -d @req.json``) ``--requests`` times, and records the median latency,
the response (abridged: the first values of each output), and how the model's labels compare with the
simulator's per-frame labels (from the raw dataset's annotations). Writes ``benchmarks/results/serve_example.json``.

    python benchmarks/serve_example.py [--model-dir models/export] [--raw data/raw/sim] [--video videos/sweep_038.mp4]
    make serve-example
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd

from sonossl.atomic import atomic_write_text
from sonossl.data.annotations import load_annotations
from sonossl.machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import _start  # noqa: E402  (benchmarks/serve.py: the server as the latency benchmark starts it)


def simulator_labels(raw: Path, video: str) -> list[str]:
    """The per-frame plane labels the simulator wrote for ``video`` (a ``path`` of ``raw/labels.csv``)."""
    table = pd.read_csv(raw / "labels.csv")
    row = table[table["path"] == video]
    if row.empty:
        raise SystemExit(f"{raw / 'labels.csv'}: no row with path {video!r}")
    return [str(x) for x in load_annotations(raw / row.iloc[0]["annotations"]).labels]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "models/export")
    ap.add_argument("--finetune", type=Path, default=REPO / "models/finetune", help="where the exported run's metrics are")
    ap.add_argument("--raw", type=Path, default=REPO / "data/raw/sim")
    ap.add_argument("--video", default="videos/sweep_038.mp4", help="a `path` of the raw dataset's labels.csv")
    ap.add_argument("--requests", type=int, default=7)
    ap.add_argument("--port", type=int, default=18283)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve_example.json")
    args = ap.parse_args()

    truth = simulator_labels(args.raw, args.video)
    media = (args.raw / args.video).read_bytes()
    body = json.dumps({"inputs": [{"name": "video", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(media).decode()]}]}).encode()
    card = json.loads((args.model_dir / "model_card.json").read_text())
    url = f"http://127.0.0.1:{args.port}/v2/models/sonossl/infer"
    server = _start(args.model_dir, args.port, None)
    try:
        seconds = []
        for _ in range(args.requests):
            req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as resp:
                response = json.loads(resp.read())
            seconds.append(time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(timeout=30)

    out = {o["name"]: o for o in response["outputs"]}
    labels, blank = out["label"]["data"], out["blank"]["data"]
    if len(labels) != len(truth):
        raise SystemExit(f"{args.video}: the server returned {len(labels)} frames, the annotations hold {len(truth)}")
    pairs = collections.Counter((t, p) for t, p, b in zip(truth, labels, blank, strict=True) if not b)
    source = card["planes"]["source"]
    run = next(r for r in json.loads((args.finetune / source / "metrics.json").read_text())["runs"]
               if r["name"] == card["planes"]["run"])
    result = {
        "benchmark": "serve_example", "model_version": card["model_version"], "video": args.video,
        "media_bytes": len(media), "frames": len(labels), "blank_frames": int(sum(blank)),
        "requests": args.requests, "seconds": [round(s, 3) for s in seconds],
        "median_seconds": round(statistics.median(seconds), 3),
        "agree": sum(n for (t, p), n in pairs.items() if t == p),
        "true_to_predicted": {f"{t} -> {p}": n for (t, p), n in sorted(pairs.items())},
        "response_abridged": {
            **{k: response[k] for k in ("model_name", "model_version", "parameters") if k in response},
            "outputs": [{"name": o["name"], "datatype": o["datatype"], "shape": o["shape"], "data": o["data"][:6]}
                        for o in response["outputs"]]},
        "exported_run": f"{source}/{card['planes']['run']}",
        "test_macro_f1": run["test"]["macro_f1"],
        "test_f1_per_class": {c: round(v["f1"], 3) for c, v in run["test"]["per_class"].items()},
        "machine": describe(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("model_version", "median_seconds", "agree", "frames", "true_to_predicted",
                                             "test_macro_f1", "test_f1_per_class")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
