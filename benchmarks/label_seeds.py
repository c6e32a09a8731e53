"""How much of the smallest-fraction result is the draw of labelled videos: SSL against scratch over several seeds.

The results table scores one draw (``finetune.seed``). At 5 % of the training videos only a handful are labelled, so
which ones, and the fine-tune's own randomness, move macro-F1 a lot. This reruns the smallest fraction of the
``ssl-planes`` and ``scratch@planes`` stages (linear probe and fine-tune, the profile's parameters) with seeds
0..n-1: each seed draws another set of labelled videos (still one per main plane) and another initialisation of the
head and the augmentation. Test macro-F1 per seed, the SSL - scratch differences, their median and range, and each
run's validation macro-F1 (``*_val``: the score that chose its epoch or L2 strength, the one to compare choices on
without looking at the test set). The test set is the pipeline's: the independent simulated sweeps
(``data/clips/sim_test``, stage ``simulate-test``), or with ``--split-test`` the test split of ``--clips`` (the 10
sweeps that earlier results were scored on).

    .venv/bin/python benchmarks/label_seeds.py [--seeds 5] [--profile default]      # after `dvc repro`
Writes benchmarks/results/label_seeds.json (or --out). The same comparison for other choices (docs/EXPERIMENTS.md,
the levers; the scratch side is the same unless ``--lr``, ``--head-init`` or the network changes: scratch trains
the compared encoder's own network, its width, from random weights, started as ``finetune.scratch_init`` says, or
as the compared encoder was when that is null or ``--scratch-init encoder`` is given):

    --encoder models/pretrain/order    another pretrain output (an ablation mode, or one of your own)
    --fraction 0.2                     another label fraction than the profile's smallest
    --lr 3e-4                          another fine-tune learning rate, for both initialisations
    --head-init probe --encoder-lr-scale 0.1
                                       LP-FT: both heads start from their linear probe, and the pretrained encoder
                                       trains at 0.1 x the rate (scratch stays at the full rate, so it changes too)
    --encoder-lr-decay 0.5             layer-wise decay: the pretrained encoder's stage k of n (stem 0) fine-tunes
                                       at 0.5^(n-k) x the rate (scratch stays at the full rate)
    --pool-stages 3                    probe and fine-tune heads on the last 3 encoder stages, pooled and
                                       concatenated (finetune.pool_stages), for both initialisations
    --ema 0.95                         fine-tunes validate and keep a moving average of their weights, this decay
                                       per step (finetune.ema), for both initialisations
    --pretrain-epochs 60               first pretrain a both-sequential encoder that long on the same training sweeps
    --pool-videos 128 [--pool-seed 2]  first simulate that many more sweeps (other fetuses: another simulator seed),
                                       unlabelled, and pretrain on them alone (the profile's epochs; an epoch is one
                                       clip per valid start, so it grows with the data)
    --pool-fps 5                       render the pool at this frame rate instead of the profile's (cheaper: the
                                       pretext stride is scaled to keep the same time between clip frames)
    --clips-per-epoch 1936             pretrain on this many clips per epoch (default: one per valid start), e.g.
                                       the pipeline's own count, to compare pools at equal pretraining cost
    --pretrain-lr 2e-3                 pretrain a both-sequential encoder at this peak learning rate (the profile's
                                       epochs and clips unless given), to compare rates at the pipeline's cost
    --pretrain-seed 1                  pretrain a both-sequential encoder with this seed (pretrain.seed: its
                                       initialisation, clips and held-out clips), to see how much of a gain is the
                                       one encoder the pipeline happened to build
    --pretrain-stride 24 [--pretrain-crop 48] [--pretrain-max-shift 0]
                                       pretrain a both-sequential encoder with another clip stride, network input
                                       (crop) or crop-centre jitter (pretrain.stride, .crop, .max_shift); a longer
                                       stride has fewer valid clips, so give --clips-per-epoch to hold the cost
    --pretrain-warmup 3                pretrain a both-sequential encoder with this many epochs of linear
                                       learning-rate warm-up (pretrain.warmup_epochs; the profile's 1)
    --encoder-init pytorch             a both-sequential encoder pretrained first with the profile's parameters
                                       from this initialisation (pretrain.encoder.init), to compare initialisations
                                       on the validation sweeps; scratch too only where finetune.scratch_init is
                                       null or --scratch-init encoder is given (the default profile's is
                                       torchvision)
    --scratch-init torchvision         the scratch encoder starts from this initialisation (finetune.scratch_init),
                                       whatever the pretrained one started from; "encoder": as that one did
    --save-encoder DIR                 keep the encoder built for the options above, to rerun other levers on
                                       it with --encoder DIR (the record still names how it was built)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sonossl.atomic import atomic_dir, atomic_write_text
from sonossl.config import (EncoderParams, Params, PretrainParams, SimulateParams, SplitParams, as_dict,
                            load_params, scratch_spec)
from sonossl.machine import describe
from sonossl.models import encoder as encoders
from sonossl.train.finetune import HEAD_INITS, check_finetune_params, finetune

ROOT = Path(__file__).resolve().parents[1]


def build_encoder(args: argparse.Namespace, params: Params, tmp: Path) -> Path:
    """The encoder to compare: ``--encoder`` as given, or one pretrained here for any of ``BUILD_OPTIONS``
    (``--pretrain-epochs``, ``--pretrain-lr``, ..., ``--pool-videos``)."""
    from sonossl.data.clips import preprocess
    from sonossl.data.simulate import simulate
    from sonossl.train.pretrain import pretrain

    if not builds(args):
        return args.encoder
    pre, sim = build_params(args, params)
    clips = args.clips
    if sim is not None:
        simulate(tmp / "pool-raw", sim)
        # unlabelled: no test split; a tenth of the sweeps hold out the pretext accuracy
        preprocess(tmp / "pool-raw", tmp / "pool-clips",
                   dataclasses.replace(params.preprocess, split=SplitParams(train=0.9, val=0.1)))
        clips = tmp / "pool-clips"
    pretrain(clips, tmp / "encoder", pre, mode="both-sequential")
    return tmp / "encoder"


def build_params(args: argparse.Namespace, params: Params) -> tuple[PretrainParams, SimulateParams | None]:
    """The pretraining parameters of the encoder ``build_encoder`` makes, and the simulation of its unlabelled pool
    (None: it pretrains on ``--clips``)."""
    given = {name: getattr(args, name) for name in PRETRAIN_FIELDS}
    pre = dataclasses.replace(params.pretrain, **{PRETRAIN_FIELDS[k]: v for k, v in given.items() if v is not None})
    if args.pool_videos is None:
        return pre, None
    taken = {params.simulate.seed} | ({params.simulate_test.seed} if params.simulate_test else set())
    if args.pool_seed in taken:
        raise SystemExit(f"--pool-seed {args.pool_seed} is the simulator seed of the training or test sweeps; the "
                         "pool must hold other fetuses")
    sim = dataclasses.replace(params.simulate, videos=args.pool_videos, seed=args.pool_seed)
    if args.pool_fps is not None:
        sim = dataclasses.replace(sim, fps=args.pool_fps)
        # the same time between clip frames as on the training clips (unless preprocess resamples both)
        ratio = (params.preprocess.fps or args.pool_fps) / (params.preprocess.fps or params.simulate.fps)
        pre = dataclasses.replace(pre, stride=max(1, round(pre.stride * ratio)))
    return pre, sim


BUILT_BY = "label_seeds_build.json"


def positive(option: str, value: float | None) -> None:
    """Stop, naming ``option``, unless ``value`` is None (not given) or above zero (also ``crossval_seeds.py``)."""
    if value is not None and not value > 0:
        raise SystemExit(f"{option}: must be positive, got {value}")


def at_least(option: str, value: float | None, low: float) -> None:
    """Stop, naming ``option``, unless ``value`` is None (not given) or at least ``low``."""
    if value is not None and value < low:
        raise SystemExit(f"{option}: must be at least {low}, got {value}")


def check_crops(option: str, pre: PretrainParams, crops: list[int], source: int) -> None:
    """Stop, naming ``option``, before any work if one of ``crops`` is too small to be a network input or too large
    for ``source``-pixel frames under ``pre``'s transform sets (the transformed crop would leave the frame); also
    ``pretext_rates.py``."""
    from sonossl.train.pretrain import transform_set

    for crop in crops:
        if crop < 8:
            raise SystemExit(f"{option}: must be at least 8, got {crop}")
        try:
            transform_set(pre).max_shift(source, crop)
        except ValueError as e:
            raise SystemExit(f"{option}: {e}") from None


# the options that set one parameter of the encoder ``build_encoder`` pretrains (as argparse names them), and which
PRETRAIN_FIELDS = {"pretrain_epochs": "epochs", "pretrain_lr": "lr", "pretrain_seed": "seed",
                   "pretrain_stride": "stride", "pretrain_crop": "crop", "pretrain_max_shift": "max_shift",
                   "pretrain_warmup": "warmup_epochs", "clips_per_epoch": "clips_per_epoch"}
# --scratch-init's value for "as the compared encoder started" (finetune.scratch_init null)
SAME_AS_ENCODER = "encoder"
# the options that make ``build_encoder`` pretrain an encoder here
BUILD_OPTIONS = (*PRETRAIN_FIELDS, "encoder_init", "pool_videos")


def builds(args: argparse.Namespace) -> bool:
    """Whether ``build_encoder`` pretrains an encoder here (otherwise ``--encoder`` is taken as given)."""
    return any(getattr(args, name) is not None for name in BUILD_OPTIONS)


def built_by(args: argparse.Namespace) -> dict:
    """How ``build_encoder`` made the encoder (all None for an ``--encoder`` taken as given)."""
    pooled = args.pool_videos is not None
    return {name: getattr(args, name) for name in BUILD_OPTIONS} | {
        "pool_seed": args.pool_seed if pooled else None, "pool_fps": args.pool_fps if pooled else None}


def draw_args(doc: str, scratch: bool = True) -> argparse.ArgumentParser:
    """The options of every benchmark over the labelled draws (also ``selection_oracle.py``; ``scratch``: the
    benchmark trains scratch too, and takes ``--scratch-init``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="draws first..first+n-1 (default 0; 0 is the pipeline's own draw)")
    ap.add_argument("--profile", default=None, help="params.yaml profile (default: the file's)")
    ap.add_argument("--clips", type=Path, default=ROOT / "data/clips/sim")
    ap.add_argument("--encoder", type=Path, default=ROOT / "models/pretrain/both-sequential")
    ap.add_argument("--test-clips", type=Path, default=ROOT / "data/clips/sim_test",
                    help="the independent test set (default: the pipeline's simulated test sweeps)")
    ap.add_argument("--split-test", action="store_true", help="score the test split of --clips instead")
    ap.add_argument("--encoder-lr-decay", type=float, default=None,
                    help="a pretrained encoder's layer-wise learning rate decay (default: the profile's; scratch: 1)")
    ap.add_argument("--ema", type=float, default=None,
                    help="fine-tunes validate and keep a moving average of their weights with this decay per step "
                         "(finetune.ema; both initialisations; default: the profile's)")
    if scratch:
        ap.add_argument("--scratch-init", choices=(*encoders.INITS, SAME_AS_ENCODER), default=None,
                        help="the scratch encoder's initialisation (finetune.scratch_init; default: the profile's; "
                             f"{SAME_AS_ENCODER}: as the compared encoder started)")
    return ap


