"""The finetune step: downstream training from a pretrained encoder (or from scratch), at several label fractions.

At each fraction f, the first ceil(f * n) of the n training videos in one seeded order are labelled, so the 5 % videos
are among the 20 % ones. The order is balanced over the videos' main labels (a sweep's main standard plane:
``video_order``), and with ``every_main_label`` (the default) even the smallest fraction takes at least one video of
each: 5 % of 44 sweeps is 3 videos, which held background and abdomen frames only, so four of six classes were never
seen. For standard-plane detection (``task="planes"``):

- ``probe``: a linear probe, logistic regression (class-balanced, L2 strength chosen on the validation videos) on
  the frozen encoder's embeddings; folded into one ``nn.Linear`` so that it serves like any model;
- ``finetune``: the whole network (encoder + linear layer) trained with a class-balanced cross-entropy and batched
  augmentation (shift, zoom, flip, gain), the epoch with the best validation macro-F1 kept. The linear layer starts
  at random (``head_init: random``, the default) or from the linear probe of that encoder (``probe``: LP-FT, Kumar
  et al., ICLR 2022, against a random head's first gradients rewriting the pretrained features); a pretrained
  encoder trains at ``encoder_lr_scale`` times the learning rate (also in saliency fine-tunes), and with
  ``encoder_lr_decay`` d < 1 its stage k of n (the stem is stage 0) at d^(n-k) times that (layer-wise decay: the
  early, generic features change least); a scratch encoder always trains at the full rate, so the baseline is not
  slowed down by a rule meant for pretrained weights. With ``ema`` > 0 the epochs are validated, selected and kept
  as a moving average of the weights (``train.loop``; off by default: docs/EXPERIMENTS.md, no help at 5 %).

For saliency prediction (``task="saliency"``): the encoder plus a light decoder, trained end to end with the KL
divergence to the gaze density; the epoch with the best validation CC kept; scored with KLD, CC, NSS, SIM, AUC-Judd.

Selection uses the validation videos only; the test videos are scored once, at the end, for the report. They are
the test split of the clip dataset, or, with ``test_clips``, every labelled frame of an independent clip dataset
(``open_test_set``: the simulated pipeline scores 64 sweeps of other fetuses, where its own test split holds 10).
Outputs:
``metrics.json`` (every run: validation and test scores, per-class figures, confusion matrix), ``model.pt`` (the run
with the best validation score, for ``export``), ``runs/<method>@<fraction>/`` (checkpoints, dvclive curves).

    finetune("data/clips/sim", "models/finetune/ssl-planes", params.finetune, task="planes",
             encoder="models/pretrain/both-sequential")
    finetune(..., encoder=None, encoder_spec={"name": "resnet18", "width": 16})      # scratch
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sonossl.atomic import atomic_write_text
from sonossl.config import (AT_LEAST_1, FRACTIONS, NOT_NEGATIVE, POSITIVE, POSITIVES, FinetuneParams, as_dict,
                            check_ranges)
from sonossl.data.clips import ClipDataset, load_clip_dataset
from sonossl.evaluate.classification_metrics import classification_report
from sonossl.evaluate.saliency_metrics import EPS, saliency_scores
from sonossl.models.downstream import PlaneClassifier, PooledFeatures, SaliencyModel
from sonossl.models.encoder import Encoder, build_encoder
from sonossl.train.loop import (LoopParams, fingerprint, fit, load_best, require_one_process, save_checkpoint,
                                to_channels_last)
from sonossl.train.pretrain import frames_tensor, load_encoder, seed_for

log = logging.getLogger(__name__)

TASKS = ("planes", "saliency")
HEAD_INITS = ("probe", "random")
MODEL_FILE = "model.pt"
EVAL_BATCH = 256


# ------------------------------------------------------------------------------------------------ data selection


def video_strata(index, split: str = "train") -> dict[int, str]:
    """Each video's main label: the most frequent label among its frames other than ``background`` (ties: the first
    in sorted order); ``background`` when it has no other; ``unlabelled`` when none of its frames is labelled. For
    sweeps this is the standard plane the sweep was aimed at, as a study's metadata would record it; for videos with
    one label, that label."""
    rows = index[index.split == split]
    strata = {}
    for vid, labels in rows.groupby("video_idx", sort=True).label:
        counts = labels.dropna().astype(str).value_counts()
        planes = counts.drop("background", errors="ignore")
        best = planes if len(planes) else counts
        strata[int(vid)] = min(best.index, key=lambda c: (-best[c], c)) if len(best) else "unlabelled"
    return strata


def video_order(index, seed: int, split: str = "train") -> list[int]:
    """The training videos in a fixed order for labelling: round-robin over their main labels (``video_strata``),
    the labels in a seeded random order and the videos of each label shuffled, so every prefix is as balanced as it
    can be and the first ``len(strata)`` videos hold one video of each main label."""
    rng = np.random.default_rng(seed)
    by_stratum: dict[str, list[int]] = {}
    for vid, stratum in video_strata(index, split).items():
        by_stratum.setdefault(stratum, []).append(vid)
    names = [str(n) for n in rng.permutation(sorted(by_stratum))]
    queues = [[int(v) for v in rng.permutation(by_stratum[n])] for n in names]
    order = []
    for r in range(max((len(q) for q in queues), default=0)):
        order += [q[r] for q in queues if r < len(q)]
    return order


def labelled_videos(order: list[int], fraction: float, floor: int = 1) -> list[int]:
    """The labelled videos at ``fraction``: the first max(ceil(fraction * n), floor) of ``order`` (``floor``: the
    number of main labels, so that even the smallest fraction has a video of each; see ``FinetuneParams``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    return order[: max(1, floor, math.ceil(fraction * len(order)))]


def labelling_plan(index, params: FinetuneParams) -> tuple[list[int], int]:
    """(video order, floor) for ``labelled_videos``: the floor is one video per main label when
    ``params.every_main_label`` is set, else 1."""
    order = video_order(index, params.seed)
    return order, len(set(video_strata(index).values())) if params.every_main_label else 1


def class_list(index, where: str | Path = "the clip dataset") -> list[str]:
    """The sorted classes of ``index``'s labels; ValueError naming ``where`` with fewer than two."""
    labels = sorted(str(x) for x in index.label.dropna().unique())
    if len(labels) < 2:
        held = f"only {labels[0]!r}" if labels else "none (no `label` column in its labels.csv, or it is empty)"
        raise ValueError(f"{where}: classifying needs labels of at least 2 classes, and it has {held}: give "
                         "labels.csv a `label` per video (or per frame in an annotations file) of at least 2 classes")
    return labels


def class_balance(y: np.ndarray, n_classes: int, row_weights: np.ndarray | None = None) -> np.ndarray:
    """Per-class weights that give every class seen in ``y`` the same total weight (0 for unseen classes), counting
    each row by its weight where ``row_weights`` are given."""
    counts = np.bincount(y, weights=row_weights, minlength=n_classes).astype(np.float64)
    total = len(y) if row_weights is None else float(np.sum(row_weights))
    return np.where(counts > 0, total / (n_classes * np.where(counts > 0, counts, 1)), 0.0)


def balanced_weights(y: np.ndarray, n_classes: int, row_weights: np.ndarray | None = None) -> torch.Tensor:
    """``class_balance`` as the class-weighted cross-entropy's ``weight`` tensor."""
    return torch.tensor(class_balance(y, n_classes, row_weights), dtype=torch.float32)


# --------------------------------------------------------------------------------------------- augmentation


def augment_frames(x: torch.Tensor, gen: torch.Generator, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched shift (±6 %), zoom (0.9-1.1), horizontal flip and gain/offset of (B, 1, S, S) frames in [0, 1].

    Returns the frames and the (B, 2, 3) affine map (``affine_grid``'s theta, align_corners=False) they were sampled
    with, so that targets on the same field of view, such as saliency maps, follow them (``warp_like``).
    """
    b = len(x)
    zoom = 1 + 0.1 * (2 * torch.rand(b, generator=gen) - 1)
    sx = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = 0.06 * (2 * torch.rand(b, 2, generator=gen) - 1)
    theta = theta.to(x.device)
    x = warp_like(x, theta)
    gain = (1 + 0.2 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)).to(x.device)
    offset = (0.06 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)).to(x.device)
    return (x * gain + offset).clamp_(0, 1), theta


def warp_like(x: torch.Tensor, theta: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """(B, C, H, W) sampled under ``augment_frames``' affine map: in normalised coordinates (align_corners=False)
    the same map moves a frame and a map of any resolution over the same field of view alike. Frames repeat their
    edge where the view leaves them; a gaze map should take ``padding_mode="zeros"`` (nobody looked there)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode=padding_mode, align_corners=False)


def to_input(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) in [0, 1]: the encoder's input contract."""
    return frames_u8.float().div_(255.0).unsqueeze(1)


@torch.no_grad()
def predict(model: nn.Module, frames: torch.Tensor, rows: np.ndarray, device: torch.device,
            flip: bool = False) -> torch.Tensor:
    """Model outputs for ``frames[rows]`` (``flip``: mirrored left-right), in eval mode, batched, on CPU."""
    model.eval()

    def batch(i: int) -> torch.Tensor:
        x = to_input(frames[torch.as_tensor(rows[i:i + EVAL_BATCH])])
        return x.flip(-1) if flip else x

    outs = [model(batch(i).to(device)).float().cpu() for i in range(0, len(rows), EVAL_BATCH)]
    return torch.cat(outs) if outs else torch.zeros(0)


# ------------------------------------------------------------------------------------------------ training tasks


class _FrameTask:
    """Frames drawn with replacement from ``train_rows``, ``frames_per_epoch`` per epoch: uniformly, or with
    probabilities proportional to ``row_weights`` (one non-negative weight per training row)."""

    def __init__(self, model: nn.Module, frames: torch.Tensor, train_rows: np.ndarray, val_rows: np.ndarray,
                 params: FinetuneParams, encoder_lr_scale: float = 1.0, encoder_lr_decay: float = 1.0,
                 row_weights: np.ndarray | None = None):
        self.model, self.frames, self.params = model, frames, params
        self.train_rows, self.val_rows = np.asarray(train_rows), np.asarray(val_rows)
        self.encoder_lr_scale, self.encoder_lr_decay = encoder_lr_scale, encoder_lr_decay
        self.row_weights = None
        if row_weights is not None:
            w = np.asarray(row_weights, dtype=np.float64)
            if w.shape != self.train_rows.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"row_weights: {len(self.train_rows)} finite non-negative weights with a positive "
                                 f"sum expected (one per training row), got shape {w.shape}")
            self.row_weights = torch.from_numpy(w)

    def param_groups(self) -> list[dict[str, Any]]:
        """The encoder at ``encoder_lr_scale`` times the learning rate, its stage k of n (stem: 0) a further
        ``encoder_lr_decay ** (n - k)``; the head (or decoder) at the full rate."""
        encoder = self.model.encoder
        if self.encoder_lr_decay == 1.0:
            parts = [(list(encoder.parameters()), self.encoder_lr_scale)]
        else:
            n = len(encoder.stages)
            parts = [(list(m.parameters()), self.encoder_lr_scale * self.encoder_lr_decay ** (n - k))
                     for k, m in enumerate([encoder.stem, *encoder.stages])]
        enc = {id(p) for p in encoder.parameters()}
        parts.append(([p for p in self.model.parameters() if id(p) not in enc], 1.0))
        return [{"params": ps, "lr_scale": scale} for ps, scale in parts if ps]

    def steps_per_epoch(self, world: int) -> int:
        return max(1, self.params.frames_per_epoch // (self.params.batch_size * world))

    def batches(self, epoch: int, rank: int, world: int, device: torch.device):
        gen = torch.Generator().manual_seed(seed_for(self.params.seed, epoch, rank))
        for _ in range(self.steps_per_epoch(world)):
            pick = (torch.randint(len(self.train_rows), (self.params.batch_size,), generator=gen)
                    if self.row_weights is None else
                    torch.multinomial(self.row_weights, self.params.batch_size, replacement=True, generator=gen))
            rows = torch.from_numpy(self.train_rows)[pick]
            x, theta = augment_frames(to_input(self.frames[rows]).to(device), gen)
            yield x, rows, theta


class PlaneTask(_FrameTask):
    def __init__(self, model, frames, labels: np.ndarray, train_rows, val_rows, params, n_classes: int,
                 encoder_lr_scale: float = 1.0, encoder_lr_decay: float = 1.0, row_weights: np.ndarray | None = None):
        super().__init__(model, frames, train_rows, val_rows, params, encoder_lr_scale, encoder_lr_decay, row_weights)
        self.labels = torch.as_tensor(labels)
        self.n_classes = n_classes
        self.weights = balanced_weights(labels[train_rows], n_classes, row_weights)

    def loss(self, model, batch):
        x, rows, _ = batch
        y = self.labels[rows].to(x.device)
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, weight=self.weights.to(x.device))
        return loss, {"acc": float((logits.argmax(1) == y).float().mean())}

    def validate(self, model, device):
        if len(self.val_rows) == 0:
            return {}
        pred = predict(model, self.frames, self.val_rows, device).argmax(1).numpy()
        rep = classification_report(self.labels[self.val_rows].numpy(), pred, list(range(self.n_classes)))
        return {"macro_f1": rep["macro_f1"], "acc": rep["accuracy"]}


class SaliencyTask(_FrameTask):
    def __init__(self, model, frames, saliency: torch.Tensor, train_rows, val_rows, params,
                 encoder_lr_scale: float = 1.0, encoder_lr_decay: float = 1.0):
        super().__init__(model, frames, train_rows, val_rows, params, encoder_lr_scale, encoder_lr_decay)
        self.saliency = saliency

    def targets(self, rows: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The gaze maps of ``rows``, moved as their frames were (shift, zoom, flip: ``augment_frames``' ``theta``),
        each still a distribution: what leaves the view is dropped, not repeated from the edge, and the rest
        renormalised. In float32 also under the loop's autocast (bfloat16 grids move the maps)."""
        with torch.autocast(theta.device.type, enabled=False):
            target = warp_like(self.saliency[rows].to(theta.device)[:, None].float(), theta.float(), "zeros")[:, 0]
        return target / target.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]

    def loss(self, model, batch):
        x, rows, theta = batch
        target = self.targets(rows, theta)
        log_p = model(x).float()
        return -(target * log_p).flatten(1).sum(1).mean(), {}

    def validate(self, model, device):
        if len(self.val_rows) == 0:
            return {}
        log_p = predict(model, self.frames, self.val_rows, device)
        p = log_p.exp().flatten(1)
        g = self.saliency[torch.as_tensor(self.val_rows)].flatten(1)
        pc, gc = p - p.mean(1, keepdim=True), g - g.mean(1, keepdim=True)
        cc = (pc * gc).sum(1) / (pc.norm(dim=1) * gc.norm(dim=1)).clamp_min(1e-12)
        # KLD as saliency_metrics.kld scores it (both maps normalised, MATLAB's eps), so the curve and metrics.json's
        # val.kld are one measure; in float64, as there
        p64, g64 = p.double(), g.double()
        p64, g64 = p64 / p64.sum(1, keepdim=True), g64 / g64.sum(1, keepdim=True).clamp_min(1e-300)
        kld = (g64 * torch.log(EPS + g64 / (p64 + EPS))).sum(1)
        return {"cc": float(cc.mean()), "kld": float(kld.mean())}


# ---------------------------------------------------------------------------------------------- the runs


@dataclass
class LabelledFrames:
    data: ClipDataset
    frames: torch.Tensor
    classes: list[str]
    labels: np.ndarray  # class index per row, -1 where unlabelled
    split: np.ndarray
    video_idx: np.ndarray


def open_labelled(clips_dir: str | Path) -> LabelledFrames:
    """A clip dataset in memory with its class list and per-row class indices (-1 where unlabelled)."""
    data = load_clip_dataset(clips_dir)
    classes = class_list(data.index, clips_dir)
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup.get(str(v), -1) if v is not None else -1 for v in data.index.label], dtype=np.int64)
    return LabelledFrames(data, frames_tensor(data), classes, labels, data.index.split.to_numpy(),
                 data.index.video_idx.to_numpy())


