"""One training loop for every step: pretext pretraining, fine-tuning, and the folds of the cross-validation.

A step provides a ``TrainTask`` (its model, its batches, its loss, its validation); ``fit`` does the rest, the
same way for all of them:

- seeds: batches of epoch e on rank r come from a generator seeded by (seed, e, r), so a resumed run draws the
  same data as an uninterrupted one;
- AdamW with linear warm-up and a cosine decay, per step; a task may give parameter groups with their own
  ``lr_scale`` (``param_groups()``: a pretrained encoder fine-tuned gently under a fresh head, say);
- the channels_last memory format, on GPU and CPU (``benchmarks/train_throughput.py`` measures what it gains), and
  on GPU bfloat16 autocast;
- a checkpoint after every epoch (``checkpoints/last.pt``, written atomically: a kill leaves the previous one), the
  best model by the validation metric (``best.pt``), and ``resume=True`` continuing from ``last.pt``;
- with ``ema`` > 0, an exponential moving average of the weights and BatchNorm statistics (Polyak averaging,
  updated after every step, its decay warmed up as min(ema, (1 + t) / (10 + t)) at step t): the average is what is
  validated and what ``best.pt`` and the model hold at the end; ``last.pt`` keeps both, so a resumed run goes on
  averaging where it stopped;
- early stopping: with a validation metric and ``patience`` > 0, training ends once that many epochs in a row have
  not beaten the best one (the schedule stays the one planned for all ``epochs``; a resumed run that had stopped
  stays stopped); ``stop_after`` ends it after a fixed number of epochs of that schedule instead (a refit that
  repeats the epochs a validation run chose, without validation data);
- DDP under ``torchrun`` (gloo on CPU, nccl on GPU), each rank taking its own share of every epoch's batches; the
  ``train_*`` numbers average the batches of every rank, and a resumed run continues rank 0's ``last.pt`` on every
  rank (sent to the others: their nodes need no copy of it);
- dvclive metrics (one step per epoch) and a progress bar, on rank 0.

    result = fit(task, "models/pretrain/both-sequential", LoopParams(epochs=10, lr=1e-3), resume=True)
    result.best, result.history[-1]

Checkpoints hold only tensors and plain values and load with ``torch.load(..., weights_only=True)``; a damaged
checkpoint gives an error naming the file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sonossl.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupted, or from another run)."""


@dataclass(frozen=True)
class LoopParams:
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    amp: bool = True  # GPU only
    channels_last: bool = True
    select: str | None = None  # validation metric that picks best.pt (higher is better); None = last epoch
    patience: int = 0  # with `select`: stop after this many epochs in a row without a better one; 0 = never stop
    stop_after: int = 0  # train only the first this many epochs of the schedule planned for `epochs`; 0 = all of it
    ema: float = 0.0  # decay of a moving average of the weights, validated and kept instead of them; 0 = none


class TrainTask(Protocol):
    """What ``fit`` trains. Optional: ``find_unused_parameters = True`` for DDP when some weights get no gradient,
    and ``param_groups()``, a list of ``{"params": [...], "lr_scale": s}`` holding every parameter once,
    each group at ``s`` times the schedule's learning rate (default: one group, scale 1)."""

    model: nn.Module

    def steps_per_epoch(self, world: int) -> int: ...

    def batches(self, epoch: int, rank: int, world: int, device: torch.device) -> Iterable[Any]:
        """This rank's batches of ``epoch`` (``steps_per_epoch(world)`` of them), on ``device``."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch and per-batch numbers to average over the epoch (e.g. accuracies)."""

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation numbers (rank 0 only); empty when there is nothing to validate on."""


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch: train_* and val_*
    best: dict[str, float] | None = None  # the entry of best.pt's epoch
    seconds: float = 0.0  # wall time of this call
    samples_per_s: float = 0.0  # training throughput of this call (examples seen / training time)
    resumed_from: int = 0  # epochs already done when this call started
    stopped_early: bool = False  # ended before ``epochs`` (``patience``)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); else one process on one device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Distributed(device=torch.device("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Distributed(rank=rank, world=dist.get_world_size(), device=device)


def require_one_process(step: str) -> None:
    """Refuse to run ``step`` under torchrun: only pretraining splits its batches over ranks; another step would
    train the same model on every rank, each on GPU 0, each writing the same files."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(f"{step} runs in one process, not under torchrun (WORLD_SIZE={world}); start it "
                         "directly (only pretraining trains across processes)")