def scratch_init_given(value: str | None) -> dict:
    """``--scratch-init``'s value as the finetune field to replace: none for None (the profile's), a null
    ``scratch_init`` for ``SAME_AS_ENCODER`` (scratch starts as the compared encoder), else the initialisation named
    (also ``crossval_seeds.py``)."""
    if value is None:
        return {}
    return {"scratch_init": None if value == SAME_AS_ENCODER else value}


def draw_params(args: argparse.Namespace, **options: object) -> Params:
    """The profile's parameters with the fine-tune options given on the command line replaced
    (``--encoder-lr-decay`` and ``--scratch-init`` of ``draw_args``, and the script's own as keywords; None keeps
    the profile's), checked with ``--seeds`` before any work."""
    at_least("--seeds", args.seeds, 1)
    params = load_params(ROOT / "params.yaml", args.profile)
    given = {"encoder_lr_decay": args.encoder_lr_decay, "ema": args.ema, **options}
    given = {k: v for k, v in given.items() if v is not None}
    given |= scratch_init_given(getattr(args, "scratch_init", None))
    params = dataclasses.replace(params, finetune=dataclasses.replace(params.finetune, **given))
    try:
        check_finetune_params(params.finetune)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return params


def scratch_twin(params: Params, encoder: Path | None, init: str | None = None) -> Params:
    """``params`` with ``pretrain.encoder`` the network compared, which scratch trains from random weights (started
    as ``finetune.scratch_init`` says when set: ``sonossl.config.scratch_spec``): the spec stored in ``encoder`` (a
    pretrain output: an encoder kept by ``--save-encoder --encoder-init pytorch`` has its scratch twin start as it
    did), or for an encoder pretrained here (None) the profile's, with ``init`` when given (also
    ``selection_oracle.py``)."""
    if encoder is not None:
        from sonossl.train.pretrain import load_encoder

        spec = EncoderParams(**load_encoder(encoder)[1]["encoder"])
    else:
        spec = dataclasses.replace(params.pretrain.encoder, **({"init": init} if init else {}))
    return dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, encoder=spec))


