"""How fast this checkout renders sweeps against another revision of the simulator, and whether both render the same.

Renders the same sweeps of a profile's ``simulate`` block with this checkout's ``src/sonossl`` and with
``--base``'s (extracted with ``git archive`` into a temporary folder), each in its own one-thread process, taking
turns (base, this, base, this, ...) so that both meet the same load, and compares what they render: frames, labels,
saliency maps, every per-frame annotation and the labels.csv row, as a SHA-256 per sweep. A change that only makes
the simulator faster must leave every digest equal, so that the data version ids, and everything DVC derives from
them, stay the same.

    .venv/bin/python benchmarks/simulator_speed.py --base HEAD~1            # 1.3 minutes here (4 sweeps x 3)
    .venv/bin/python benchmarks/simulator_speed.py --base a198145 --this HEAD   # two revisions, not the tree
Writes benchmarks/results/simulator_speed.json (or --out): seconds per sweep for each revision (median over
``--repeats`` rounds), this checkout's speed-up (base seconds / this checkout's, per sweep, and its median) and
``identical``. Exits 1 when a digest differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def digest(sweep) -> str:
    """SHA-256 of everything a rendered sweep writes (before video encoding)."""
    import numpy as np

    h = hashlib.sha256()
    for a in (sweep.frames, sweep.labels, sweep.saliency, *(sweep.extra[k] for k in sorted(sweep.extra))):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    h.update(json.dumps(sweep.row, sort_keys=True, default=str).encode())
    return h.hexdigest()


def worker(params_path: str, profile: str, which: str, indices: list[int]) -> None:
    """Render ``indices`` with whichever ``sonossl`` this process imports; one JSON line per sweep on stdout."""
    import sonossl
    from sonossl.config import load_params
    from sonossl.data.simulate import render_sweep

    params = load_params(params_path, profile)
    sim = params.simulate if which == "sim" else params.simulate_test
    for i in indices:
        t0 = time.perf_counter()
        sweep = render_sweep(i, sim)
        seconds = time.perf_counter() - t0
        print(json.dumps({"index": i, "seconds": seconds, "digest": digest(sweep), "sonossl": sonossl.__file__}),
              flush=True)


def run_worker(src: Path, args: argparse.Namespace) -> dict[int, dict]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--params", args.params, "--profile", args.profile,
           "--which", args.which, "--indices", *map(str, args.indices)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"simulator_speed: rendering with {src} failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    expected = str(src / "sonossl")
    for r in rows:  # the editable install must not have shadowed PYTHONPATH
        if not r["sonossl"].startswith(expected):
            raise SystemExit(f"simulator_speed: imported {r['sonossl']}, expected a module under {expected}")
    return {r["index"]: r for r in rows}


def simulate_only(params_path: str, profile: str, into: Path) -> str:
    """A copy of ``params_path`` that keeps only the profile's ``simulate`` and ``simulate_test`` blocks, for the
    workers: another revision's code then never reads a section, or a key, that only this checkout knows."""
    import yaml

    doc = yaml.safe_load(Path(params_path).read_text()) or {}
    block = doc.get(profile) or {}
    out = into / "params.yaml"
    out.write_text(yaml.safe_dump({"profile": profile, profile: {k: block[k] for k in ("simulate", "simulate_test")
                                                                 if k in block}}, sort_keys=False))
    return str(out)


def git(*args: str) -> str:
    """Output of ``git args`` in this checkout, stripped ("" when it fails)."""
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def extract(rev: str, into: Path) -> Path:
    """``src/`` of revision ``rev`` under ``into``."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"simulator_speed: revision {rev!r}: {e.stderr.decode().strip()}") from None
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="git revision to compare with (required unless --worker)")
    ap.add_argument("--this", help="a git revision to measure instead of this checkout's working tree")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default="default")
    ap.add_argument("--which", choices=["sim", "sim_test"], default="sim",
                    help="the training sweeps' simulate block or the test set's (simulate_test)")
    ap.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3], help="sweep indices to render")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (base, this checkout)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "simulator_speed.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.params, args.profile, args.which, args.indices)
        return 0
    if not args.base:
        ap.error("--base is required")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if min(args.indices) < 0:
        ap.error(f"--indices must be non-negative, got {args.indices}")
    from sonossl.atomic import atomic_write_text
    from sonossl.config import ParamsError, load_params
    from sonossl.machine import describe

    try:  # a bad file or profile fails here, naming it, not in a worker
        params = load_params(args.params, args.profile)
    except ParamsError as e:
        ap.error(str(e))
    if args.which == "sim_test" and params.simulate_test is None:
        ap.error(f"--which sim_test: {args.params} has no {args.profile}.simulate_test block")

    base_rev = git("rev-parse", "--short", args.base) or args.base
    here = git("rev-parse", "--short", args.this or "HEAD") or args.this or "working tree"
    dirty = not args.this and bool(git("status", "--porcelain", "src"))
    times: dict[str, dict[int, list[float]]] = {"base": {}, "this": {}}
    digests: dict[str, dict[int, str]] = {"base": {}, "this": {}}
    with tempfile.TemporaryDirectory(prefix="simulator_speed_") as tmp:
        srcs = {"base": extract(args.base, Path(tmp, "base")),
                "this": extract(args.this, Path(tmp, "this")) if args.this else ROOT / "src"}
        args.params = simulate_only(args.params, args.profile, Path(tmp))
        for r in range(args.repeats):
            for side in ("base", "this"):
                rows = run_worker(srcs[side], args)
                for i, row in rows.items():
                    times[side].setdefault(i, []).append(row["seconds"])
                    digests[side][i] = row["digest"]
                print(f"round {r + 1}/{args.repeats} {side}: "
                      + ", ".join(f"{i}: {row['seconds']:.2f} s" for i, row in rows.items()), flush=True)
    med = {side: {i: statistics.median(v) for i, v in times[side].items()} for side in times}
    speedup = {i: med["base"][i] / med["this"][i] for i in args.indices}
    differ = [i for i in args.indices if digests["base"][i] != digests["this"][i]]
    record = {
        "benchmark": "simulator_speed", "profile": args.profile, "which": args.which, "base": base_rev,
        "this": here + ("+changes" if dirty else ""), "indices": args.indices, "repeats": args.repeats,
        "threads": 1, "seconds_per_sweep": {side: {str(i): [round(t, 3) for t in times[side][i]] for i in args.indices}
                                            for side in times},
        "median_seconds": {side: round(statistics.median(med[side].values()), 3) for side in med},
        "speedup_per_sweep": {str(i): round(s, 3) for i, s in speedup.items()},
        "median_speedup": round(statistics.median(speedup.values()), 3),
        "identical": not differ, "differing_sweeps": differ,
        "machine": describe(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("median_seconds", "median_speedup", "identical", "differing_sweeps")}))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
