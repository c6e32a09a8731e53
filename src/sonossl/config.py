"""Typed parameters, read from ``params.yaml``.

``params.yaml`` is the single place where a user changes a run. It holds named profiles (``tiny`` for tests,
``default`` for ``dvc repro`` on two cores, ``gpu`` for full size) and ``profile:`` picks the active one:

    params = load_params("params.yaml")               # the active profile
    params = load_params("params.yaml", profile="tiny")
    params.simulate.videos, params.preprocess.frame_size
    params.simulate_test                               # the independent test sweeps (None when not configured)

Unknown keys and wrongly typed values fail here, at load time, naming the file and the field.

Never name a parameter ``size`` or ``nfiles``: DVC 3.67 leaves keys with those names out of its run-cache key, so
changing one would make ``dvc repro`` restore a stale output from the run cache instead of rerunning the stage.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("tiny", "default", "gpu")


@dataclass(frozen=True)
class SimulateParams:
    """The fetal sweep simulator (see SIMULATOR.md and ``sonossl.data.simulate``)."""

    videos: int = 8  # number of sweeps, one virtual fetus each
    seconds: float = 10.0  # length of each sweep
    fps: float = 20.0  # frame rate of the written video
    height: int = 192  # frame height in pixels; the width is 4/3 of it (the overlay sits beside the fan)
    beams: int = 160  # beam lines across the sector (lateral sampling before scan conversion)
    samples: int = 288  # samples along each beam (axial sampling)
    saliency_size: int = 48  # side of the stored saliency maps, which cover the whole frame
    crf: int = 18  # H.264 quality (0 = lossless)
    # A scanner preset shift: added to every video's gain (dB). 0 for training data; other values render the same
    # kind of sweeps from a scanner set brighter or darker, to check that drift monitoring notices.
    gain_db: float = 0.0
    seed: int = 0
    workers: int = 0  # parallel processes; 0 = one per core


@dataclass(frozen=True)
class SplitParams:
    """Fractions of videos (or patients, where ``patient_id`` is given) per split; test takes the rest."""

    train: float = 0.7
    val: float = 0.15
    # Candidate assignments tried for per-class frame balance (``sonossl.data.clips.assign_splits``); 1 = the first
    # only (a plain stratified cut, blind to how many frames of each class a video holds).
    balance_tries: int = 256


@dataclass(frozen=True)
class PreprocessParams:
    """Raw videos -> clip dataset (see ``sonossl.data.clips``)."""

    frame_size: int = 112  # side of the square output frames
    fps: float | None = None  # resample to this frame rate; null keeps the source rate
    saliency_size: int = 32  # side of the stored saliency targets
    max_frames: int | None = None  # per video, after resampling; null keeps all
    blank_mean: float = 2.0  # a frame whose sector crop has a mean grey level below this (black) is dropped ...
    blank_std: float = 3.0  # ... and so is one whose grey-level standard deviation is below this (uniform)
    max_reject_fraction: float = 0.25  # fail when more than this share of the listed videos is unusable
    workers: int = 0  # parallel processes; 0 = one per core
    seed: int = 0  # split assignment
    split: SplitParams = field(default_factory=SplitParams)


@dataclass(frozen=True)
class EncoderParams:
    """The frame encoder (see ``sonossl.models.encoder``)."""

    name: str = field(default="resnet18", metadata={"choices": ("resnet18", "small_cnn")})
    width: int = 64  # channels of the first stage (64 = the standard ResNet-18)
    maxpool: bool = True  # the stem's max-pool; off doubles the feature-map size (for small frames)
    # how the convolutions start: torchvision (kaiming-normal, fan-out, as torchvision's ResNets) or pytorch
    # (PyTorch's layer default, kaiming-uniform a=sqrt(5), 1.7-2.5x smaller weights) for every convolution after
    # the stem; null: the network's own (resnet18 torchvision, small_cnn pytorch)
    init: str | None = field(default=None, metadata={"choices": (None, "torchvision", "pytorch")})


@dataclass(frozen=True)
class TransformParams:
    """Discrete sets of the transform task (see ``sonossl.pretext.transforms``)."""

    rotations: list[float] = field(default_factory=lambda: [-15.0, 0.0, 15.0])  # degrees
    scales: list[float] = field(default_factory=lambda: [1.0, 1.2, 1.4])  # zoom factors
    shears: list[float] = field(default_factory=lambda: [-8.0, 0.0, 8.0])  # degrees


@dataclass(frozen=True)
class LossWeights:
    order: float = 1.0
    transform: float = 1.0  # applied to the mean of the three transform heads' losses


@dataclass(frozen=True)
class PretrainParams:
    """Pretext pretraining (see ``sonossl.train.pretrain``); the mode is the stage's argument."""

    encoder: EncoderParams = field(default_factory=EncoderParams)
    k: int = 4  # frames per clip
    stride: int = 3  # frames between consecutive clip frames (of the clip dataset's frame rate)
    n_permutations: int | None = None  # order classes; null = all 12 for k=4, 24 Hamming-distant ones above
    crop: int = 64  # side of the network input, sampled inside the frame
    max_shift: float = 4.0  # crop-centre jitter, pixels
    transform: TransformParams = field(default_factory=TransformParams)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    epochs: int = 10
    # Epochs of every encoder of the pretext-mode ablation (`sonossl pretrain --budget ablation`: order only,
    # transform only, both-parallel and a both-sequential twin), so that the modes compare at one cost below the
    # pipeline's own encoder's; null = ``epochs``.
    ablation_epochs: int | None = None
    clips_per_epoch: int | None = None  # null = one clip per valid start in the training videos
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    val_clips: int = 512  # fixed held-out clips (validation videos) for pretext accuracy
    seed: int = 0
    amp: bool = True  # bfloat16 autocast, on GPU only
    channels_last: bool = True  # memory format, on GPU and CPU


