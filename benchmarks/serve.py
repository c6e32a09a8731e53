"""Serving latency: a 4-frame clip through the real server against the same work in process, in the same run.

The clip is 4 frames of a simulated sweep (256x192), encoded as a small mp4, as a scanner export or a client that
holds a video would send it. The baseline is the in-process call on the same bytes: decode, training's
preprocessing (sector crop, resize) and the bundle's forward pass (``decode_media`` + ``prepare_clip`` +
``Bundle.predict``), which is what the server does per request; the forward pass alone is reported too. The server is
``python -m sonossl.serve`` on 127.0.0.1 (one process, as in the image), called over HTTP with v2 requests (the mp4
as BYTES, base64 in JSON) at concurrency 1 and 4, with the request log on, and once more at concurrency 1 with the
log off (what logging costs). For comparison, the same frames sent decoded, as a JSON list of 196,608 numbers. At concurrency 1, blocks of 10 requests alternate with blocks of
10 in-process calls, so both see the same machine noise. Medians of the per-request latencies; p99; requests/s.
Target: at concurrency 1, p50 at most 1.5x the in-process call. Writes ``benchmarks/results/serve.json``.

    python benchmarks/serve.py [--model-dir models/export] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sonossl.atomic import atomic_write_text
from sonossl.machine import describe

REPO = Path(__file__).resolve().parents[1]


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


class _InProcess:
    """The baseline: the same clip through ``prepare_clip`` + ``Bundle.predict`` in this process."""

    def __init__(self, model_dir: Path, media: bytes):
        from sonossl.export import load_bundle
        from sonossl.serve.frames import card_preprocess_params, decode_media, prepare_clip

        self.bundle, self.media, self.prepare, self.decode = load_bundle(model_dir), media, prepare_clip, decode_media
        self.params = card_preprocess_params(self.bundle.card)
        self.prepared = prepare_clip(decode_media(media, 256), self.params).frames

    def full(self) -> None:
        self.bundle.predict(self.prepare(self.decode(self.media, 256), self.params).frames)

    def forward(self) -> None:
        self.bundle.predict(self.prepared)


def _timed(fn, n: int) -> list[float]:
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return ms


def _start(model_dir: Path, port: int, log_dir: Path | None):
    from sonossl.serve.client import Client

    cmd = [sys.executable, "-m", "sonossl.serve", "--model-dir", str(model_dir), "--http-port", str(port),
           "--host", "127.0.0.1"]
    if log_dir is not None:
        cmd += ["--request-log", str(log_dir)]
    # the server's log to a file, shown if it does not come up (a port in use, a broken export)
    log = tempfile.NamedTemporaryFile(prefix="sonossl-serve-bench-", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        Client(f"http://127.0.0.1:{port}").wait_ready(timeout=120, process=server)
    except Exception:
        server.kill()
        sys.stderr.write(Path(log.name).read_text(errors="replace")[-4000:])
        raise
    finally:
        log.close()
        Path(log.name).unlink()  # the running server keeps writing to its open file, which goes with it
    return server


def _interleaved(base: _InProcess, url: str, send, requests: int, block: int = 10):
    """Alternate blocks of in-process calls and server requests (concurrency 1), so both see the same noise."""
    from sonossl.serve.client import Client

    client = Client(url)
    for _ in range(5):
        send(client)
        base.full()
    full, forward, served = [], [], []
    t_served = 0.0
    for _ in range(requests // block):
        full += _timed(base.full, block)
        forward += _timed(base.forward, block)
        t = time.perf_counter()
        served += _timed(lambda: send(client), block)
        t_served += time.perf_counter() - t
    return full, forward, {**_percentiles(served), "requests_per_s": round(len(served) / t_served, 2),
                           "requests": len(served)}


def _concurrent(url: str, send, requests: int, c: int) -> dict[str, float]:
    from sonossl.serve.client import Client

    clients = [Client(url) for _ in range(c)]  # one connection each
    for cl in clients:
        send(cl)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        parts = list(pool.map(lambda cl: _timed(lambda: send(cl), requests // c), clients))
    wall = time.perf_counter() - t0
    ms = [m for p in parts for m in p]
    return {**_percentiles(ms), "requests_per_s": round(len(ms) / wall, 2), "requests": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=REPO / "models/export")
    ap.add_argument("--raw", type=Path, default=REPO / "data/raw/sim")
    ap.add_argument("--requests", type=int, default=200,
                    help="requests per timed run, at least 20 (blocks of 10, the JSON run half as many)")
    ap.add_argument("--port", type=int, default=18282)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve.json")
    args = ap.parse_args()
    if args.requests < 20:
        raise SystemExit(f"--requests: at least 20 (timed in blocks of 10; the JSON run sends half), got "
                         f"{args.requests}")

    from sonossl.data.video import read_video

    first = (args.raw / "labels.csv").read_text().splitlines()[1].split(",")[0]
    frames, _ = read_video(args.raw / first)
    clip = np.ascontiguousarray(frames[10:14])  # 4 frames as the scanner shows them (sector crop in the server)
    with tempfile.TemporaryDirectory(prefix="sonossl-serve-bench-") as tmp:
        from sonossl.data.video import encode_video

        media = encode_video(Path(tmp) / "clip.mp4", clip, fps=20).read_bytes()  # what a scanner export sends
    base = _InProcess(args.model_dir, media)
    video = lambda cl: cl.infer_video(media)  # noqa: E731 - the clip as it would come: an mp4, base64 in JSON
    frames_json = lambda cl: cl.infer_frames(clip, binary=False)  # noqa: E731 - the decoded frames as JSON numbers
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory(prefix="sonossl-serve-bench-") as tmp:
        server = _start(args.model_dir, args.port, Path(tmp) / "requests")
        try:
            full, forward, logged_c1 = _interleaved(base, url, video, args.requests)
            logged_c4 = _concurrent(url, video, args.requests, 4)
            full_json, _, json_c1 = _interleaved(base, url, frames_json, args.requests // 2)
        finally:
            server.terminate()
            server.wait(timeout=60)
        server = _start(args.model_dir, args.port, None)
        try:
            full2, _, unlogged_c1 = _interleaved(base, url, video, args.requests)
        finally:
            server.terminate()
            server.wait(timeout=60)
    ref = _percentiles(full)["p50_ms"]
    result = {
        "machine": f"{describe()}, Python {platform.python_version()}",
        "clip": list(clip.shape), "clip_mp4_bytes": len(media), "requests": args.requests,
        "in_process": {"preprocess_and_forward": _percentiles(full), "forward_only": _percentiles(forward)},
        "server_with_request_log": {"concurrency_1": logged_c1, "concurrency_4": logged_c4},
        "server_without_request_log": {"concurrency_1": unlogged_c1},
        "server_frames_as_json_numbers": {"concurrency_1": json_c1},
        # against the in-process calls interleaved with it (not with another run's: each run sees its own noise)
        "ratio_p50_c1_frames_as_json_vs_in_process": round(json_c1["p50_ms"] / _percentiles(full_json)["p50_ms"], 3),
        "ratio_p50_c1_vs_in_process": round(logged_c1["p50_ms"] / ref, 3),
        "ratio_p50_c1_vs_forward_only": round(logged_c1["p50_ms"] / _percentiles(forward)["p50_ms"], 3),
        # each server run against the in-process calls interleaved with it, as the two runs see different noise
        "ratio_p50_c1_log_on_vs_off": round((logged_c1["p50_ms"] / ref)
                                            / (unlogged_c1["p50_ms"] / _percentiles(full2)["p50_ms"]), 3),
        "in_process_p50_ms_beside_the_unlogged_server": _percentiles(full2)["p50_ms"],
        "target": "p50 at concurrency 1 at most 1.5x the in-process call",
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