def test_clips(args: argparse.Namespace) -> Path | None:
    """The ``test_clips`` argument of ``finetune`` for these options: None scores the test split of ``--clips``."""
    if args.split_test:
        return None
    if not (args.test_clips / "meta.json").is_file():
        raise SystemExit(f"{args.test_clips}: no clip dataset; run `dvc repro` first (or pass --split-test)")
    given = args.test_clips.resolve()
    return given.relative_to(Path.cwd()) if given.is_relative_to(Path.cwd()) else given


def main() -> int:
    ap = draw_args(__doc__)
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="pretrain a both-sequential encoder first")
    ap.add_argument("--pretrain-lr", type=float, default=None,
                    help="pretrain a both-sequential encoder first, at this peak learning rate")
    ap.add_argument("--pretrain-seed", type=int, default=None,
                    help="pretrain a both-sequential encoder first, with this seed (default: the profile's)")
    ap.add_argument("--pretrain-stride", type=int, default=None,
                    help="pretrain a both-sequential encoder first, with this many frames between clip frames")
    ap.add_argument("--pretrain-crop", type=int, default=None,
                    help="pretrain a both-sequential encoder first, on network inputs of this side (pixels)")
    ap.add_argument("--pretrain-max-shift", type=float, default=None,
                    help="pretrain a both-sequential encoder first, with this crop-centre jitter (pixels)")
    ap.add_argument("--pretrain-warmup", type=float, default=None,
                    help="pretrain a both-sequential encoder first, with this many epochs of learning-rate warm-up")
    ap.add_argument("--pool-videos", type=int, default=None, help="pretrain first on this many new unlabelled sweeps")
    ap.add_argument("--pool-seed", type=int, default=2, help="simulator seed of the unlabelled sweeps")
    ap.add_argument("--pool-fps", type=float, default=None,
                    help="frame rate of the unlabelled sweeps (default: the profile's; the pretext stride follows)")
    ap.add_argument("--clips-per-epoch", type=int, default=None,
                    help="pretrain a both-sequential encoder first, on this many clips per epoch")
    ap.add_argument("--fraction", type=float, default=None,
                    help="label fraction to compare at (default: the profile's smallest)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tune learning rate (default: the profile's)")
    ap.add_argument("--head-init", choices=HEAD_INITS, default=None,
                    help="fine-tune head from the linear probe (LP-FT) or random (default: the profile's)")
    ap.add_argument("--encoder-lr-scale", type=float, default=None,
                    help="a pretrained encoder's learning rate multiple (default: the profile's; scratch: 1)")
    ap.add_argument("--pool-stages", type=int, default=None,
                    help="heads on the last N encoder stages, pooled (default: the profile's finetune.pool_stages)")
    ap.add_argument("--encoder-init", choices=encoders.INITS, default=None,
                    help="pretrain a both-sequential encoder first, from this initialisation (pretrain.encoder.init; "
                         "scratch follows it only under --scratch-init encoder or a null finetune.scratch_init)")
    ap.add_argument("--save-encoder", type=Path, default=None,
                    help="keep the encoder built for the pretraining options above (--pretrain-*, --clips-per-epoch, "
                         "--encoder-init, --pool-videos) in this directory, so that other levers can reuse it with "
                         "--encoder")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/label_seeds.json")
    args = ap.parse_args()
    if args.pool_fps is not None and args.pool_videos is None:
        raise SystemExit("--pool-fps: the frame rate of the unlabelled pool, so only with --pool-videos")
    positive("--pool-fps", args.pool_fps)
    at_least("--clips-per-epoch", args.clips_per_epoch, 1)
    positive("--pretrain-lr", args.pretrain_lr)
    at_least("--pretrain-stride", args.pretrain_stride, 1)
    at_least("--pretrain-max-shift", args.pretrain_max_shift, 0)
    at_least("--pretrain-warmup", args.pretrain_warmup, 0)
    if args.save_encoder is not None and not builds(args):
        *first, last = ("--" + name.replace("_", "-") for name in BUILD_OPTIONS)
        raise SystemExit(f"--save-encoder: only with {', '.join(first)} or {last} (otherwise --encoder is already a "
                         "directory)")
    if not builds(args) and not (args.encoder / "encoder.pt").is_file():
        raise SystemExit(f"{args.encoder}: no encoder.pt; run `dvc repro` first")

    params = draw_params(args, lr=args.lr, head_init=args.head_init, encoder_lr_scale=args.encoder_lr_scale,
                         pool_stages=args.pool_stages)
    params = scratch_twin(params, None if builds(args) else args.encoder, args.encoder_init)
    if args.pretrain_crop is not None:  # the pool is preprocessed as the profile says
        check_crops("--pretrain-crop", params.pretrain, [args.pretrain_crop], params.preprocess.frame_size)
    fraction = min(params.finetune.fractions) if args.fraction is None else args.fraction
    if not 0 < fraction <= 1:
        raise SystemExit(f"--fraction: must be in (0, 1], got {fraction}")
    rows, test_set = [], None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sonossl-label-seeds-") as tmp:
        encoder_dir = build_encoder(args, params, Path(tmp))
        if args.save_encoder is not None:
            with atomic_dir(args.save_encoder) as staging:
                shutil.copytree(encoder_dir, staging, dirs_exist_ok=True)
                atomic_write_text(staging / BUILT_BY, json.dumps(built_by(args)) + "\n")
            print(f"encoder kept in {args.save_encoder}", flush=True)
        pretext = json.loads((encoder_dir / "metrics.json").read_text()) \
            if (encoder_dir / "metrics.json").is_file() else {}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            ft = dataclasses.replace(params.finetune, seed=seed)
            row = {"seed": seed}
            for init, encoder in (("ssl", encoder_dir), ("scratch", None)):
                m = finetune(args.clips, Path(tmp) / f"{init}-{seed}", ft, task="planes", encoder=encoder,
                             encoder_spec=None if encoder else scratch_spec(params), fractions=[fraction],
                             test_clips=test_clips(args), progress=False)
                test_set = m["test_set"]
                for run in m["runs"]:
                    row[f"{init}_{run['method']}"] = run["test"]["macro_f1"]
                    row[f"{init}_{run['method']}_val"] = run["val"]["macro_f1"]
                    row["videos"] = run["videos"]
                    if "best_epoch" in run:  # which fine-tune epoch the validation videos chose, of how many
                        row[f"{init}_finetune_epoch"] = f"{run['best_epoch']}/{ft.epochs}"
            row["finetune_gain"] = round(row["ssl_finetune"] - row["scratch_finetune"], 4)
            row["probe_gain"] = round(row["ssl_probe"] - row["scratch_probe"], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)

    given = args.encoder.resolve()
    encoder_path = None if builds(args) else shown(args.encoder)
    # an encoder kept by --save-encoder says how it was built
    kept = given / BUILT_BY
    build = built_by(args) if builds(args) or not kept.is_file() else json.loads(kept.read_text())
    result = {
        "benchmark": "label_seeds", "profile": params.profile, "fraction": fraction, "lr": params.finetune.lr,
        "head_init": params.finetune.head_init, "encoder_lr_scale": params.finetune.encoder_lr_scale,
        "encoder_lr_decay": params.finetune.encoder_lr_decay,
        "pool_stages": params.finetune.pool_stages, "ema": params.finetune.ema,
        "encoder_spec": encoders.build_encoder(as_dict(params.pretrain.encoder)).spec,  # SSL's
        "scratch_spec": encoders.build_encoder(scratch_spec(params)).spec,
        "encoder": {"path": encoder_path, **build,
                    **{k: pretext.get(k) for k in ("mode", "epochs", "train_clips", "data_version", "val")}},
        "test_set": test_set, "labelled_videos": rows[0]["videos"], "seeds": [r["seed"] for r in rows],
        "per_seed": rows,
        **summarise(rows),
        "target": "SSL fine-tune macro-F1 at least 0.10 above scratch at the smallest fraction"
        if fraction == min(params.finetune.fractions) else None,
    }
    return finish(result, args.out, t0)