@dataclass(frozen=True)
class FinetuneParams:
    """Downstream training (see ``sonossl.train.finetune``)."""

    fractions: list[float] = field(default_factory=lambda: [0.05, 0.2, 1.0])  # of the training videos, labelled
    ablation_fractions: list[float] = field(default_factory=lambda: [0.05])  # for the ablation encoders
    saliency_fractions: list[float] = field(default_factory=lambda: [0.2])
    every_main_label: bool = True  # each labelled subset holds at least one video per main label (train.finetune)
    epochs: int = 10
    saliency_epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    probe_c: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # inverse L2 strengths tried
    # Plane fine-tunes start their head from a random layer ("random") or from the linear probe ("probe": LP-FT).
    head_init: str = field(default="random", metadata={"choices": ("random", "probe")})
    # A pretrained encoder trains at this multiple of ``lr`` (the head and a decoder at ``lr``); scratch at ``lr``.
    encoder_lr_scale: float = 1.0
    # ... and its stage k of n (the stem is stage 0) at a further encoder_lr_decay ** (n - k): layer-wise decay.
    encoder_lr_decay: float = 1.0
    # The plane head (probe and fine-tune) sees the pooled outputs of the encoder's last this-many stages,
    # concatenated (``models.downstream.PooledFeatures``); 1 = the last stage's embedding only.
    pool_stages: int = 1
    frames_per_epoch: int = 2048  # labelled frames drawn per epoch (with replacement when fewer are labelled)
    patience: int = 0  # stop a fine-tune after this many epochs without a better validation score; 0 = never
    # Validate and keep a moving average of the weights (decay per step, ``train.loop``) instead of them; 0 = none.
    ema: float = 0.0
    # The scratch starting point's initialisation (``pretrain.encoder.init``'s choices): a random encoder of the
    # pretrained one's network, started this way; null: as ``pretrain.encoder.init`` (``scratch_spec``).
    scratch_init: str | None = field(default=None, metadata={"choices": (None, "torchvision", "pytorch")})
    seed: int = 0
    amp: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class ExportParams:
    """Choice of the served model and its reference statistics (see ``sonossl.export``)."""

    # plane-detection outputs, highest wins: it compares each finetune output's selected run (the one with the best
    # validation macro-F1 among its fractions and methods, whatever this says), not every run
    select_metric: str = field(default="val_macro_f1", metadata={"choices": (
        "val_macro_f1", "val_accuracy", "val_macro_precision", "val_macro_recall")})
    # saliency runs, highest wins (so not KLD, where lower is better)
    saliency_metric: str = field(default="val_cc", metadata={"choices": ("val_cc", "val_nss", "val_sim",
                                                                         "val_auc_judd")})
    embedding_dims: int = 16  # PCA dimensions of the logged / reference embeddings
    reference_frames: int = 2000  # training frames summarised in the reference statistics (at most)