@dataclass
class TestSet:
    """The frames the test scores come from (``open_test_set``)."""

    frames: torch.Tensor
    labels: np.ndarray  # index into ``classes``, -1 where unlabelled
    classes: list[str]  # the training dataset's classes (the model's outputs), then any the test set adds
    scored: np.ndarray  # bool per row: part of the test set
    saliency: np.ndarray | None
    has_saliency: np.ndarray
    info: dict[str, Any]  # where it comes from, for metrics.json

    def rows(self, saliency: bool = False) -> np.ndarray:
        """The scored rows that have a label (or, with ``saliency``, a saliency map)."""
        return np.flatnonzero(self.scored & (self.has_saliency if saliency else self.labels >= 0))


def open_test_set(d: LabelledFrames, test_clips: str | Path | None = None, task: str = "planes") -> TestSet:
    """The test split of ``d``, or every frame of the independent clip dataset ``test_clips``.

    An independent test set must be preprocessed like ``d`` (same frame size; for saliency, same map size: checked
    by the saliency runs), share at least one class with ``d``, and share no patient (by ``patient_id``) and no video
    (by content hash) with ``d``'s training and validation videos: each failure names the dataset. Its classes that
    ``d`` lacks are scored too (the model never predicts them, so their frames count as errors), with a warning
    for the ``planes`` task (the saliency task has no classes to predict)."""
    if test_clips is None:
        scored, t, labels, classes = d.split == "test", d, d.labels, d.classes
    else:
        t = open_labelled(test_clips)
        where = f"{t.data.path}: independent test set"
        if t.data.version == d.data.version:
            raise ValueError(f"{where}: it is the training clip dataset {d.data.path} itself (version "
                             f"{d.data.version}); give a dataset of other videos, or omit it to score the test split")
        if t.frames.shape[1:] != d.frames.shape[1:]:
            raise ValueError(f"{where}: frames of {tuple(t.frames.shape[1:])} pixels, the training clips "
                             f"{d.data.path} have {tuple(d.frames.shape[1:])}; preprocess both with the same "
                             "parameters")
        extra = sorted(set(t.classes) - set(d.classes))
        if len(extra) == len(t.classes):
            raise ValueError(f"{where}: none of its classes {t.classes} occurs in the training clips {d.data.path}, "
                             f"whose classes are {d.classes}")
        if extra and task == "planes":
            log.warning("%s: class(es) %s never occur in the training clips %s; the model cannot predict them, so "
                        "their frames count as errors", where, extra, d.data.path)
        # Patients by their id; videos by their bytes (a path names a file only inside its own dataset).
        used = [v for v in d.data.meta["videos"] if v["split"] in ("train", "val")]
        patients = {v["patient_id"] for v in used if v.get("patient_id")}
        digests = {d.data.meta["inputs"].get(v["path"]) for v in used} - {None}
        videos, digest_of = t.data.meta["videos"], t.data.meta["inputs"]
        for kind, shared in (("patient(s)", sorted({v["patient_id"] for v in videos if v.get("patient_id") in patients})),
                             ("video(s)", sorted(v["path"] for v in videos if digest_of.get(v["path"]) in digests))):
            if shared:
                raise ValueError(f"{where}: {kind} {shared[:5]}{' ...' if len(shared) > 5 else ''} also appear in the "
                                 f"training or validation videos of {d.data.path}")
        classes = d.classes + extra  # the model's outputs first: a prediction's index is its class here too
        to_test = np.array([classes.index(c) for c in t.classes] + [-1])
        labels, scored = to_test[t.labels], np.ones(len(t.labels), dtype=bool)  # -1 stays -1
    has = t.data.index.has_saliency.to_numpy() if t.data.saliency is not None else np.zeros(len(scored), bool)
    info = {"clips": str(t.data.path), "data_version": t.data.version,
            "split": "test" if test_clips is None else "all",
            "videos": int(len(np.unique(t.video_idx[scored]))), "frames": int(scored.sum())}
    return TestSet(t.frames, labels, classes, scored, t.data.saliency, has, info)


