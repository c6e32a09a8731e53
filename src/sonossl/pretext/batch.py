"""Clips for the pretext tasks: which frames form a clip, and the batched perturbations that make the targets.

A clip is K frames of one video, ``stride`` frames apart, in temporal order. ``PretextBatchMaker`` turns a batch of
such clips (uint8, on any device) into network inputs and targets in a few tensor operations, so the input
pipeline keeps up with the model:

- order: the clip is shuffled by a permutation class (or its reverse), target = the class;
- transform: one (rotation, scale, shear) per clip applied to all its frames, targets = the three indices;
- both-sequential: one clip carries both perturbations (one forward pass, all heads);
- both-parallel: two branches of the same clip, one shuffled only, one transformed only (two forward passes).

Every clip, whatever the task, is cropped the same way (a ``crop``-pixel square sampled inside the frame, its
centre moved by a uniform random shift of up to ``max_shift`` pixels per axis, not a whole number of pixels) and gets
one random gain and offset of its grey levels, so neither crop position, interpolation blur nor brightness says which
perturbation was applied. Nothing about frame index or file order
reaches the network: only pixels.

    starts = clip_starts(index, k=4, stride=3)                 # first-frame rows of every valid clip
    rows = starts[:, None] + 3 * np.arange(4)                  # (n, 4) rows of data.frames
    maker = PretextBatchMaker("both-sequential", permutation_set(4), TransformSet(), source=96, crop=64)
    batch = maker(torch.from_numpy(frames[rows[:32]]), torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from sonossl.pretext.transforms import TransformSet, warp_clips

log = logging.getLogger(__name__)

MODES = ("order", "transform", "both-sequential", "both-parallel")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"pretext mode {mode!r} is not one of {list(MODES)}")
    return mode


def clip_starts(video_idx: np.ndarray, k: int, stride: int) -> np.ndarray:
    """Rows (of a clip dataset, whose frames of one video are contiguous and in time order) where a clip can start.

    ``video_idx`` is the index's ``video_idx`` column, one entry per frame row (of the whole dataset). Only the rows
    of videos long enough for one clip of ``k`` frames at ``stride`` give starts.
    """
    if k < 1 or stride < 1:
        raise ValueError(f"clip length k={k} and stride={stride} must be positive")
    video_idx = np.asarray(video_idx)
    span = (k - 1) * stride
    if len(video_idx) <= span:
        return np.zeros(0, dtype=np.int64)
    rows = np.arange(len(video_idx) - span)
    return rows[video_idx[rows] == video_idx[rows + span]].astype(np.int64)


@dataclass
class PretextBatch:
    """Inputs (B, K, 1, crop, crop) float in [0, 1] and targets (B,) int64; None where the mode has no such task."""

    order_clips: torch.Tensor | None
    transform_clips: torch.Tensor | None
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        clips = self.order_clips if self.order_clips is not None else self.transform_clips
        return 0 if clips is None else len(clips)

    @property
    def same_clips(self) -> bool:
        """True when one clip carries both tasks (both-sequential): the model runs once."""
        return self.order_clips is not None and self.order_clips is self.transform_clips


class PretextBatchMaker:
    def __init__(self, mode: str, permutations: np.ndarray, transforms: TransformSet, source: int, crop: int,
                 max_shift: float = 4.0, gain: float = 0.2, offset: float = 0.08):
        self.mode = check_mode(mode)
        self.permutations = torch.as_tensor(np.asarray(permutations), dtype=torch.long)
        self.k = self.permutations.shape[1]
        self.transforms = transforms
        self.source, self.crop = source, crop
        room = transforms.max_shift(source, crop)
        if max_shift > room:
            log.warning("pretrain.max_shift=%g px: only %.2f px fit a %d px crop of %d px frames under every "
                        "transform; shifting by %.2f px (lower it, or the crop, to silence this)", max_shift, room,
                        crop, source, room)
        self.shift = min(max_shift, room)
        self.gain, self.offset = gain, offset
        self.identity = torch.tensor(transforms.identity)

    def __call__(self, clips: torch.Tensor, gen: torch.Generator) -> PretextBatch:
        """``clips`` (B, K, S, S) uint8 in temporal order -> perturbed inputs and targets (random draws from ``gen``)."""
        b, k, s, _ = clips.shape
        if k != self.k or s != self.source:
            raise ValueError(f"clips {tuple(clips.shape)} do not match K={self.k} frames of {self.source}px")
        device = clips.device
        x = clips.float()
        gain = (1 + self.gain * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)).to(device) / 255.0
        offset = (self.offset * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)).to(device)
        shift = self.shift * (2 * torch.rand(b, 2, generator=gen) - 1)
        targets: dict[str, torch.Tensor] = {}

        # The transform is the same for all frames of a clip, so warping first and shuffling the (smaller) crops
        # afterwards gives the same clips as the other way round, for less work; so does scaling grey levels last.
        perm = None
        if self.mode != "transform":
            cls = torch.randint(len(self.permutations), (b,), generator=gen)
            perm = self.permutations[cls]
            reverse = torch.rand(b, generator=gen) < 0.5
            perm = torch.where(reverse[:, None], perm.flip(-1), perm).to(device)
            targets["order"] = cls.to(device)
        tf = None
        if self.mode != "order":
            tf = torch.stack([torch.randint(n, (b,), generator=gen) for n in self.transforms.sizes.values()], 1)
            for j, name in enumerate(self.transforms.sizes):
                targets[name] = tf[:, j].to(device)
        ident = self.identity.expand(b, 3)

        def warp(idx: torch.Tensor, shuffle: bool) -> torch.Tensor:
            a = self.transforms.matrices(idx[:, 0], idx[:, 1], idx[:, 2])
            out = (warp_clips(x, a, shift, self.crop) * gain + offset).clamp_(0, 1)
            if shuffle:
                out = out.gather(1, perm[:, :, None, None].expand(-1, -1, self.crop, self.crop))
            return out.unsqueeze(2)

        if self.mode == "order":
            return PretextBatch(warp(ident, True), None, targets)
        if self.mode == "transform":
            return PretextBatch(None, warp(tf, False), targets)
        if self.mode == "both-sequential":
            both = warp(tf, True)
            return PretextBatch(both, both, targets)
        return PretextBatch(warp(ident, True), warp(tf, False), targets)