@dataclass(frozen=True)
class CrossvalParams:
    """POCUS video classification, k-fold grouped by patient (see ``sonossl.train.crossval``)."""

    folds: int = 5
    frames_per_video: int = 32  # training frames per video: the probe's, evenly spaced; the fine-tune's per epoch
    # The fine-tune draws each epoch's frames from every frame of its training videos, each video equally likely
    # (frames_per_video per video and epoch on average); false: the same frames_per_video evenly spaced ones in every
    # epoch (the protocol until fresh_frames existed). The probe keeps the evenly spaced frames.
    fresh_frames: bool = True
    pretrain_epochs: int = 6
    pretrain_clips_per_epoch: int = 3000  # per fold (the pretrain section's other settings apply)
    finetune_epochs: int = 8
    # After the choice on the inner-validation videos, fit the probe (chosen L2 strength) and the fine-tune (chosen
    # number of epochs) again on the inner-train and inner-validation videos together, and score that model.
    refit: bool = True
    # Pretrain each fold's encoder on the inner-train and inner-validation videos together (unlabelled; the test fold
    # is still never seen), with no pretext validation left; false: inner-train only, validated on inner-validation.
    pretrain_on_validation: bool = True
    # Score every test frame as it is and mirrored left-right (the fine-tunes' augmentation flips frames), a frame's
    # probabilities the mean of the two; results.json keeps each scored model's accuracy both ways (``by_view``);
    # false: the frames alone.
    flip_test: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Params:
    profile: str
    simulate: SimulateParams
    preprocess: PreprocessParams
    datasets: dict[str, str]
    # Datasets (names under ``datasets``) that ``dvc repro`` trains on with the ``train-*`` stages: pretrain,
    # fine-tunes from it and from scratch (the planes task), evaluate and export, under models/datasets/<name>.
    train: list[str] = field(default_factory=list)
    # Datasets that ``dvc repro`` cross-validates with the ``train-crossval`` stage (``train.crossval``: k folds
    # grouped by patient, SSL against scratch), under models/datasets/<name>/crossval; they need ``patient_id`` and
    # ``label``. POCUS has its own ``crossval`` stage.
    crossval_datasets: list[str] = field(default_factory=list)
    # Datasets under ``train`` whose clips carry gaze maps: their ``train-*`` stages also fine-tune the saliency
    # task (``train-ssl-saliency``, ``train-scratch-saliency``), and evaluate and export include it.
    train_saliency: list[str] = field(default_factory=list)
    # The simulated test set: the ``simulate`` block with the ``simulate_test`` block's keys replaced (another seed,
    # so other fetuses; see params.yaml); None when the profile has no ``simulate_test`` block.
    simulate_test: SimulateParams | None = None
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    export: ExportParams = field(default_factory=ExportParams)
    crossval: CrossvalParams = field(default_factory=CrossvalParams)


class ParamsError(ValueError):
    pass


# Ranges of numeric settings, checked by the steps that use them (``check_ranges``): (test, what it requires).
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
AT_LEAST_2 = (lambda v: v >= 2, "at least 2")
POSITIVE = (lambda v: v > 0, "positive")
NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
FRACTIONS = (lambda v: len(v) > 0 and all(0 < f <= 1 for f in v) and len(set(v)) == len(v),
             "a non-empty list of distinct fractions in (0, 1]")
POSITIVES = (lambda v: len(v) > 0 and all(c > 0 for c in v), "a non-empty list of positive numbers")


def optional(rule: tuple[Any, str]) -> tuple[Any, str]:
    test, what = rule
    return (lambda v: v is None or test(v), f"null or {what}")


def check_ranges(section: str, params: Any, rules: dict[str, tuple[Any, str]]) -> None:
    """Raise ParamsError naming ``section.field`` for the first setting outside its range, before any work: a
    0 or an empty list would otherwise fail deep inside (a division by zero, an empty loop), naming nothing."""
    for name, (test, what) in rules.items():
        value = getattr(params, name)
        if not test(value):
            raise ParamsError(f"{section}.{name}: must be {what}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types; ``where`` names the place in the file."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{where}.{name}")
        choices = fields[name].metadata.get("choices")
        if choices and values[name] not in choices:
            shown = ", ".join("null" if c is None else repr(c) for c in choices)  # as YAML writes them
            raise ParamsError(f"{where}.{name}: {values[name]!r} is not one of [{shown}]")
    return cls(**values)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and _is_number(value):
                hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e-3)"
            raise ParamsError(f"{where}: expected a number, got {value!r}{hint}")
        if not math.isfinite(value):  # YAML's .nan and .inf: a NaN passes every range check (comparisons are False)
            raise ParamsError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ParamsError(f"{where}: expected text, got {'null' if value is None else type(value).__name__}")
        return str(value)
    raise ParamsError(f"{where}: unsupported parameter type {tp}")  # pragma: no cover


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one, so a second
    ``preprocess:`` block in a profile silently replaced the first, every key of it."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ParamsError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice in one mapping "
                                  f"(first on line {seen[key] + 1}); YAML would keep only the last")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


