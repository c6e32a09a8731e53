"""Can the transform task be solved without any anatomy? White noise through the real pretext batch maker.

Frames of uniform white noise (no structure, no orientation) go through ``PretextBatchMaker`` of the profile's
``pretrain`` block (its crop, shift, transform sets), exactly as clips do in pretraining. From each warped clip,
seven texture statistics (its pixel variance and its normalised autocorrelation at six short lags) are computed,
and a logistic regression (5-fold cross-validation) names each transform factor from them. Chance is 1/3 per
factor. What it can name, the encoder can too, from the interpolation and the texture scale alone, without learning
the anatomy the task is meant to teach: rotation through the sub-pixel shift's blur (the identity's bilinear
weights are the same at every pixel, a rotation's are mixed) and scale and shear through the stretched texture.

With ``--frames-from data/clips/sim`` the clips are the clip dataset's own (K frames of one training video at the
profile's stride, random starts) instead of noise: how much the same statistics tell on the frames pretraining
sees, where the anatomy enters as well as the speckle.

    .venv/bin/python benchmarks/pretext_texture_probe.py [--profile default] [--clips 5120] [--frames-from DIR]
Writes benchmarks/results/pretext_texture_probe.json (pretext_texture_probe_<dataset>.json with --frames-from; or
--out); about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sonossl.atomic import atomic_write_text
from sonossl.config import load_params
from sonossl.machine import describe
from sonossl.data.clips import load_clip_dataset
from sonossl.pretext.batch import PretextBatchMaker, clip_starts
from sonossl.pretext.permutations import permutation_set
from sonossl.train.pretrain import frames_tensor, transform_set

REPO = Path(__file__).resolve().parents[1]
LAGS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0))


def texture_statistics(x: torch.Tensor) -> torch.Tensor:
    """(B, K, S, S) clips -> (B, 7): pixel variance and the autocorrelation at ``LAGS``, over all frames."""
    x = x - x.mean((2, 3), keepdim=True)
    var = (x * x).mean((1, 2, 3))
    s = x.shape[-1]
    stats = [var]
    for dy, dx in LAGS:
        a = x[..., dy:, max(dx, 0):s + min(dx, 0)]
        b = x[..., :s - dy, max(-dx, 0):s - max(dx, 0)]
        stats.append((a * b).mean((1, 2, 3)) / var)
    return torch.stack(stats, 1)


def main() -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--source", type=int, default=None,
                    help="frame side (default: the profile's preprocess.frame_size)")
    ap.add_argument("--clips", type=int, default=5120)
    ap.add_argument("--frames-from", type=Path, default=None,
                    help="a clip dataset (e.g. data/clips/sim): its training videos' clips instead of white noise")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    params = load_params(REPO / "params.yaml", args.profile)
    p = params.pretrain
    source = args.source or params.preprocess.frame_size
    starts = frames = None
    if args.frames_from is not None:
        if args.source is not None:
            raise SystemExit("--source: the frame side of noise; with --frames-from the clip dataset's frames decide")
        data = load_clip_dataset(args.frames_from)
        video = data.index["video_idx"].to_numpy()
        starts = clip_starts(video, p.k, p.stride)  # as pretraining takes them
        starts = starts[(data.index["split"] == "train").to_numpy()[starts]]
        if not len(starts):
            raise SystemExit(f"{args.frames_from}: no training video is long enough for one clip of "
                             f"{p.k} frames at stride {p.stride}")
        frames, source = frames_tensor(data), data.frames.shape[-1]
    out = args.out or REPO / "benchmarks/results" / (
        "pretext_texture_probe.json" if args.frames_from is None
        else f"pretext_texture_probe_{args.frames_from.name}.json")
    maker = PretextBatchMaker("transform", permutation_set(p.k, p.n_permutations, p.seed), transform_set(p),
                              source=source, crop=p.crop, max_shift=p.max_shift)
    gen = torch.Generator().manual_seed(0)
    stats, targets, drawn = [], [], set()
    for start in range(0, args.clips, 256):
        n = min(256, args.clips - start)
        if frames is None:
            clips = torch.randint(0, 256, (n, p.k, source, source), dtype=torch.uint8, generator=gen)
        else:
            first = torch.from_numpy(starts)[torch.randint(len(starts), (n,), generator=gen)]
            clips = frames[first[:, None] + p.stride * torch.arange(p.k)]
            drawn.update(video[first.numpy()].tolist())
        batch = maker(clips, gen)
        stats.append(texture_statistics(batch.transform_clips[:, :, 0]))
        targets.append(torch.stack([batch.targets[f] for f in maker.transforms.sizes], 1))
    x, t = torch.cat(stats).numpy(), torch.cat(targets).numpy()
    sizes = maker.transforms.sizes
    identity = dict(zip(sizes, maker.transforms.identity, strict=True))
    result = {"benchmark": "pretext_texture_probe", "machine": describe(), "profile": args.profile,
              "frames": "white noise" if args.frames_from is None else str(args.frames_from),
              "source": source, "crop": p.crop, "shift_px": round(float(maker.shift), 3), "clips": len(x),
              "features": ["variance"] + [f"autocorrelation {dy},{dx}" for dy, dx in LAGS], "accuracy": {}}
    if starts is not None:  # which clips it drew from: the training videos' valid starts, as pretraining
        result |= {"clip_starts": len(starts), "videos": sorted(int(v) for v in drawn)}
    for j, name in enumerate(sizes):
        clf = LogisticRegression(max_iter=5000)
        result["accuracy"][name] = {"all": round(float(cross_val_score(clf, x, t[:, j], cv=5).mean()), 3),
                                    "chance": round(1 / sizes[name], 3)}
        if name == "rotation":  # without the help of a shear, which stretches the texture too
            keep = t[:, list(sizes).index("shear")] == identity["shear"]
            result["accuracy"][name]["at_shear_0"] = round(float(cross_val_score(clf, x[keep], t[keep, j],
                                                                                 cv=5).mean()), 3)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
