"""The GPU check: the ``gpu`` profile's pretraining for a few hundred steps on one GPU, prepared as one run.

For a GPU machine held for minutes that has torch but not this project's environment (a bare node, or the GPU
machine a development session is sometimes lent, whose image has no PyAV): the script needs only torch, numpy,
scipy, PyYAML and this repository's ``src/``, and writes and reads no video. On one machine, one command:

1. ``data``: render ``--videos`` of the profile's simulated sweeps in memory (``render_sweep``, one process per
   core), crop each to its sector and resize it to the profile's ``frame_size`` the way ``preprocess`` does
   (``clips.sector_frames``); the last ``--val-videos`` hold out the pretext accuracy;
2. ``training``: the real loop (``fit`` on a ``PretextTask``, both-sequential: batched shuffles, transforms and
   crops on the device, bfloat16 autocast and channels_last on a GPU, AdamW with its schedule, a checkpoint per
   epoch) for ``--epochs`` epochs of ``--steps`` steps at the profile's batch size; per epoch the training loss and
   each head's held-out accuracy, beside chance;
3. ``throughput``: ``--repeats`` times in turn, ``--timing-steps`` steps of the real loop and as many of the model
   alone on one pre-made batch (``train_throughput.model_only``): steps/s, clips/s, frames/s, and the ratio of their
   medians (target at least 0.9, as ``train_throughput.py``);
4. the device's name, peak GPU memory (``torch.cuda.max_memory_allocated``), torch's version and the machine.

    PYTHONUNBUFFERED=1 PYTHONPATH=src:benchmarks python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
                                               # the lent GPU machine: only what is written under $OUT comes back
    .venv/bin/python benchmarks/gpu_check.py --profile tiny --videos 3 --val-videos 1 --steps 2  # any CPU (tests)
Writes benchmarks/results/gpu_check.json (or --out) after each part, so a run stopped at its time limit keeps
what it measured (``finished`` names the parts done). A part that fails (CUDA out of memory, a non-finite loss) is
recorded under ``errors`` with its message, the throughput part still runs, and the script exits 1. Without a GPU
it runs on the CPU and says so (``device``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sonossl.atomic import atomic_write_text
from sonossl.config import SimulateParams, load_params
from sonossl.data.clips import sector_frames, start_method
from sonossl.data.simulate import render_sweep
from sonossl.machine import describe
from sonossl.train.loop import fit, setup_distributed
from sonossl.train.pretrain import PretextTask, loop_params

from train_throughput import model_only, real_loop  # benchmarks/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
MODE = "both-sequential"


def sweep_frames(index: int, sim: SimulateParams, size: int) -> np.ndarray:
    """Sweep ``index`` of ``sim`` as a clip dataset holds it: cropped to its sector, ``size`` x ``size``, uint8."""
    return sector_frames(render_sweep(index, sim).frames, size)


def render(sim: SimulateParams, videos: int, size: int, workers: int) -> tuple[torch.Tensor, np.ndarray]:
    """All frames of ``videos`` sweeps (N, size, size) and each frame's video index, rendered in parallel."""
    ctx = multiprocessing.get_context(start_method())
    with ProcessPoolExecutor(max_workers=max(1, min(workers, videos)), mp_context=ctx) as pool:
        sweeps = list(pool.map(sweep_frames, range(videos), [sim] * videos, [size] * videos))
    video_idx = np.concatenate([np.full(len(s), i) for i, s in enumerate(sweeps)])
    return torch.from_numpy(np.concatenate(sweeps)), video_idx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="gpu", help="params.yaml profile (default: gpu)")
    ap.add_argument("--videos", type=int, default=8, help="simulated sweeps to render (default 8)")
    ap.add_argument("--val-videos", type=int, default=1, help="of them, held out for the pretext accuracy")
    ap.add_argument("--seconds", type=float, default=None, help="sweep length (default: the profile's)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    ap.add_argument("--steps", type=int, default=100, help="steps per training epoch (default 100)")
    ap.add_argument("--timing-steps", type=int, default=30, help="steps per timed run (default 30)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each kind, in turn (default 3)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_check.json")
    args = ap.parse_args()
    for name in ("videos", "epochs", "steps", "timing_steps", "repeats", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not 1 <= args.val_videos < args.videos:
        raise SystemExit(f"--val-videos: must be at least 1 and fewer than --videos ({args.videos}), "
                         f"got {args.val_videos}")
    params = load_params(ROOT / "params.yaml", args.profile)
    sim = params.simulate if args.seconds is None else dataclasses.replace(params.simulate, seconds=args.seconds)
    pre = params.pretrain
    t = time.perf_counter()  # rendering forks: before anything touches CUDA
    frames, video_idx = render(sim, args.videos, params.preprocess.frame_size, args.workers)
    render_s = time.perf_counter() - t
    env = setup_distributed()
    on_gpu = env.device.type == "cuda"
    record: dict = {
        "benchmark": "gpu_check", "profile": params.profile, "mode": MODE, "finished": [], "errors": {},
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "amp": "bfloat16" if on_gpu and pre.amp else None,
        "channels_last": pre.channels_last, "encoder": dataclasses.asdict(pre.encoder),
        "batch_size": pre.batch_size, "k": pre.k, "crop": pre.crop, "stride": pre.stride,
        "frame_size": params.preprocess.frame_size,
    }

    def save(part: str, error: BaseException | None = None) -> None:
        if error is None:
            record["finished"].append(part)
        else:  # the message and where it came from; the next part still runs
            record["errors"][part] = f"{type(error).__name__}: {error}"
            record.setdefault("tracebacks", {})[part] = traceback.format_exc(limit=-8)
            print(f"{part} failed: {record['errors'][part]}", file=sys.stderr, flush=True)
        if on_gpu:
            record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        record["machine"] = describe()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
        print(f"{part} done: {args.out}", flush=True)

    val = video_idx >= args.videos - args.val_videos
    record["data"] = {"videos": args.videos, "val_videos": args.val_videos, "frames": len(frames),
                      "seconds_per_sweep": sim.seconds, "fps": sim.fps, "render_s": round(render_s, 1)}
    save("data")

    torch.manual_seed(pre.seed)
    task = PretextTask(frames, video_idx, ~val, val, pre, MODE)
    task.clips_per_epoch = args.steps * task.batch_size
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        with tempfile.TemporaryDirectory(prefix="sonossl-gpu-check-") as tmp:
            res = fit(task, tmp, dataclasses.replace(loop_params(pre), epochs=args.epochs), progress=False,
                      live=False, dist_env=env)
        record["training"] = {
            "epochs": args.epochs, "steps_per_epoch": args.steps, "seconds": round(res.seconds, 1),
            "steps_per_s": round(res.samples_per_s / task.batch_size, 2), "clips_per_s": round(res.samples_per_s, 1),
            "history": res.history, "chance": task.chance(),
            # null with one epoch: nothing to compare its loss with
            "loss_fell": res.history[-1]["train_loss"] < res.history[0]["train_loss"] if args.epochs > 1 else None,
        }
        save("training")
    except Exception as e:  # noqa: BLE001 - recorded; the throughput part does not need a trained model
        save("training", e)
        if on_gpu:
            torch.cuda.empty_cache()

    try:
        record["throughput"] = throughput(task, args.timing_steps, args.repeats, env, pre)
        save("throughput")
    except Exception as e:  # noqa: BLE001 - recorded, then the exit code says a part failed
        save("throughput", e)
    shown = ("device", "peak_gpu_memory_mib", "throughput", "errors")
    print(json.dumps({k: record[k] for k in shown if record.get(k)}, indent=2))
    return 1 if record["errors"] else 0


def throughput(task: PretextTask, steps: int, repeats: int, env, pre) -> dict:
    """``repeats`` times in turn: ``steps`` steps of the real loop, then as many of the model alone on one batch."""
    loops, models = [], []
    real_loop(task, pre, 1, env)  # warm-up, untimed: one step of the loop (model_only warms up itself)
    for r in range(repeats):
        loops.append(real_loop(task, pre, steps, env))
        models.append(model_only(task, steps, env.device, pre.amp))
        print(f"repeat {r + 1}: loop {loops[-1]:.1f} clips/s, model only {models[-1]:.1f} clips/s", flush=True)
    loop, model = statistics.median(loops), statistics.median(models)
    return {
        "steps": steps, "repeats": repeats,
        "loop_clips_per_s": [round(x, 1) for x in loops], "model_only_clips_per_s": [round(x, 1) for x in models],
        "median_loop_clips_per_s": round(loop, 1), "median_model_only_clips_per_s": round(model, 1),
        "median_loop_steps_per_s": round(loop / task.batch_size, 2),
        "median_loop_frames_per_s": round(loop * pre.k, 1),
        "ratio": round(loop / model, 3), "target_ratio": 0.9,
    }


if __name__ == "__main__":
    sys.exit(main())