def _rows(d: LabelledFrames, videos: list[int] | None = None, split: str | None = None, need_label: bool = True) -> np.ndarray:
    mask = np.ones(len(d.labels), dtype=bool)
    if videos is not None:
        mask &= np.isin(d.video_idx, videos)
    if split is not None:
        mask &= d.split == split
    if need_label:
        mask &= d.labels >= 0
    return np.flatnonzero(mask)


def finetune_loop_params(params: FinetuneParams, epochs: int, select: str | None, stop_after: int = 0) -> LoopParams:
    return LoopParams(epochs=epochs, lr=params.lr, weight_decay=params.weight_decay,
                      warmup_epochs=params.warmup_epochs, seed=params.seed, amp=params.amp,
                      channels_last=params.channels_last, select=select, patience=params.patience,
                      stop_after=stop_after, ema=params.ema)


def _fresh_encoder(encoder: str | Path | None, encoder_spec: dict[str, Any] | None) -> tuple[Encoder, dict]:
    if encoder is not None:
        enc, ckpt = load_encoder(encoder)
        # the pretraining's own parameters travel with the model: the card names what built it, not the profile
        return enc, {"encoder": str(encoder), "pretext": ckpt.get("pretext", {}).get("mode"),
                     "pretrain_data_version": ckpt.get("data_version"), "pretrain_params": ckpt.get("params")}
    if encoder_spec is None:
        raise ValueError("finetune: give a pretrained encoder, or an encoder spec to train from scratch")
    return build_encoder(encoder_spec), {"encoder": None, "pretext": None}


