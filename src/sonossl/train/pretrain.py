"""The pretrain step: pretext training of the frame encoder on unlabelled clips (Jiao et al., ISBI 2020).

Clips come from the training videos of a clip dataset (labels are never read); pretext accuracy is measured on a
fixed set of clips from the validation videos, per head, beside its chance level. The step writes:

- ``encoder.pt``: the encoder's weights and spec, the pretext setup (mode, K, stride, the permutation set, the
  transform sets, crop), the clip dataset's version, the parameters and the held-out metrics, but not the
  throughput: the same weights give the same bytes, so DVC retrains nothing downstream of an unchanged encoder;
- ``metrics.json``: held-out pretext accuracy per head and chance, losses, throughput;
- ``live/``: dvclive curves; ``checkpoints/``: ``last.pt`` for ``--resume``.

    pretrain("data/clips/sim", "models/pretrain/both-sequential", params.pretrain, mode="both-sequential")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sonossl.atomic import atomic_write_text
from sonossl.config import (AT_LEAST_1, AT_LEAST_2, NOT_NEGATIVE, POSITIVE, ParamsError, PretrainParams, as_dict,
                            check_ranges, optional)
from sonossl.data.clips import ClipDataset, load_clip_dataset
from sonossl.models.encoder import build_encoder
from sonossl.models.pretext_heads import PretextModel
from sonossl.pretext.batch import PretextBatch, PretextBatchMaker, check_mode, clip_starts
from sonossl.pretext.permutations import permutation_set
from sonossl.pretext.transforms import TransformSet
from sonossl.train.loop import Distributed, LoopParams, fingerprint, fit, load_checkpoint, save_checkpoint, setup_distributed

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"
RUN_DEPENDENT = ("clips_per_s",)  # metrics.json keys that depend on the machine's speed, kept out of encoder.pt


def seed_for(*parts: int) -> int:
    """A generator seed from small integers (seed, epoch, rank...), stable across runs and processes."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**62)
    return h


def frames_tensor(data: ClipDataset) -> torch.Tensor:
    """All frames of a clip dataset in memory as a uint8 tensor (N, S, S)."""
    return torch.from_numpy(np.array(data.frames))


def transform_set(params: PretrainParams) -> TransformSet:
    t = params.transform
    return TransformSet(tuple(t.rotations), tuple(t.scales), tuple(t.shears))