TOP_LEVEL = ("profile", "datasets", "train", "train_saliency", "crossval_datasets", *PROFILES)


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    path = Path(path)
    try:
        doc = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: parameter file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping of profiles and settings, got {type(doc).__name__}")
    unknown = sorted(str(k) for k in set(doc) - set(TOP_LEVEL))
    if unknown:
        raise ParamsError(f"{path}: unknown top-level key(s) {unknown}; valid keys are {list(TOP_LEVEL)}")
    profile = profile or doc.get("profile", "default")
    if profile not in PROFILES:
        raise ParamsError(f"{path}: profile {profile!r} is not one of {list(PROFILES)}")
    if profile not in doc:
        raise ParamsError(f"{path}: the active profile {profile!r} has no block in the file")
    block = doc[profile] or {}
    if not isinstance(block, dict):
        raise ParamsError(f"{path}: {profile}: expected a mapping of sections, got {type(block).__name__}")
    sections = {"simulate": SimulateParams, "preprocess": PreprocessParams, "pretrain": PretrainParams,
                "finetune": FinetuneParams, "export": ExportParams, "crossval": CrossvalParams}
    known = set(sections) | {"simulate_test"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ParamsError(f"{path}: {profile}: unknown section(s) {unknown}; valid sections are {sorted(known)}")
    built = {name: _build(cls, block.get(name), f"{path}: {profile}.{name}") for name, cls in sections.items()}
    if "simulate_test" in block:
        where = f"{path}: {profile}.simulate_test"
        changes = _build(SimulateParams, block["simulate_test"], where)  # checks names and types
        built["simulate_test"] = dataclasses.replace(
            built["simulate"], **{k: getattr(changes, k) for k in block["simulate_test"] or {}})
        if built["simulate_test"].seed == built["simulate"].seed:
            raise ParamsError(f"{where}.seed: must differ from simulate.seed ({built['simulate'].seed}), or the "
                              "test sweeps would show the training fetuses again")
    datasets = _coerce(dict[str, str], doc.get("datasets", {}), f"{path}: datasets")
    a_dataset = "is not a dataset; list it under `datasets:` ({listed}) so that preprocess@{name} builds its clips"
    train = _dataset_names(doc, "train", datasets, path, a_dataset)
    return Params(profile=profile, datasets=datasets, train=train,
                  crossval_datasets=_dataset_names(doc, "crossval_datasets", datasets, path, a_dataset),
                  train_saliency=_dataset_names(
                      doc, "train_saliency", train, path, "is not under `train:` ({listed}); list it there so that "
                      "train-pretrain@{name} pretrains the encoder its saliency task starts from"), **built)


def _dataset_names(doc: dict[str, Any], key: str, among: Iterable[str], path: Path, missing: str) -> list[str]:
    """The top-level list ``key`` of dataset names, each one of ``among`` (else ``missing``, formatted with the
    name and the listed names, says where to add it), none twice."""
    names = _coerce(list[str], doc.get(key) or [], f"{path}: {key}")
    among = list(among)
    for i, name in enumerate(names):
        if name not in among:
            raise ParamsError(f"{path}: {key}[{i}]: {name!r} "
                              + missing.format(name=name, listed=", ".join(among) or "none listed"))
        if name in names[:i]:
            raise ParamsError(f"{path}: {key}[{i}]: {name!r} is listed twice")
    return names


def train_tasks(params: Params, name: str) -> list[str]:
    """The downstream tasks the ``train-*`` stages train on the dataset ``name`` (under ``train:``): planes, and
    saliency when it is also under ``train_saliency:``."""
    if name not in params.train:
        listed = ", ".join(params.train) or "none listed"
        raise ParamsError(f"{name!r} is not under `train:` ({listed})")
    return ["planes", "saliency"] if name in params.train_saliency else ["planes"]


def as_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict view of a parameter dataclass, for ``meta.json`` and model cards."""
    return dataclasses.asdict(obj)


def task_fractions(finetune: FinetuneParams, task: str, which: str = "all") -> list[float]:
    """The label fractions a fine-tune trains at: ``all`` (the task's own list: ``fractions`` for planes,
    ``saliency_fractions`` for saliency), ``ablation`` (``ablation_fractions``) or fractions separated by commas
    (``0.05,0.2,1``); the ``--fractions`` of ``sonossl finetune`` and what a pipeline's finetune step trains."""
    if which == "all":
        return list(finetune.fractions if task == "planes" else finetune.saliency_fractions)
    if which == "ablation":
        return list(finetune.ablation_fractions)
    try:
        fractions = [float(x) for x in which.split(",")]
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions {which}: give all, ablation, or fractions of the training videos in (0, 1] "
                         "separated by commas, e.g. 0.05,0.2,1")
    if len(set(fractions)) < len(fractions):
        raise ValueError(f"--fractions {which}: a fraction given twice would train the same runs twice")
    return fractions


def scratch_spec(params: Params) -> dict[str, Any]:
    """The encoder spec scratch trains from random weights: ``pretrain.encoder``'s network, with
    ``finetune.scratch_init`` as its ``init`` when that is set (each starting point may take its own initialisation;
    docs/EXPERIMENTS.md, stop 44)."""
    spec = as_dict(params.pretrain.encoder)
    if params.finetune.scratch_init is not None:
        spec["init"] = params.finetune.scratch_init
    return spec