def load_checkpoint(path: str | Path, remedy: str = "delete it to start over, or restore it") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``), with a clear error when it is damaged, ending with
    ``remedy`` (for a training checkpoint: start over; for an input such as an encoder, make it again)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"it is truncated or corrupted: {remedy}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a sonossl checkpoint of format {CHECKPOINT_FORMAT}")
    return ckpt


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _check_groups(groups: list[dict[str, Any]], model: nn.Module) -> None:
    """Every parameter of ``model`` in exactly one group, nothing else, and positive scales."""
    ids = [id(p) for g in groups for p in g["params"]]
    if len(ids) != len(set(ids)) or set(ids) != {id(p) for p in model.parameters()}:
        raise ValueError("param_groups(): each parameter of the model must be in exactly one group")
    bad = [g["lr_scale"] for g in groups if not g.get("lr_scale", 1.0) > 0]
    if bad:
        raise ValueError(f"param_groups(): lr_scale must be positive, got {bad}")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _Live:
    """dvclive on rank 0, one step per epoch; a no-op elsewhere.

    Only dvclive's files are used (metrics.json and plots/, registered as plots in dvc.yaml); its DVC-experiment
    integration is skipped: it is not needed, and it fails in a git repository without commits ("Empty git repo").
    The folder is always started afresh and a resumed run logs its checkpoint's history again first, so the curves
    start at epoch 1 whatever the folder held: DVC may have removed it (``dvc exp run``), and a kill -9 can leave
    dvclive's metrics.json half-written.
    """

    def __init__(self, directory: Path | None, history: list[dict[str, float]]):
        self.live = None
        if directory is not None:
            from dvclive import Live

            class FileLive(Live):
                def _init_dvc(self) -> None:
                    pass

            self.live = FileLive(dir=str(directory), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
            for entry in history:
                self.log({k: v for k, v in entry.items() if k != "epoch"}, step=int(entry["epoch"]) - 1)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.live is None:
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name.replace("_", "/", 1), value)
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def code_version() -> str:
    """A hash of the package's source: a checkpoint written by other code is not resumed."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    """A short hash of what defines a run (parameters, data version, mode... and the code): ``--resume`` only
    continues a checkpoint with the same fingerprint, so a changed parameter or a new version of the code can never
    continue a stale run; resuming is for interruptions."""
    import hashlib

    return hashlib.sha256(json.dumps([code_version(), *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (``fit``'s ``ema``): after update t the
    average moves towards the model by 1 - min(decay, (1 + t) / (10 + t)), so its first updates follow the model
    closely instead of holding on to the initial weights; integer buffers (BatchNorm's batch count) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema: a decay between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, now in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(now.detach(), 1.0 - keep)
            else:
                avg.copy_(now)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def fit(task: TrainTask, out_dir: str | Path, params: LoopParams, resume: bool = False, progress: bool = True,
        live: bool = True, dist_env: Distributed | None = None, run_id: str = "") -> FitResult:
    """Train ``task.model`` for ``params.epochs``; see the module docstring. Returns the per-epoch history.

    ``run_id`` (see ``fingerprint``) is stored in the checkpoint; ``resume`` continues only a matching one.
    """
    out_dir = Path(out_dir)
    if params.stop_after < 0:
        raise ValueError(f"stop_after: must be 0 (the whole schedule) or a number of epochs, got {params.stop_after}")
    env = dist_env or setup_distributed()
    last_path, best_path = out_dir / "checkpoints" / "last.pt", out_dir / "checkpoints" / "best.pt"
    model = task.model.to(env.device)
    on_gpu = env.device.type == "cuda"
    if params.channels_last:
        model = to_channels_last(model)
    groups = task.param_groups() if hasattr(task, "param_groups") else [{"params": list(model.parameters())}]
    _check_groups(groups, model)
    opt = torch.optim.AdamW([{"lr_scale": 1.0, **g} for g in groups], lr=params.lr, weight_decay=params.weight_decay)
    average = WeightAverage(model, params.ema) if params.ema else None
    evaluated = average.module if average else model  # what is validated and kept as best.pt
    result = FitResult()
    start_epoch = 0
    code = code_version()  # kept in last.pt, so that a run not resumed can say whether the code changed
    ckpt = _resume_checkpoint(last_path, run_id, code, env) if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if average:
            if "average" not in ckpt:
                raise CheckpointError(f"{last_path}: holds no weight average (ema), yet the run has the same id")
            average.load_state_dict(ckpt["average"])
        start_epoch = int(ckpt["epoch"])
        result.history = list(ckpt["history"])
        result.best = ckpt.get("best")
        result.resumed_from = start_epoch
        if env.main:
            log.info("%s: resuming after epoch %d of %d", last_path, start_epoch, params.epochs)
            _mend_best(best_path, result, start_epoch, evaluated, run_id)
    elif not resume and last_path.exists() and env.main:
        log.info("%s exists; starting over (pass resume=True to continue it)", last_path)
    train_model: nn.Module = model
    if env.world > 1:
        # a task may leave part of the network unused (the order-only mode never reads the last stage)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if on_gpu else None,
            find_unused_parameters=getattr(task, "find_unused_parameters", False))

    steps = task.steps_per_epoch(env.world)
    total = steps * params.epochs
    warmup = int(round(params.warmup_epochs * steps))
    tracker = _Live(out_dir / "live" if (live and env.main) else None, result.history)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and params.amp
                else contextlib.nullcontext())
    t0 = time.perf_counter()
    seen, train_time = 0, 0.0
    result.stopped_early = start_epoch < params.epochs and _patience_spent(result, params)  # stopped, then resumed
    end_epoch = start_epoch if result.stopped_early else min(params.epochs, params.stop_after or params.epochs)
    try:
        for epoch in range(start_epoch, end_epoch):
            train_model.train()
            sums: dict[str, float] = {}
            n_batches = 0
            te = time.perf_counter()
            bar = _progress(task.batches(epoch, env.rank, env.world, env.device), steps,
                            f"epoch {epoch + 1}/{params.epochs}", progress and env.main)
            for i, batch in enumerate(bar):
                for group in opt.param_groups:
                    group["lr"] = params.lr * group["lr_scale"] * _lr_factor(epoch * steps + i, total, warmup)
                with autocast:
                    loss, numbers = task.loss(train_model, batch)
                if not _finite_everywhere(loss, env):
                    which = (f"the loss became {loss.item()}" if env.world == 1 else
                             f"rank {env.rank}'s loss became {loss.item()}" if not torch.isfinite(loss) else
                             f"another rank's loss became non-finite (rank {env.rank}'s: {loss.item():.4g})")
                    raise FloatingPointError(f"{which} at epoch {epoch + 1}, step {i + 1}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if average:
                    average.update(model)
                n_batches += 1
                seen += _batch_len(batch)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in numbers.items():
                    sums[k] = sums.get(k, 0.0) + v
                if hasattr(bar, "set_postfix") and i % 10 == 0:
                    bar.set_postfix(loss=f"{sums['loss'] / n_batches:.3f}")
            train_time += time.perf_counter() - te
            if env.world > 1:
                sums, n_batches = _sum_over_ranks(sums, n_batches, env.device)
            entry = {"epoch": epoch + 1, **{f"train_{k}": round(v / max(1, n_batches), 5) for k, v in sums.items()}}
            if env.main:
                evaluated.eval()
                with torch.no_grad():  # in float32 also on GPU: the score that picks the epoch is the one reported
                    entry.update({f"val_{k}": round(float(v), 5)
                                  for k, v in task.validate(evaluated, env.device).items()})
                result.history.append(entry)
                improved = params.select is None or result.best is None or (
                    _score(entry, params.select) > _score(result.best, params.select))
                if improved:
                    result.best = entry
                # last.pt first: a run killed before best.pt is written finds its best epoch in last.pt and writes
                # best.pt from it when it resumes (_mend_best); the other way round best.pt could hold an epoch
                # that the resumed run trains again and history never names.
                save_checkpoint(last_path, {"epoch": epoch + 1, "run_id": run_id, "code": code,
                                            "model": model.state_dict(),
                                            "optimizer": opt.state_dict(), "history": result.history,
                                            "best": result.best,
                                            **({"average": average.state_dict()} if average else {})})
                if improved:
                    save_checkpoint(best_path, {"epoch": epoch + 1, "run_id": run_id,
                                                "model": evaluated.state_dict(), "entry": entry})
                tracker.log({k: v for k, v in entry.items() if k != "epoch"}, step=epoch)
                if progress:
                    shown = {k: v for k, v in entry.items() if k.startswith("val_") or k == "train_loss"}
                    log.info("epoch %d/%d %s", epoch + 1, params.epochs, shown)
            stop = torch.tensor([int(env.main and _patience_spent(result, params))], device=env.device)
            if env.world > 1:
                dist.broadcast(stop, 0)  # only rank 0 validates; every rank stops with it
            if stop.item():
                result.stopped_early = epoch + 1 < params.epochs
                if env.main and result.stopped_early:
                    log.info("stopping after epoch %d of %d: %d epochs without a better %s (best: epoch %d)",
                             epoch + 1, params.epochs, params.patience, params.select, result.best["epoch"])
                break
    finally:
        tracker.close()
    if average:
        model.load_state_dict(average.module.state_dict())
    result.seconds = time.perf_counter() - t0
    result.samples_per_s = seen * env.world / train_time if train_time else 0.0
    return result


def _score(entry: dict[str, Any], key: str) -> float:
    """The selection score of a history entry; NaN (a diverged validation) counts as the worst, so a later finite
    epoch can still win (NaN > x and x > NaN are both false)."""
    value = entry.get(key, -math.inf)
    if math.isnan(value):
        log.warning("epoch %s: %s is NaN; counted as the worst score", entry.get("epoch"), key)
        return -math.inf
    return value


def _finite_everywhere(loss: torch.Tensor, env: Distributed) -> bool:
    """Whether the loss is finite on every rank. Under DDP a rank that stopped alone would leave the others waiting
    in the gradient exchange until the collective timed out, so the ranks agree first and all stop together."""
    ok = torch.isfinite(loss.detach()).reshape(1).to(torch.int32)
    if env.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _mend_best(best_path: Path, result: FitResult, start_epoch: int, evaluated: nn.Module, run_id: str) -> None:
    """After a resume: when the last finished epoch was the best and the run was killed before its best.pt was
    written, write it now from the resumed weights (those of that epoch), so best.pt is the epoch history names
    (a best.pt of the same epoch number left by another run, another ``run_id``, is replaced too)."""
    if result.best is None or result.best["epoch"] != start_epoch:
        return
    try:
        ckpt = load_checkpoint(best_path)
        have = (ckpt.get("epoch"), ckpt.get("run_id"))
    except (FileNotFoundError, CheckpointError):
        have = (None, None)
    if have != (start_epoch, run_id):
        log.info("%s: holds epoch %s of run %r, the best is epoch %d of this run; writing it from last.pt",
                 best_path, *have, start_epoch)
        save_checkpoint(best_path, {"epoch": start_epoch, "run_id": run_id, "model": evaluated.state_dict(),
                                    "entry": result.best})


def _resume_checkpoint(last_path: Path, run_id: str, code: str, env: Distributed) -> dict[str, Any] | None:
    """``last_path`` as rank 0 reads it, sent to every rank: the ranks resume after the same epoch with the same
    weights and optimizer state even when the other nodes hold an older copy of the folder, or none. ``None`` when
    there is nothing to resume (no file, or one of another run); a damaged file fails on every rank."""
    ckpt, failure, error = None, None, None
    if env.main and last_path.is_file():
        try:
            ckpt = load_checkpoint(last_path)
        except Exception as e:  # damaged, or gone or unreadable since is_file(): every rank must hear of it
            failure, error = e, f"{e}" if isinstance(e, CheckpointError) else f"{last_path}: {type(e).__name__}: {e}"
        if ckpt is not None and ckpt.get("run_id", "") != run_id:
            what = ("sonossl's code changed (any .py file of the package)" if ckpt.get("code") not in (None, code)
                    else "its parameters, data or mode differ" if ckpt.get("code") == code
                    else "its parameters, data, mode or code differ")
            log.warning("%s belongs to another run (%s): not resumed, starting over", last_path, what)
            ckpt = None
    if env.world > 1:
        box = [(ckpt, error)]
        dist.broadcast_object_list(box, src=0)  # pickled between the ranks of one job (rank 0 read it safely)
        ckpt, error = box[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise CheckpointError(f"rank 0: {error}")
    return ckpt


def _sum_over_ranks(sums: dict[str, float], n_batches: int, device: torch.device) -> tuple[dict[str, float], int]:
    """An epoch's per-batch sums and batch count added up over the ranks, so that ``train_*`` averages every
    rank's batches (not rank 0's alone). Every rank runs the same steps, so every rank has the same keys."""
    keys = sorted(sums)
    t = torch.tensor([float(n_batches), *(sums[k] for k in keys)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t[1:].tolist(), strict=True)), int(t[0])


def _patience_spent(result: FitResult, params: LoopParams) -> bool:
    """True when the last ``params.patience`` epochs of the history all came after the best one."""
    if params.patience <= 0 or params.select is None or not result.history or result.best is None:
        return False
    return result.history[-1]["epoch"] - result.best["epoch"] >= params.patience


def to_channels_last(model: nn.Module) -> nn.Module:
    """The model's weights in the channels_last memory format, and its encoder converting inputs to it."""
    model = model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if hasattr(m, "channels_last"):
            m.channels_last = True
    return model


def load_best(task_model: nn.Module, out_dir: str | Path) -> dict[str, float]:
    """Load ``best.pt`` of a finished ``fit`` into the model; returns its history entry."""
    ckpt = load_checkpoint(Path(out_dir) / "checkpoints" / "best.pt")
    _unwrap(task_model).load_state_dict(ckpt["model"])
    return ckpt["entry"]


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (tuple, list)):
        return _batch_len(batch[0])
    if hasattr(batch, "__len__"):
        return len(batch)
    return 0


def _progress(it: Iterable[Any], total: int, desc: str, show: bool) -> Iterator[Any]:
    if not show:
        return iter(it)
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