class PretextTask:
    """Pretext training on the clips that start in ``train_mask`` rows, validated on those in ``val_mask``."""

    def __init__(self, frames: torch.Tensor, video_idx: np.ndarray, train_mask: np.ndarray, val_mask: np.ndarray,
                 params: PretrainParams, mode: str, batch_size: int | None = None):
        self.mode = check_mode(mode)
        self.params = params
        self.frames = frames
        self.batch_size = batch_size or params.batch_size
        starts = clip_starts(video_idx, params.k, params.stride)
        self.train_starts = starts[train_mask[starts]]
        val_starts = starts[val_mask[starts]]
        if len(self.train_starts) == 0:
            raise ValueError(f"pretrain: no training video is long enough for a clip of k={params.k} frames at "
                             f"stride={params.stride} ({(params.k - 1) * params.stride + 1} frames); lower them")
        self.permutations = permutation_set(params.k, params.n_permutations, params.seed)
        self.transforms = transform_set(params)
        self.maker = PretextBatchMaker(mode, self.permutations, self.transforms, source=frames.shape[-1],
                                       crop=params.crop, max_shift=params.max_shift)
        encoder = build_encoder(as_dict(params.encoder))
        self.model = PretextModel(encoder, mode, params.k, len(self.permutations), self.transforms.sizes)
        self.find_unused_parameters = mode == "order"  # its head reads the third stage only
        self.clips_per_epoch = params.clips_per_epoch or len(self.train_starts)
        self.val = self._fixed_val(val_starts)

    def rows(self, starts: np.ndarray | torch.Tensor) -> torch.Tensor:
        starts = torch.as_tensor(starts)
        return starts[:, None] + self.params.stride * torch.arange(self.params.k)

    def _fixed_val(self, starts: np.ndarray) -> list[PretextBatch]:
        if len(starts) == 0:
            return []
        n = min(self.params.val_clips, len(starts))
        pick = starts[np.linspace(0, len(starts) - 1, n).round().astype(int)]
        gen = torch.Generator().manual_seed(seed_for(self.params.seed, 999_999))
        return [self.maker(self.frames[self.rows(pick[i:i + 256])], gen) for i in range(0, n, 256)]

    def steps_per_epoch(self, world: int) -> int:
        return max(1, self.clips_per_epoch // (self.batch_size * world))

    def batches(self, epoch: int, rank: int, world: int, device: torch.device):
        order_gen = torch.Generator().manual_seed(seed_for(self.params.seed, epoch))
        n = len(self.train_starts)
        # enough passes over the clips for a whole batch on every rank at every step, also when the clips number
        # fewer than batch_size x world (a short or empty batch on some rank would fail or skew the mean)
        needed = max(self.clips_per_epoch, self.steps_per_epoch(world) * world * self.batch_size)
        reps = math.ceil(needed / n)
        order = torch.cat([torch.randperm(n, generator=order_gen) for _ in range(reps)])
        gen = torch.Generator().manual_seed(seed_for(self.params.seed, epoch, rank + 1))
        starts = torch.from_numpy(self.train_starts)
        b = self.batch_size
        for step in range(self.steps_per_epoch(world)):
            lo = (step * world + rank) * b
            clips = self.frames[self.rows(starts[order[lo:lo + b]])].to(device, non_blocking=True)
            yield self.maker(clips, gen)

    def _losses(self, model: nn.Module, batch: PretextBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch)
        w = self.params.loss_weights
        numbers, total = {}, 0.0
        transform_losses = []
        for name, out in logits.items():
            target = batch.targets[name].to(out.device)
            loss = F.cross_entropy(out.float(), target)
            numbers[f"{name}_acc"] = float((out.argmax(1) == target).float().mean())
            numbers[f"{name}_loss"] = float(loss.detach())
            if name == "order":
                total = total + w.order * loss
            else:
                transform_losses.append(loss)
        if transform_losses:
            total = total + w.transform * torch.stack(transform_losses).mean()
        return total, numbers

    def loss(self, model: nn.Module, batch: PretextBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, numbers = self._losses(model, batch)
        return loss, {k: v for k, v in numbers.items() if k.endswith("_acc")}

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if not self.val:
            return {}
        sums: dict[str, float] = {}
        n = 0
        for batch in self.val:
            batch = _to(batch, device)
            loss, numbers = self._losses(model, batch)
            for k, v in {"loss": float(loss), **numbers}.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch)
            n += len(batch)
        return {k: v / n for k, v in sums.items()}

    def chance(self) -> dict[str, float]:
        sizes = {"order": len(self.permutations), **self.transforms.sizes}
        heads = [h for h in sizes if (h == "order") != (self.mode == "transform") or self.mode.startswith("both")]
        return {f"{h}_acc": round(1 / sizes[h], 4) for h in heads}


def _to(batch: PretextBatch, device: torch.device) -> PretextBatch:
    oc = batch.order_clips.to(device) if batch.order_clips is not None else None
    tc = oc if batch.same_clips else (batch.transform_clips.to(device) if batch.transform_clips is not None else None)
    return PretextBatch(oc, tc, {k: v.to(device) for k, v in batch.targets.items()})


BUDGETS = ("main", "ablation")


def at_budget(params: PretrainParams, budget: str) -> PretrainParams:
    """The parameters of a pretraining run at ``budget``: "main" (the pipeline's own encoder) as given; "ablation"
    with ``ablation_epochs`` in place of ``epochs`` when it is set, the one cost every encoder of the pretext-mode
    ablation gets."""
    if budget not in BUDGETS:
        raise ValueError(f"pretrain budget {budget!r} is not one of {list(BUDGETS)}")
    for name in ("epochs", "ablation_epochs"):
        value = getattr(params, name)
        if value is not None and value < 1:
            raise ParamsError(f"pretrain.{name}: must be at least 1, got {value}")
    if budget == "ablation" and params.ablation_epochs is not None:
        return dataclasses.replace(params, epochs=params.ablation_epochs)
    return params


def loop_params(params: PretrainParams) -> LoopParams:
    return LoopParams(epochs=params.epochs, lr=params.lr, weight_decay=params.weight_decay,
                      warmup_epochs=params.warmup_epochs, seed=params.seed, amp=params.amp,
                      channels_last=params.channels_last)


def check_pretrain_params(params: PretrainParams) -> None:
    """Fail before any work, naming the setting, when one is outside its range."""
    check_ranges("pretrain", params, {
        "k": (lambda v: v >= 3, "at least 3 (2 frames have a single order up to reversal: nothing to learn)"),
        "stride": AT_LEAST_1, "crop": AT_LEAST_2, "max_shift": NOT_NEGATIVE, "epochs": AT_LEAST_1,
        "ablation_epochs": optional(AT_LEAST_1), "clips_per_epoch": optional(AT_LEAST_1), "batch_size": AT_LEAST_1,
        "lr": POSITIVE, "weight_decay": NOT_NEGATIVE, "warmup_epochs": NOT_NEGATIVE, "val_clips": NOT_NEGATIVE})
    classes = math.factorial(params.k) // 2  # a permutation and its reverse are one class
    check_ranges("pretrain", params, {"n_permutations": optional((lambda n: 2 <= n <= classes,
                                                                  f"between 2 and {classes} for k={params.k}"))})
    for name in ("order", "transform"):
        check_ranges("pretrain.loss_weights", params.loss_weights, {name: NOT_NEGATIVE})


def pretrain_on(data: ClipDataset, train_mask: np.ndarray, val_mask: np.ndarray, out_dir: str | Path,
                params: PretrainParams, mode: str, resume: bool = False, progress: bool = True,
                env: Distributed | None = None) -> dict[str, Any]:
    """Pretrain on the clips of the given rows of ``data``; see ``pretrain``. Returns the metrics."""
    check_pretrain_params(params)
    out_dir = Path(out_dir)
    env = env or setup_distributed()
    torch.manual_seed(params.seed)
    task = PretextTask(frames_tensor(data), data.index.video_idx.to_numpy(), train_mask, val_mask, params, mode)
    run_id = fingerprint(as_dict(params), mode, data.version, np.flatnonzero(train_mask).tolist(), env.world)
    result = fit(task, out_dir, loop_params(params), resume=resume, progress=progress, dist_env=env, run_id=run_id)
    if not env.main:
        return {}
    last = result.history[-1]
    metrics = {
        "mode": mode,
        "data_version": data.version,
        "epochs": params.epochs,
        "train_clips": int(len(task.train_starts)),
        "val_clips": int(sum(len(b) for b in task.val)),
        "val": {k[4:]: round(v, 4) for k, v in last.items() if k.startswith("val_")},
        "chance": task.chance(),
        "train": {k[6:]: round(v, 4) for k, v in last.items() if k.startswith("train_")},
        "clips_per_s": round(result.samples_per_s, 1),
        "world_size": env.world,
    }
    encoder = task.model.encoder
    save_checkpoint(out_dir / ENCODER_FILE, {
        "encoder": dict(encoder.spec),
        "state_dict": encoder.state_dict(),
        "pretext": {"mode": mode, "k": params.k, "stride": params.stride,
                    "permutations": task.permutations.tolist(), "transforms": as_dict(params.transform),
                    "crop": params.crop},
        "data_version": data.version,
        "params": as_dict(params),
        # Not the throughput: it changes from run to run, and then so would the file's hash, so that `dvc repro`
        # would retrain every downstream stage after a change that left the weights bit for bit the same.
        "metrics": {k: v for k, v in metrics.items() if k not in RUN_DEPENDENT},
    })
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def pretrain(clips_dir: str | Path, out_dir: str | Path, params: PretrainParams, mode: str = "both-sequential",
             resume: bool = False, progress: bool = True, budget: str = "main") -> dict[str, Any]:
    """Pretrain on the training videos of a clip dataset, validate on its validation videos; ``budget``: see
    ``at_budget``."""
    params = at_budget(params, budget)
    data = load_clip_dataset(clips_dir)
    split = data.index.split.to_numpy()
    return pretrain_on(data, split == "train", split == "val", out_dir, params, mode, resume, progress)


def load_encoder(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder saved by ``pretrain`` (``encoder.pt``, or the directory holding it) and its checkpoint info."""
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"encoder {path}: no such file (give a pretrain output folder, or its {ENCODER_FILE})")
    ckpt = load_checkpoint(path, remedy=f"pretrain it again (`sonossl pretrain --out {path.parent}`) or restore it")
    encoder = build_encoder(ckpt["encoder"])
    encoder.load_state_dict(ckpt["state_dict"])
    return encoder, ckpt
