"""Wall time of `dvc repro`, stage by stage, against the budget: issue 3's "simulate -> export in under 15 minutes
on 2 cores", and the POCUS `crossval` stage's own 15 minutes.

Runs ``dvc repro --force`` (every stage of the targets runs again, none is restored from a cache) in the repository
with this environment's ``sonossl``, after deleting what the stages resume from (the training checkpoint folders
and the persisted curves, ``resume_state``; left in place, a forced training stage would resume from its last
epoch and train nothing), so every stage starts from nothing, as in a fresh checkout. It notes when each stage
starts from DVC's own "Running stage" lines, and writes a record: seconds per stage, the simulated pipeline (every
stage but ``crossval``, the other datasets' ``preprocess@<name>`` and the ``train-*`` stages of the datasets under
``train:`` and ``crossval_datasets:``: what `make run` runs without the POCUS videos), ``crossval``, and
the same figures scaled to the issue's sizing machine with ``benchmarks/machine_speed.py``'s yardstick, measured in
the same run after the repro (``--no-yardstick`` skips it). The scaling is a rough guide: the yardstick is a
full-width ResNet-18, and hosts differ in how much faster they run it than this project's narrower encoder.

    .venv/bin/python benchmarks/pipeline_time.py                     # every stage: 16 min on the Intel Xeon
    .venv/bin/python benchmarks/pipeline_time.py --targets export evaluate   # without POCUS
Writes benchmarks/results/pipeline_time.json (or --out). Run it with nothing else on the machine; it rewrites the
pipeline's outputs (to the same bytes, on one machine: the pipeline is deterministic per CPU model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sonossl.atomic import atomic_write_text
from sonossl.machine import describe

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = {"simulated": 15 * 60, "crossval": 15 * 60}
SIMULATED_DATA = ("preprocess@sim", "preprocess@sim_test")
RUNNING = re.compile(r"Running stage '([^']+)'")


def stage_seconds(events: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per stage from (time, line) events: a stage runs from its "Running stage" line to the next one's
    (DVC runs stages one after another), the last to ``end``."""
    starts = [(t, m.group(1)) for t, line in events for m in [RUNNING.search(line)] if m]
    bounds = [t for t, _ in starts[1:]] + [end]
    return {name: round(stop - t, 1) for (t, name), stop in zip(starts, bounds)}


def is_simulated(stage: str) -> bool:
    """A stage of the simulated pipeline (simulate -> export): not crossval, nor another dataset's preprocess, nor
    the train-* stages of the datasets under `train:` and `crossval_datasets:`."""
    if stage == "crossval" or stage.startswith("train-"):
        return False
    return not stage.startswith("preprocess@") or stage in SIMULATED_DATA


def summarise(stages: dict[str, float]) -> dict[str, float | None]:
    simulated = [s for name, s in stages.items() if is_simulated(name)]
    return {"simulated_s": round(sum(simulated), 1) if simulated else None, "crossval_s": stages.get("crossval")}


# The folders the training steps resume from, beside their outputs under models/ (dvc.yaml: not outputs
# themselves): train/loop.py's checkpoints/, finetune's runs/, crossval's folds/.
RESUME_DIRS = ("checkpoints", "runs", "folds")


def resume_state(repo: Path, targets: list[str]) -> list[Path]:
    """What would let the stages that ``dvc repro targets`` runs (every stage without targets) resume rather than
    start over: their ``persist: true`` outputs (the training curves) and the resume folders that exist beside
    their outputs in ``models/`` (only there: a dataset folder of that name under data/ is data)."""
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(".") as dvc:  # targets name stages relative to the working directory
        stages = ({s for t in targets for s in dvc.stage.collect(t, with_deps=True)} if targets
                  else set(dvc.index.stages))
        outs = [(Path(out.fs_path), out.persist) for stage in stages for out in stage.outs]
    models = (Path(repo) / "models").resolve()
    folders = {path.parent / name for path, _ in outs if path.resolve().is_relative_to(models)
               for name in RESUME_DIRS}
    return sorted({path for path, persist in outs if persist} | {f for f in folders if f.is_dir()})


def clear(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def repro(repo: Path, targets: list[str]) -> tuple[dict[str, float], float]:
    """``dvc repro --force`` of ``targets`` in ``repo``; its output goes on to stderr as it comes."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `sonossl` of this venv
    t0 = time.monotonic()
    events = []
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", *targets], cwd=repo, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode: progress bars' carriage returns end lines too
            events.append((time.monotonic() - t0, line))
            sys.stderr.write(line)
    end = time.monotonic() - t0
    if proc.returncode:
        tail = "".join(line for _, line in events[-20:])
        raise SystemExit(f"dvc repro {' '.join(targets)} failed in {repo} (exit {proc.returncode}):\n{tail}")
    return stage_seconds(events, end), round(end, 1)


def yardstick() -> dict:
    """benchmarks/machine_speed.py's measurement on this machine (``slowdown``: the sizing reference's speed over
    this one's)."""
    from machine_speed import measure  # beside this script, so on sys.path when it runs

    return measure()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="a DVC repository of this project (default: this one)")
    ap.add_argument("--targets", nargs="*", default=[], help="dvc repro targets (default: every stage)")
    ap.add_argument("--no-yardstick", dest="yardstick", action="store_false",
                    help="skip benchmarks/machine_speed.py's measurement (about 20 s to 1.5 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pipeline_time.json")
    args = ap.parse_args()
    if not (args.repo / "dvc.yaml").is_file():
        ap.error(f"--repo {args.repo}: no dvc.yaml there")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=args.repo, capture_output=True,
                            text=True).stdout.strip() or None
    resumable = resume_state(args.repo, args.targets)
    print(f"deleting {len(resumable)} checkpoint folders and persisted curves, so that no stage resumes",
          file=sys.stderr)
    clear(resumable)
    stages, total = repro(args.repo, args.targets)
    result: dict = {"benchmark": "pipeline_time", "machine": describe(), "commit": commit,
                    "targets": args.targets or "all", "stages_s": stages, "total_s": total, **summarise(stages),
                    "budget_s": BUDGET_S}
    if args.yardstick:
        speed = yardstick()
        result["yardstick"] = speed
        result["at_reference_speed_s"] = {k: round(result[k] / speed["slowdown"], 1)
                                          for k in ("simulated_s", "crossval_s") if result[k] is not None}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