def shown(path: Path) -> str:
    """``path`` as a record names it: relative to the repository when inside it (also ``encoder_pairs.py``)."""
    given = path.resolve()
    return str(given.relative_to(ROOT) if given.is_relative_to(ROOT) else given)


def spread(values: list[float]) -> dict[str, float]:
    """Median (4 decimals), min and max of per-seed values (also used by ``crossval_seeds.py``)."""
    return {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}


VAL_KEYS = ("ssl_finetune_val", "scratch_finetune_val", "ssl_probe_val", "scratch_probe_val")


def summarise(rows: list[dict]) -> dict:
    """Median, min and max over the seeds of each SSL / scratch score and gain, and of each validation score
    (``VAL_KEYS``) every row has, and in how many seeds the fine-tune gain is positive (also used by
    ``crossval_seeds.py``)."""
    keys = ("ssl_finetune", "scratch_finetune", "finetune_gain", "ssl_probe", "scratch_probe", "probe_gain",
            *(k for k in VAL_KEYS if all(k in r for r in rows)))
    return {**{k: spread([r[k] for r in rows]) for k in keys},
            "finetune_gain_positive_in": f"{sum(r['finetune_gain'] > 0 for r in rows)}/{len(rows)} seeds"}


def finish(result: dict, out: Path, t0: float, quiet: bool = False) -> int:
    """Add the minutes since ``t0`` and the machine to ``result``, write it to ``out`` (atomically) and, unless
    ``quiet``, print it without its per-seed rows; also used by ``selection_oracle.py`` and ``crossval_seeds.py``."""
    result |= {"minutes": round((time.perf_counter() - t0) / 60, 1),
               "machine": describe()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if not quiet:
        print(json.dumps({k: v for k, v in result.items() if k != "per_seed"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