@torch.no_grad()
def embed(encoder: Encoder, frames: torch.Tensor, rows: np.ndarray, device: torch.device,
          channels_last: bool = True, pool_stages: int = 1) -> np.ndarray:
    """Frozen features of ``frames[rows]``, as a ``PlaneClassifier`` with ``pool_stages`` feeds its head;
    ``channels_last`` converts the encoder (in place) to that memory format first, as training does (1.7x faster on
    a 2-core CPU)."""
    features = PooledFeatures(to_channels_last(encoder) if channels_last else encoder, pool_stages)
    return predict(features, frames, rows, device).numpy()


def linear_probe(z_train: np.ndarray, y_train: np.ndarray, z_val: np.ndarray, y_val: np.ndarray,
                 n_classes: int, cs: list[float], seed: int,
                 sample_weight: np.ndarray | None = None) -> tuple[nn.Linear, dict[str, Any]]:
    """Logistic regression on frozen embeddings, C picked by validation macro-F1, folded into an ``nn.Linear``.
    Classes are balanced; with ``sample_weight`` each training row counts by its weight (in the standardisation and
    the class balance too: weight 2 is the row given twice)."""
    from sklearn.linear_model import LogisticRegression

    balance: Any = "balanced"
    if sample_weight is None:
        mu, sd = z_train.mean(0), z_train.std(0) + 1e-6
    else:
        mu = np.average(z_train, axis=0, weights=sample_weight)
        sd = np.sqrt(np.average((z_train - mu) ** 2, axis=0, weights=sample_weight)) + 1e-6
        present = np.unique(y_train)
        # sklearn's "balanced" shares the weight among the classes present, class_balance among all n_classes:
        # rescaled, a class missing from training does not change the probe's effective L2 strength
        class_w = class_balance(y_train, n_classes, sample_weight) * n_classes / len(present)
        balance = {int(c): float(class_w[c]) for c in present}
    best = None
    for c in cs:
        clf = LogisticRegression(C=c, class_weight=balance, max_iter=3000, random_state=seed)
        clf.fit((z_train - mu) / sd, y_train, sample_weight=sample_weight)
        score = classification_report(y_val, clf.predict((z_val - mu) / sd), list(range(n_classes)))["macro_f1"] \
            if len(y_val) else 0.0
        if best is None or score > best[0]:
            best = (score, c, clf)
    score, c, clf = best
    layer = nn.Linear(z_train.shape[1], n_classes)
    weight = np.zeros((n_classes, z_train.shape[1]))
    bias = np.full(n_classes, -1e4)  # classes never seen in training are never predicted
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # binary: sklearn keeps one row for the positive class
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight[clf.classes_] = coef / sd
    bias[clf.classes_] = intercept - (coef / sd) @ mu
    layer.weight.data = torch.tensor(weight, dtype=torch.float32)
    layer.bias.data = torch.tensor(bias, dtype=torch.float32)
    return layer, {"C": c, "val_macro_f1": score}


