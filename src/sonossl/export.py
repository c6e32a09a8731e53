"""The export step: choose the model to serve and write it with its model card and reference statistics.

From the finetune outputs it takes the plane-detection model with the best validation score (``select_metric``,
validation macro-F1 by default: the test videos play no part in the choice) and the best saliency model
(``saliency_metric``) where there is one (a dataset without gaze maps has none: the model then predicts classes and
embeddings only, and its card says so; ``tasks`` chooses, as the ``train-export`` stages do for your datasets),
and writes ``<out>/``:

- ``model.pt``: the networks (spec + weights), the classes, the PCA that reduces embeddings for logging, and the
  input contract; loads with ``weights_only=True`` through ``load_bundle``;
- ``model_card.json`` / ``model_card.md``: model version, clip dataset (feature) version, raw data version, the
  parameters, validation and test metrics, classes, lineage, and the input contract for serving;
- ``reference/``: the training data as the model saw it, for drift monitoring: ``embeddings.npy`` (PCA-reduced),
  ``image_stats.parquet`` (``sonossl.monitor.image_stats``), ``labels.npy`` and ``videos.npy`` (each frame's
  video); and the same for frames of the videos it never trained on, validation and test (``heldout_*``):
  ``sonossl.monitor.drift`` draws windows of whole videos from them to learn how far new videos from the training
  source lie from the reference.

Versions: the feature version is the clip dataset's; the raw version is a hash of the raw inputs listed in its
``meta.json`` (the sha256 of labels.csv and of every listed file: sonossl's own id, not DVC's directory hash; DVC's
``dvc.lock`` ties that folder's md5 to the clip dataset it built); the model version is a hash of the feature
version, the parameters each model was trained with (as its own outputs recorded them) and the export's, and the
weights.

    card = export("data/clips/sim", "models/finetune", "models/export", params)
    bundle = load_bundle("models/export");  out = bundle.predict(frames_u8)   # probs, saliency, embedding
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonossl import __version__
from sonossl.atomic import atomic_dir
from sonossl.config import Params, as_dict
from sonossl.data.clips import load_clip_dataset
from sonossl.evaluate.report import describe_test_set
from sonossl.models.downstream import PlaneClassifier, SaliencyModel
from sonossl.models.encoder import build_encoder
from sonossl.monitor.image_stats import image_stats
from sonossl.train.finetune import EVAL_BATCH, to_input
from sonossl.train.loop import load_checkpoint

BUNDLE_FILE = "model.pt"
BUNDLE_FORMAT = 1
HELDOUT_SPLITS = ("val", "test")  # videos never trained on: drift thresholds are learnt from windows of them


def _candidates(finetune_dir: Path, task: str, metric: str, data_version: str,
                required: bool = True) -> list[tuple[float, str, Path, dict]]:
    """The ``task``'s finetune outputs under ``finetune_dir``, best validation ``metric`` first; each must have been
    trained on the clip dataset of version ``data_version`` (another dataset's scores are on other validation
    videos, and its model would be shipped under this dataset's lineage)."""
    found = []
    for mpath in sorted(finetune_dir.glob("*/metrics.json")):
        m = json.loads(mpath.read_text())
        if m["task"] != task:
            continue
        if m.get("data_version") != data_version:
            raise ValueError(f"{mpath}: fine-tuned on clip dataset version {m.get('data_version')!r}, not the "
                             f"exported clips' {data_version!r}: fine-tune it again on these clips, or remove "
                             f"{mpath.parent} from {finetune_dir}")
        key = metric.removeprefix("val_")
        selected = next(r for r in m["runs"] if r["name"] == m["selected"])
        if not selected.get("val") or key not in selected["val"]:
            raise ValueError(f"{mpath}: the selected run has no validation {key!r}; valid metrics are "
                             f"{sorted('val_' + k for k in (selected.get('val') or {}) if k != 'per_class')}")
        found.append((float(selected["val"][key]), mpath.parent.name, mpath.parent / "model.pt", m))
    if not found and required:
        raise FileNotFoundError(f"{finetune_dir}: no finetune output for the {task} task")
    return sorted(found, key=lambda c: -c[0])


def _weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Bundle:
    """An exported model in memory: ``predict`` takes preprocessed uint8 frames (N, S, S); ``saliency`` is None
    for a model exported without one (then ``predict`` has no ``saliency``)."""

    planes: PlaneClassifier
    saliency: SaliencyModel | None
    classes: list[str]
    pca_mean: np.ndarray
    pca_components: np.ndarray
    card: dict[str, Any]

    @property
    def frame_size(self) -> int:
        return int(self.card["input"]["frame_size"])

    @property
    def device(self) -> torch.device:
        return next(self.planes.parameters()).device

    def to(self, device: str | torch.device) -> Bundle:
        """Move the models to ``device`` (a GPU node serves on ``cuda``); ``predict`` follows them."""
        self.planes.to(device)
        if self.saliency is not None:
            self.saliency.to(device)
        return self

    @torch.no_grad()
    def predict(self, frames: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        frames = torch.as_tensor(np.asarray(frames))
        if frames.dtype != torch.uint8 or frames.ndim != 3:
            raise ValueError(f"frames must be uint8 (N, H, W), got {frames.dtype} {tuple(frames.shape)}")
        outs: dict[str, list[np.ndarray]] = {"probs": [], "embedding": []}
        if self.saliency is not None:
            outs["saliency"] = []
        device = self.device
        for i in range(0, len(frames), EVAL_BATCH):
            x = to_input(frames[i:i + EVAL_BATCH]).to(device)
            features = self.planes.features(x)
            emb = features[:, -self.planes.encoder.dim:]
            outs["probs"].append(torch.softmax(self.planes.head(features), 1).cpu().numpy())
            if self.saliency is not None:
                outs["saliency"].append(self.saliency(x).exp().cpu().numpy())
            outs["embedding"].append(emb.cpu().numpy())
        res = {k: np.concatenate(v) for k, v in outs.items()}
        res["embedding_reduced"] = self.reduce(res["embedding"])
        res["label"] = np.array(self.classes)[res["probs"].argmax(1)]
        return res

    def reduce(self, emb: np.ndarray) -> np.ndarray:
        return ((emb - self.pca_mean) @ self.pca_components.T).astype(np.float32)


def plane_model(entry: dict[str, Any], n_classes: int) -> PlaneClassifier:
    """The plane classifier of a finetune ``model.pt`` or of a bundle's ``planes`` entry (``encoder`` spec,
    ``state_dict``, ``pool_stages``: 1 where an older file lacks it), in eval mode."""
    planes = PlaneClassifier(build_encoder(entry["encoder"]), n_classes, pool_stages=int(entry.get("pool_stages", 1)))
    planes.load_state_dict(entry["state_dict"])
    return planes.eval()


def load_bundle(path: str | Path) -> Bundle:
    """Load ``model.pt`` (and the model card) from an export folder, or from ``/mnt/models`` in KServe."""
    path = Path(path)
    ckpt = load_checkpoint(path / BUNDLE_FILE if path.is_dir() else path)
    if ckpt.get("bundle_format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: not an exported sonossl model (bundle format {BUNDLE_FORMAT})")
    planes = plane_model(ckpt["planes"], len(ckpt["classes"]))
    sal = None
    if ckpt.get("saliency") is not None:
        sal = SaliencyModel(build_encoder(ckpt["saliency"]["encoder"]), int(ckpt["saliency"]["out_size"]))
        sal.load_state_dict(ckpt["saliency"]["state_dict"])
        sal.eval()
    return Bundle(planes, sal, list(ckpt["classes"]), ckpt["pca_mean"].numpy(), ckpt["pca_components"].numpy(),
                  json.loads(ckpt["card"]))


def _trained_with(ckpt: dict[str, Any], metrics: dict[str, Any], params: Params) -> dict[str, Any]:
    """The pretraining and fine-tuning parameters a finetune output was made with: the encoder's (recorded in its
    ``origin`` since pretrain_params existed; null for scratch) and the fine-tune's (its metrics.json); the
    profile's where an older output lacks them."""
    origin = ckpt.get("origin", {})
    pretrain = origin.get("pretrain_params") if "pretrain_params" in origin else (
        as_dict(params.pretrain) if origin.get("encoder") else None)
    return {"pretrain": pretrain, "finetune": metrics.get("params", as_dict(params.finetune))}


def _raw_version(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta.get("inputs", {}), sort_keys=True).encode()).hexdigest()[:12]


def _card_markdown(card: dict[str, Any]) -> str:
    m, has_saliency = card["metrics"], card.get("saliency") is not None
    tasks = "saliency prediction and frame embeddings" if has_saliency else "frame embeddings (no saliency model)"
    lines = [f"# Model card: sonossl {card['model_version']}", "",
             f"Classification of ultrasound frames ({', '.join(card['classes'])}; the `planes` task), {tasks}, "
             "from a self-supervised encoder (Jiao et al., ISBI 2020).", "",
             "## Versions and lineage", "",
             f"- model version: `{card['model_version']}` (sonossl {card['sonossl_version']})",
             f"- clip dataset (feature) version: `{card['data']['feature_version']}`",
             f"- raw data version: `{card['data']['raw_version']}` ({card['data']['videos']} videos, "
             f"{card['data']['frames']} frames)",
             f"- plane model: `{card['planes']['source']}` run `{card['planes']['run']}` "
             f"(encoder: {card['planes']['origin'].get('pretext') or 'scratch'})",
             *([f"- saliency model: `{card['saliency']['source']}` run `{card['saliency']['run']}`"]
               if has_saliency else []), "",
             "## Metrics (test videos; selection on validation videos only)", "",
             *(f"- test set ({task}): {describe_test_set(t)}" for task, t in card.get("test_set", {}).items() if t),
             (f"- classification (planes): macro-F1 {m['planes']['test']['macro_f1']}, accuracy "
              f"{m['planes']['test']['accuracy']} (validation macro-F1 {m['planes']['val']['macro_f1']})"
              if m["planes"].get("test") else
              f"- classification (planes): no test videos were scored (validation macro-F1 "
              f"{m['planes']['val']['macro_f1']}, accuracy {m['planes']['val']['accuracy']})"),
             *(["- saliency: " + ", ".join(f"{k} {v}" for k, v in m["saliency"]["test"].items() if k != "n")]
               if has_saliency and m["saliency"].get("test") else []), "",
             "## Input contract", "",
             *(f"- {k}: {v}" for k, v in card["input"].items()), "",
             "## Output", "", *(f"- {k}: {v}" for k, v in card["output"].items()), "",
             "## Reference statistics", "",
             f"- {card['reference']['frames']} training frames: PCA-{card['reference']['embedding_dims']} embeddings "
             f"and image statistics ({', '.join(card['reference']['image_stats'])})",
             f"- {card['reference']['heldout_frames']} frames of the validation and test videos (never trained on), "
             "the same statistics: how far "
             "new videos from the training source lie from the reference (drift thresholds are set from them)", ""]
    return "\n".join(lines)


def export(clips_dir: str | Path, finetune_dir: str | Path, out_dir: str | Path, params: Params,
           progress: bool = True, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """``tasks``: the tasks to bundle, ``planes`` among them; with ``saliency`` a saliency run must exist. None:
    the planes model, and a saliency model when ``finetune_dir`` holds a saliency run."""
    ep = params.export
    finetune_dir, out_dir = Path(finetune_dir), Path(out_dir)
    if tasks is not None and ("planes" not in tasks or not set(tasks) <= {"planes", "saliency"}):
        raise ValueError(f"tasks {list(tasks)}: export bundles planes (the served classifier) and optionally saliency")
    data = load_clip_dataset(clips_dir)
    planes_score, planes_src, planes_path, planes_m = _candidates(finetune_dir, "planes", ep.select_metric,
                                                                  data.version)[0]
    saliency = None
    if tasks is None or "saliency" in tasks:
        saliency = next(iter(_candidates(finetune_dir, "saliency", ep.saliency_metric, data.version,
                                         required=tasks is not None)), None)
    pck = load_checkpoint(planes_path)
    sck = load_checkpoint(saliency[2]) if saliency else None
    planes = plane_model(pck, len(pck["classes"]))

    # reference: training frames, evenly spaced, as the model sees them; held-out: the same from the videos it never
    # trained on (validation and test), which drift calibration draws its windows of unseen videos from
    idx = data.index
    videos = {v["video_idx"]: v for v in data.meta.get("videos", [])}

    def source_size(video: int) -> tuple[int, int]:  # (height, width) of the video before preprocessing
        v = videos.get(int(video), {})
        return int(v.get("height", data.frames.shape[1])), int(v.get("width", data.frames.shape[2]))

    def sample(splits: tuple[str, ...], n: int) -> tuple[np.ndarray, np.ndarray, Any]:
        rows = np.flatnonzero(idx.split.isin(splits).to_numpy())
        pick = rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]
        frames = np.asarray(data.frames[pick])
        with torch.no_grad():
            emb = [planes.encoder(to_input(torch.from_numpy(frames[i:i + EVAL_BATCH]))).numpy()
                   for i in range(0, len(frames), EVAL_BATCH)]
        source_hw = np.array([source_size(v) for v in idx.video_idx.to_numpy()[pick]]).reshape(-1, 2)
        return pick, (np.concatenate(emb) if emb else np.zeros((0, planes.encoder.dim), np.float32)), \
            image_stats(frames, source_hw)

    pick, emb, stats = sample(("train",), ep.reference_frames)
    held_pick, held_emb, held_stats = sample(HELDOUT_SPLITS, max(1, ep.reference_frames // 2))
    dims = min(ep.embedding_dims, emb.shape[1], len(emb))
    mean = emb.mean(0)
    _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
    components = vt[:dims].astype(np.float32)
    reduced = ((emb - mean) @ components.T).astype(np.float32)

    weights = _weights_hash(pck["state_dict"]) + (_weights_hash(sck["state_dict"]) if sck else "")
    # What trained each model, as its own outputs recorded it (a pipeline's overrides or an ablation encoder's
    # epochs differ from the profile); the clips' preprocessing as their meta.json says.
    trained = {"preprocess": data.meta.get("params", as_dict(params.preprocess)),
               **_trained_with(pck, planes_m, params), "export": as_dict(ep)}
    sal_trained = _trained_with(sck, saliency[3], params) if sck is not None else None
    # the export parameters too: they decide the bundle's PCA (the served embedding_reduced) and drift references
    model_version = hashlib.sha256(json.dumps(
        [data.version, trained, sal_trained, weights], sort_keys=True).encode()
    ).hexdigest()[:12]
    sel = lambda m: next(r for r in m["runs"] if r["name"] == m["selected"])  # noqa: E731
    pr = sel(planes_m)
    sal_card, sal_metrics, sal_output, sal_bundle, sal_test = None, None, {}, None, None
    if sck is not None:
        sal_score, sal_src, _, sal_m = saliency
        sr = sel(sal_m)
        sal_card = {"source": sal_src, "run": sck["run"], "origin": sck.get("origin", {}),
                    "select_metric": ep.saliency_metric, "select_value": sal_score, "encoder": sck["encoder"],
                    "params": sal_trained}
        sal_metrics, sal_test = {"val": sr["val"], "test": sr.get("test")}, sal_m.get("test_set")
        s = int(sck["saliency_size"])
        sal_output = {"saliency": f"(N, {s}, {s}) map over the frame, sums to 1"}
        sal_bundle = {"encoder": sck["encoder"], "state_dict": sck["state_dict"], "out_size": sck["saliency_size"]}
    card = {
        "model_version": model_version,
        "sonossl_version": __version__,
        "classes": list(pck["classes"]),
        "data": {"feature_version": data.version, "raw_version": _raw_version(data.meta),
                 "clips": str(clips_dir), "videos": int(idx.video_idx.nunique()), "frames": int(len(idx))},
        "planes": {"source": planes_src, "run": pck["run"], "origin": pck.get("origin", {}),
                   "select_metric": ep.select_metric, "select_value": planes_score, "encoder": pck["encoder"],
                   "pool_stages": planes.pool_stages},
        "saliency": sal_card,
        "metrics": {
            "planes": {"val": {k: pr["val"][k] for k in ("macro_f1", "accuracy")},
                       "test": ({k: pr["test"][k] for k in ("macro_f1", "accuracy")} if pr.get("test") else None)},
            "saliency": sal_metrics,
        },
        # the frames the test metrics come from: an independent clip dataset, or the test split of `data`
        "test_set": {"planes": planes_m.get("test_set"), "saliency": sal_test},
        # the plane model's: preprocess, pretrain (null for scratch: no pretraining), finetune, export; the
        # saliency model's pretrain and finetune are under saliency.params
        "params": trained,
        "input": {
            "frames": "grey uint8, one clip or batch (N, H, W); encoded video or image bytes are decoded first",
            "preprocessing": "sonossl.data.clips: crop inside the ultrasound sector, resize to frame_size (area)",
            "frame_size": int(data.frames.shape[1]),
            "scaling": "grey / 255; the encoder normalises internally",
        },
        "output": {
            "probs": f"(N, {len(pck['classes'])}) softmax over classes, in the order of `classes`",
            "label": "(N,) class name with the highest probability",
            **sal_output,
            "embedding": f"(N, {emb.shape[1]}) pooled encoder features; embedding_reduced (N, {dims}) after PCA",
        },
        "reference": {"frames": int(len(pick)), "heldout_frames": int(len(held_pick)), "embedding_dims": dims,
                      "image_stats": list(stats.columns),
                      # every training video's size, not only the sampled frames' (drift: unseen frame sizes)
                      "frame_sizes": sorted({f"{w}x{h}" for h, w in map(source_size, np.unique(
                          idx.video_idx.to_numpy()[idx.split.to_numpy() == "train"]))})},
    }
    bundle = {
        "bundle_format": BUNDLE_FORMAT,
        "classes": list(pck["classes"]),
        "planes": {"encoder": pck["encoder"], "state_dict": pck["state_dict"], "pool_stages": planes.pool_stages},
        "saliency": sal_bundle,
        "pca_mean": torch.from_numpy(mean.astype(np.float32)),
        "pca_components": torch.from_numpy(components),
        "card": json.dumps(card),
    }
    with atomic_dir(out_dir) as tmp:
        buf = io.BytesIO()
        torch.save({"format": 1, **bundle}, buf)
        (tmp / BUNDLE_FILE).write_bytes(buf.getvalue())
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "model_card.md").write_text(_card_markdown(card))
        ref = tmp / "reference"
        ref.mkdir()
        np.save(ref / "embeddings.npy", reduced)
        np.save(ref / "labels.npy", idx.label.to_numpy()[pick].astype(str))
        np.save(ref / "videos.npy", idx.video_idx.to_numpy()[pick].astype(np.int64))
        np.save(ref / "heldout_videos.npy", idx.video_idx.to_numpy()[held_pick].astype(np.int64))
        stats.to_parquet(ref / "image_stats.parquet", index=False)
        np.save(ref / "heldout_embeddings.npy", ((held_emb - mean) @ components.T).astype(np.float32))
        held_stats.to_parquet(ref / "heldout_image_stats.parquet", index=False)
    return card
