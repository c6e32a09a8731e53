"""How fast this machine trains the issue's sizing reference, so wall times from different machines can be compared.

Issue 3 sizes the 15-minute budget of the simulated pipeline with "a torchvision ResNet-18 (one input channel)
trains at about 55 frames/s at 64x64, and about 26 frames/s at 112x112, on these 2 cores". This measures the same
thing here: ResNet-18 (``weights=None``, one input channel, 6 classes), cross-entropy, AdamW, batch 32, training
frames/s at 64x64 and 112x112 (medians of ``--repeats`` timed blocks after a warm-up), and the reference's speed
over the measured one (``slowdown``). It does not carry over to this project's own narrow encoder: one 2-core AMD EPYC
measured a slowdown of 1.13 here, yet ran the default encoder at half the speed of the earlier build machine
(``benchmarks/train_throughput.py``), so compare wall times between machines with that benchmark, not this one.

    .venv/bin/python benchmarks/machine_speed.py          # about 1.5 minutes on 2 cores
Writes benchmarks/results/machine_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision

from sonossl.atomic import atomic_write_text
from sonossl.machine import describe

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FPS = {64: 55.0, 112: 26.0}  # issue 3's sizing note, on the machine the budget was set on


def train_fps(size: int, batch: int, steps: int, repeats: int) -> list[float]:
    """Frames/s of ``repeats`` blocks of ``steps`` training steps of ResNet-18 on (batch, 1, size, size)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=6)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 6, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out.append(steps * batch / (time.perf_counter() - t))
    return out


def measure(batch: int = 32, steps: int = 5, repeats: int = 5) -> dict:
    """Frames/s at each reference size, and ``slowdown``: the reference speed over this machine's (median of the
    sizes; below 1 where this machine is faster)."""
    result: dict = {}
    ratios = []
    for size, reference in REFERENCE_FPS.items():
        runs = train_fps(size, batch, steps, repeats)
        median = statistics.median(runs)
        ratios.append(reference / median)
        result[f"{size}px"] = {"frames_per_s": [round(r, 1) for r in runs], "median": round(median, 1),
                               "reference": reference, "slowdown": round(reference / median, 2)}
    result["slowdown"] = round(statistics.median(ratios), 2)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="training steps per timed block (default: 5)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/machine_speed.json")
    args = ap.parse_args(argv)
    if min(args.batch, args.steps, args.repeats) < 1:
        ap.error("--batch, --steps and --repeats must be at least 1")
    result: dict = {"benchmark": "machine_speed", "model": "torchvision resnet18, 1 input channel, weights=None",
                    "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                    "threads": torch.get_num_threads(), "machine": describe(), "torch": torch.__version__}
    result |= measure(args.batch, args.steps, args.repeats)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