def encoder_lr(params: FinetuneParams, pretrained: bool) -> dict[str, float]:
    """``encoder_lr_scale`` and ``encoder_lr_decay`` for a fine-tune task (keyword arguments): the profile's for a
    pretrained encoder, 1 for scratch."""
    return {"encoder_lr_scale": params.encoder_lr_scale if pretrained else 1.0,
            "encoder_lr_decay": params.encoder_lr_decay if pretrained else 1.0}


def finetune_classifier(encoder: Encoder, pretrained: bool, d: LabelledFrames, train_rows: np.ndarray,
                        val_rows: np.ndarray, params: FinetuneParams, run_dir: Path, device: torch.device,
                        resume: bool = False, progress: bool = True, run_id: str = "",
                        refit_epochs: int = 0, row_weights: np.ndarray | None = None) -> tuple[PlaneClassifier, dict]:
    """The ``finetune`` method: encoder + linear layer trained on ``train_rows``, the best validation epoch loaded.
    With ``head_init: probe`` the layer starts as the linear probe of ``encoder`` (LP-FT). ``row_weights``: the
    training frames are drawn with these probabilities (one per row of ``train_rows``), not uniformly, and the LP-FT
    probe weighs its rows by them too.

    ``refit_epochs`` > 0: a refit, with no validation (``val_rows`` empty): the first ``refit_epochs`` epochs of the
    schedule planned for ``params.epochs``, the last one kept; a run on the same encoder that selected its epoch on
    validation videos says how many (its ``best_epoch``). With ``head_init: probe`` give ``params.probe_c`` the one
    L2 strength that run chose (its ``head_C``)."""
    if refit_epochs and len(val_rows):
        raise ValueError("finetune_classifier: a refit (refit_epochs > 0) selects nothing; give no validation rows")
    n_cls = len(d.classes)
    model = PlaneClassifier(encoder, n_cls, pool_stages=params.pool_stages)
    extra: dict[str, Any] = {"head_init": params.head_init, **encoder_lr(params, pretrained)}
    if params.head_init == "probe":
        rows = np.concatenate([train_rows, val_rows])
        z = embed(encoder.to(device), d.frames, rows, device, params.channels_last, params.pool_stages)
        layer, info = linear_probe(z[:len(train_rows)], d.labels[train_rows], z[len(train_rows):], d.labels[val_rows],
                                   n_cls, params.probe_c, params.seed, sample_weight=row_weights)
        model.head[1] = layer
        extra["head_C"] = info["C"]
    task = PlaneTask(model, d.frames, d.labels, train_rows, val_rows, params, n_cls, **encoder_lr(params, pretrained),
                     row_weights=row_weights)
    loop = (finetune_loop_params(params, params.epochs, None, stop_after=refit_epochs) if refit_epochs
            else finetune_loop_params(params, params.epochs, "val_macro_f1"))
    res = fit(task, run_dir, loop, resume=resume, progress=progress, run_id=run_id)
    best = load_best(model, run_dir)
    return model, {**extra, "best_epoch": best["epoch"], "stopped_early": res.stopped_early, "history": res.history}


