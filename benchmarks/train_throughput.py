"""Clips/s of the real pretraining loop against the model-only step on pre-made tensors, in the same run.

The real loop is ``sonossl.train.loop.fit`` on a ``PretextTask`` (gathering clips from the in-memory clip dataset,
batched shuffles, transforms, crops and intensity jitter, then forward, backward, AdamW step) for one epoch, its
throughput taken from the loop's own training time (validation excluded). The baseline runs the same model, loss and
optimizer step over one pre-made batch of the same size, again and again, reading the loss after each step as the
loop does: the speed of the model alone. Both are warmed up first, untimed (one step of each). Repeats
alternate between the two; medians give clips/s and their ratio (target >= 0.9: the input pipeline keeps up). A
third run per repeat, the real loop in the plain contiguous memory format, gives what channels_last (the loop's
default, on GPU and CPU) gains on this machine: ``memory_format_speedup``.

    .venv/bin/python benchmarks/train_throughput.py                    # default profile, data/clips/sim
    .venv/bin/python benchmarks/train_throughput.py --profile gpu --steps 200
Writes benchmarks/results/train_throughput.json (or --out); the defaults (5 repeats of 60 steps) are the protocol
of the README's figures, so `make bench` measures what they say. Under torchrun (DDP), rank 0 writes the record,
with ``world_size``: the loop's clips/s are of every rank together, the model-only step's of rank 0 alone, so the
ratio is not the input pipeline's share there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sonossl.atomic import atomic_write_text
from sonossl.config import load_params
from sonossl.data.clips import load_clip_dataset
from sonossl.machine import describe
from sonossl.train.loop import fit, setup_distributed
from sonossl.train.pretrain import PretextTask, frames_tensor, loop_params

ROOT = Path(__file__).resolve().parents[1]


def model_only(task: PretextTask, steps: int, device: torch.device, amp: bool) -> float:
    """Clips/s of forward + backward + step on one pre-made batch (no input pipeline at all)."""
    model = task.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = next(iter(task.batches(0, 0, 1, device)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and amp else None
    def step():
        if autocast:
            with autocast:
                loss, _ = task.loss(model, batch)
        else:
            loss, _ = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())  # the loop reads its loss after every step: the same wait for the device here

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(batch) / (time.perf_counter() - t)


def real_loop(task: PretextTask, params, steps: int, env) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        lp = dataclasses.replace(loop_params(params), epochs=1)
        task.clips_per_epoch = steps * task.batch_size
        res = fit(task, tmp, lp, progress=False, live=False, dist_env=env)
    return res.samples_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--clips", type=Path, default=ROOT / "data/clips/sim")
    ap.add_argument("--mode", default="both-sequential")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    args = ap.parse_args()

    params = load_params(ROOT / "params.yaml", args.profile).pretrain
    data = load_clip_dataset(args.clips)
    split = data.index.split.to_numpy()
    env = setup_distributed()
    frames = frames_tensor(data)
    contiguous = dataclasses.replace(params, channels_last=False)

    def make_task(p) -> PretextTask:
        task = PretextTask(frames, data.index.video_idx.to_numpy(), split == "train", split == "val", p, args.mode)
        task.val = task.val[:1]  # validation is outside the timed part anyway; keep the run short
        return task

    task, plain = make_task(params), make_task(contiguous)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loops, models, plains = [], [], []
    real_loop(task, params, 1, env)  # warm-up, untimed: the first use of the model and of each memory format
    real_loop(plain, contiguous, 1, env)
    for r in range(args.repeats):
        loops.append(real_loop(task, params, args.steps, env))
        models.append(model_only(task, args.steps, env.device, params.amp))
        plains.append(real_loop(plain, contiguous, args.steps, env))
        if env.main:
            print(f"repeat {r + 1}: loop {loops[-1]:.1f} clips/s, model only {models[-1]:.1f} clips/s, loop in the "
                  f"contiguous format {plains[-1]:.1f} clips/s", flush=True)
    loop_med, model_med, plain_med = statistics.median(loops), statistics.median(models), statistics.median(plains)
    result = {
        "benchmark": "train_throughput",
        "profile": args.profile, "mode": args.mode, "clips": str(args.clips), "steps": args.steps,
        "batch_size": params.batch_size, "k": params.k, "crop": params.crop, "encoder": dataclasses.asdict(params.encoder),
        "repeats": args.repeats, "world_size": env.world,
        "loop_clips_per_s": [round(x, 1) for x in loops], "model_only_clips_per_s": [round(x, 1) for x in models],
        "median_loop_clips_per_s": round(loop_med, 1), "median_model_only_clips_per_s": round(model_med, 1),
        "ratio": round(loop_med / model_med, 3), "target_ratio": 0.9,
        "channels_last": params.channels_last, "contiguous_loop_clips_per_s": [round(x, 1) for x in plains],
        "median_contiguous_loop_clips_per_s": round(plain_med, 1),
        "memory_format_speedup": round(loop_med / plain_med, 3),  # the loop as configured / contiguous
        "device": torch.cuda.get_device_name() if env.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "peak_gpu_memory_mib": (round(torch.cuda.max_memory_allocated() / 2**20) if env.device.type == "cuda" else None),
        "machine": describe(), "torch": torch.__version__,
    }
    if not env.main:  # one record, rank 0's (the others measured their own model-only step)
        return
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_loop_clips_per_s", "median_model_only_clips_per_s", "ratio",
                                             "median_contiguous_loop_clips_per_s", "memory_format_speedup",
                                             "device")}, indent=2))


if __name__ == "__main__":
    main()
