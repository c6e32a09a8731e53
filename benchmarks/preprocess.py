"""Throughput of ``sonossl preprocess`` against PyAV decoding alone, on the POCUS videos, in the same run.

The baseline decodes every listed file with PyAV (same thread type, same number of processes, same largest-first
order of files over the processes) and does nothing with the frames; the preprocess run decodes, converts to grey,
detects the sector, drops blank frames, resizes and writes the clip dataset. Both are timed a few times, alternating,
and the medians give frames/s (decoded source frames per second of wall time) and their ratio (target >= 0.5).

    .venv/bin/python benchmarks/preprocess.py                      # POCUS, size 112, 2 workers, 3 repeats
    .venv/bin/python benchmarks/preprocess.py --repeats 5 --size 64
Writes benchmarks/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from sonossl.atomic import atomic_write_text
from sonossl.config import PreprocessParams
from sonossl.data.clips import preprocess, read_listing, start_method
from sonossl.data.video import THREAD_TYPE
from sonossl.machine import describe

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pocus"


def decode_only(path: str) -> int:
    """Decode every frame of ``path`` and drop it: the floor any preprocessing builds on."""
    import av

    n = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = THREAD_TYPE
        for _ in container.decode(stream):
            n += 1
    return n


def time_decode(files: list[str], workers: int) -> tuple[float, int]:
    order = sorted(files, key=lambda f: (-os.path.getsize(f), f))  # as preprocess schedules them
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method())) as pool:
        frames = sum(pool.map(decode_only, order))
    return time.perf_counter() - start, frames


def time_preprocess(raw: Path, params: PreprocessParams, scratch: Path) -> tuple[float, int, int]:
    out = scratch / "clips"
    start = time.perf_counter()
    report = preprocess(raw, out, params, progress=False)
    seconds = time.perf_counter() - start
    meta = json.loads((out / "meta.json").read_text())
    decoded = sum(v["frames_decoded"] for v in meta["videos"])
    if report.rejects:
        print(f"warning: {len(report.rejects)} rejected: {report.rejects[:3]}", file=sys.stderr)
    return seconds, decoded, report.frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="raw dataset (default: the POCUS videos)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preprocess.json")
    args = parser.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(f"{args.data}: no labels.csv; point --data at a raw dataset", file=sys.stderr)
        return 2

    listing = read_listing(args.data)
    files = [str(args.data / p) for p in listing.path]
    params = replace(PreprocessParams(), frame_size=args.size, workers=args.workers)
    runs: dict[str, list[dict]] = {"decode_only": [], "preprocess": []}
    with tempfile.TemporaryDirectory(prefix="sonossl-bench-") as scratch:
        time_decode(files[:4], args.workers)  # warm the page cache and the imports, untimed
        for i in range(args.repeats):
            seconds, frames = time_decode(files, args.workers)
            runs["decode_only"].append({"seconds": seconds, "frames": frames, "fps": frames / seconds})
            seconds, decoded, written = time_preprocess(args.data, params, Path(scratch))
            runs["preprocess"].append(
                {"seconds": seconds, "frames": decoded, "frames_written": written, "fps": decoded / seconds}
            )
            print(
                f"repeat {i + 1}/{args.repeats}: decode-only {runs['decode_only'][-1]['fps']:.0f} frames/s, "
                f"preprocess {runs['preprocess'][-1]['fps']:.0f} frames/s",
                file=sys.stderr,
            )

    decode_fps = statistics.median(r["fps"] for r in runs["decode_only"])
    preprocess_fps = statistics.median(r["fps"] for r in runs["preprocess"])
    ratio = preprocess_fps / decode_fps
    result = {
        "benchmark": "preprocess",
        "data": args.data.name,
        "videos": len(files),
        "params": asdict(params),
        "thread_type": THREAD_TYPE,
        "repeats": args.repeats,
        "decode_only_fps_median": round(decode_fps, 1),
        "preprocess_fps_median": round(preprocess_fps, 1),
        "ratio": round(ratio, 3),
        "target_ratio": 0.5,
        "runs": runs,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": describe(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "av": __import__("av").__version__,
        },
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(
        f"decode-only {decode_fps:.0f} frames/s, preprocess {preprocess_fps:.0f} frames/s: ratio {ratio:.2f} "
        f"(target >= 0.5); written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