def _need_validation(d: LabelledFrames, val_rows: np.ndarray, what: str) -> None:
    """Every choice here (the probe's L2 strength, the fine-tune's epoch, the run exported) is made on the
    validation videos; without them each would silently fall on its first candidate (the first epoch's weights)."""
    if len(val_rows) == 0:
        raise ValueError(f"{d.data.path}: the validation split has no {what}, and the probe's strength, the epoch "
                         "and the exported run are chosen on it; preprocess with preprocess.split.val > 0 and "
                         "enough labelled videos (or patients) for each class to reach it")


def _plane_runs(d: LabelledFrames, out_dir: Path, params: FinetuneParams, make_encoder, pretrained: bool,
                fractions: list[float], methods: list[str], resume: bool, progress: bool, device: torch.device,
                run_key: str, test: TestSet) -> tuple[list[dict], dict]:
    order, floor = labelling_plan(d.data.index, params)
    n_cls = len(d.classes)
    val_rows, test_rows = _rows(d, split="val"), test.rows()
    _need_validation(d, val_rows, "labelled frames")
    runs, best_state = [], None
    probe_encoder, z_all = None, None
    for frac in fractions:
        vids = labelled_videos(order, frac, floor)
        train_rows = _rows(d, vids, "train")
        for method in methods:
            t0 = time.perf_counter()
            name = f"{method}@{frac:g}"
            if method == "probe":
                if probe_encoder is None:
                    torch.manual_seed(seed_for(params.seed, 1))  # a scratch probe: the same random encoder every run
                    probe_encoder = make_encoder().to(device)
                    needed = np.flatnonzero(d.labels >= 0)
                    z_all = np.zeros((len(d.labels), probe_encoder.pooled_dim(params.pool_stages)), dtype=np.float32)
                    z_all[needed] = embed(probe_encoder, d.frames, needed, device, params.channels_last,
                                          params.pool_stages)
                layer, info = linear_probe(z_all[train_rows], d.labels[train_rows], z_all[val_rows],
                                           d.labels[val_rows], n_cls, params.probe_c, params.seed)
                model = PlaneClassifier(probe_encoder, n_cls, pool_stages=params.pool_stages)
                model.head[1] = layer
                extra = {"C": info["C"]}
            else:
                torch.manual_seed(seed_for(params.seed, int(frac * 1000)))
                model, extra = finetune_classifier(make_encoder(), pretrained, d, train_rows, val_rows, params,
                                                   out_dir / "runs" / name, device, resume, progress,
                                                   fingerprint(run_key, name))
            model = model.to(device)
            val = classification_report(d.labels[val_rows], predict(model, d.frames, val_rows, device).argmax(1)
                                        .numpy(), d.classes) if len(val_rows) else None
            scores = classification_report(test.labels[test_rows], predict(model, test.frames, test_rows, device)
                                           .argmax(1).numpy(), test.classes) if len(test_rows) else None
            run = {"name": name, "method": method, "fraction": frac, "videos": len(vids),
                   "frames": int(len(train_rows)), "seconds": round(time.perf_counter() - t0, 1),
                   "val": val, "test": scores, **extra}
            runs.append(run)
            log.info("%s: val macro-F1 %s, test macro-F1 %s", name, val and val["macro_f1"],
                     scores and scores["macro_f1"])
            score = val["macro_f1"] if val else -1
            if best_state is None or score > best_state["score"]:
                best_state = {"score": score, "run": name,
                              "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return runs, best_state


def _saliency_runs(d: LabelledFrames, out_dir: Path, params: FinetuneParams, make_encoder, pretrained: bool,
                   fractions: list[float], resume: bool, progress: bool, device: torch.device,
                   run_key: str, test: TestSet) -> tuple[list[dict], dict]:
    if d.data.saliency is None:
        raise ValueError(f"{d.data.path}: no saliency maps in this clip dataset (preprocess takes them from the "
                         "`saliency` arrays of the raw dataset's annotations files); the saliency task needs them")
    saliency = torch.from_numpy(np.array(d.data.saliency, dtype=np.float32))
    has = d.data.index.has_saliency.to_numpy()
    order, floor = labelling_plan(d.data.index, params)
    out_size = saliency.shape[-1]
    val_rows = np.flatnonzero((d.split == "val") & has)
    _need_validation(d, val_rows, "frames with saliency maps")
    test_rows = test.rows(saliency=True)
    if test.info["split"] == "all" and (test.saliency is None or test.saliency.shape[1:] != saliency.shape[1:]):
        raise ValueError(f"{test.info['clips']}: independent test set: saliency maps of "
                         f"{None if test.saliency is None else tuple(test.saliency.shape[1:])}, the training clips "
                         f"{d.data.path} have {tuple(saliency.shape[1:])}; preprocess both with the same parameters")
    test_saliency = saliency if test.saliency is d.data.saliency else (
        torch.from_numpy(np.array(test.saliency, dtype=np.float32)) if len(test_rows) else None)
    runs, best_state = [], None
    for frac in fractions:
        vids = labelled_videos(order, frac, floor)
        train_rows = np.flatnonzero(np.isin(d.video_idx, vids) & (d.split == "train") & has)
        t0 = time.perf_counter()
        name = f"finetune@{frac:g}"
        torch.manual_seed(seed_for(params.seed, int(frac * 1000)))
        model = SaliencyModel(make_encoder(), out_size)
        task = SaliencyTask(model, d.frames, saliency, train_rows, val_rows, params, **encoder_lr(params, pretrained))
        res = fit(task, out_dir / "runs" / name, finetune_loop_params(params, params.saliency_epochs, "val_cc"), resume=resume,
                  progress=progress, run_id=fingerprint(run_key, name))
        best = load_best(model, out_dir / "runs" / name)
        model = model.to(device)

        def scores(frames: torch.Tensor, maps: torch.Tensor, rows: np.ndarray) -> dict[str, float] | None:
            if not len(rows):
                return None
            pred = predict(model, frames, rows, device).exp().numpy()
            return saliency_scores(pred, maps[torch.as_tensor(rows)].numpy())

        run = {"name": name, "method": "finetune", "fraction": frac, "videos": len(vids),
               "frames": int(len(train_rows)), "seconds": round(time.perf_counter() - t0, 1),
               "val": scores(d.frames, saliency, val_rows), "test": scores(test.frames, test_saliency, test_rows),
               "best_epoch": best["epoch"], "stopped_early": res.stopped_early, "history": res.history}
        runs.append(run)
        log.info("%s: val CC %s, test CC %s", name, run["val"] and run["val"]["cc"], run["test"] and run["test"]["cc"])
        score = run["val"]["cc"] if run["val"] else -1
        if best_state is None or score > best_state["score"]:
            best_state = {"score": score, "run": name, "out_size": out_size,
                          "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return runs, best_state


def check_finetune_params(params: FinetuneParams) -> None:
    check_ranges("finetune", params, {
        "fractions": FRACTIONS, "ablation_fractions": FRACTIONS, "saliency_fractions": FRACTIONS,
        "epochs": AT_LEAST_1, "saliency_epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE,
        "weight_decay": NOT_NEGATIVE, "warmup_epochs": NOT_NEGATIVE, "probe_c": POSITIVES,
        "frames_per_epoch": AT_LEAST_1})
    if params.head_init not in HEAD_INITS:
        raise ValueError(f"finetune.head_init: {params.head_init!r} is not one of {list(HEAD_INITS)}")
    if not params.encoder_lr_scale > 0:
        raise ValueError(f"finetune.encoder_lr_scale: must be positive, got {params.encoder_lr_scale}")
    if not 0 < params.encoder_lr_decay <= 1:
        raise ValueError(f"finetune.encoder_lr_decay: must be in (0, 1] (1 = every stage at the same rate), got "
                         f"{params.encoder_lr_decay}")
    if params.pool_stages < 1:
        raise ValueError(f"finetune.pool_stages: must be >= 1 (1 = the last stage only), got {params.pool_stages}")
    if params.patience < 0:
        raise ValueError(f"finetune.patience: must be >= 0 (0 = train every epoch), got {params.patience}")
    if not 0 <= params.ema < 1:
        raise ValueError(f"finetune.ema: must be in [0, 1) (0 = no weight average), got {params.ema}")


def check_pool_stages(encoder: Encoder, params: FinetuneParams) -> None:
    """Fail before any training when the encoder has fewer stages than ``finetune.pool_stages``."""
    try:
        encoder.pooled_dim(params.pool_stages)
    except ValueError as e:
        raise ValueError(f"finetune.{e}") from None


def _file_hash(path: str | Path | None) -> str | None:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


def finetune(clips_dir: str | Path, out_dir: str | Path, params: FinetuneParams, task: str = "planes",
             encoder: str | Path | None = None, encoder_spec: dict[str, Any] | None = None,
             fractions: list[float] | None = None, methods: tuple[str, ...] = ("probe", "finetune"),
             name: str | None = None, test_clips: str | Path | None = None, resume: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Train and score the downstream ``task`` from ``encoder`` (a pretrain output) or from scratch; the test scores
    come from ``test_clips`` (every labelled frame) when given, else from the test split of ``clips_dir``."""
    if task not in TASKS:
        raise ValueError(f"finetune task {task!r} is not one of {list(TASKS)}")
    require_one_process("finetune")
    check_finetune_params(params)
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = open_labelled(clips_dir)
    test = open_test_set(d, test_clips, task)  # fails early, naming the dataset, when it does not fit
    fresh, origin = _fresh_encoder(encoder, encoder_spec)  # fail early on a bad encoder
    if task == "planes":
        check_pool_stages(fresh, params)

    def make_encoder() -> Encoder:
        return _fresh_encoder(encoder, encoder_spec)[0]

    # what the encoder starts as: a pretrained one's file, or a scratch one's spec (its width and initialisation:
    # --resume must not continue a scratch run of another network)
    run_key = fingerprint(as_dict(params), task, d.data.version, origin,
                          _file_hash(Path(encoder) / "encoder.pt" if encoder and Path(encoder).is_dir() else encoder),
                          None if encoder else fresh.spec)
    if task == "planes":
        fractions = fractions or params.fractions
        runs, best = _plane_runs(d, out_dir, params, make_encoder, encoder is not None, fractions, list(methods),
                                 resume, progress, device, run_key, test)
    else:
        fractions = fractions or params.saliency_fractions
        runs, best = _saliency_runs(d, out_dir, params, make_encoder, encoder is not None, fractions, resume, progress,
                                    device, run_key, test)
    spec = dict(make_encoder().spec)
    metrics = {
        "name": name or out_dir.name, "task": task, "init": "scratch" if encoder is None else "pretrained",
        **origin, "data_version": d.data.version, "classes": d.classes if task == "planes" else None,
        "params": as_dict(params), "test_set": test.info, "runs": runs, "selected": best["run"],
        "selected_val": round(best["score"], 4),
    }
    save_checkpoint(out_dir / MODEL_FILE, {
        "task": task, "encoder": spec, "state_dict": best["state_dict"], "classes": d.classes,
        "saliency_size": best.get("out_size"), "run": best["run"], "data_version": d.data.version,
        "origin": origin, "val_score": best["score"],
        **({"pool_stages": params.pool_stages} if task == "planes" else {}),
    })
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
