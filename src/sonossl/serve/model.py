"""The served model: a ``kserve.Model`` answering Open Inference Protocol v2 and v1 with the exported bundle.

Input (one clip per request):
- v2 (``POST /v2/models/sonossl/infer``): one input, either ``UINT8`` with shape ``[N, H, W]`` (or ``[H, W]``) of grey
  frames as the scanner shows them (any H and W), or ``BYTES`` with shape ``[1]`` holding an encoded video or image
  (base64 in JSON; raw with the binary-data extension).
- v1 (``POST /v1/models/sonossl:predict``): ``{"instances": [frame, ...]}`` with each frame an H x W list of grey
  levels, or ``{"instances": [{"b64": "<encoded video or image>"}]}``.

Preprocessing is training's (``sonossl.serve.frames``). Output, per frame: ``probs`` (N, C) in the order of the
model card's classes, ``label``, ``saliency`` (N, s, s) over the cropped frame (s in the model card; it sums to 1;
only from a model exported with a saliency model), ``embedding`` (N, D) and ``blank`` (dark or uniform frames, which
the model was not trained on). Every response names the model version and the sector crop it used (``crop``,
"x0,y0,side" in the frames' pixels: v2 ``parameters``, v1 top level); a request may pin the crop the same way (v2
request ``parameters.crop``, v1 ``"crop"`` beside ``instances``), so that the parts of a long video are cropped
alike. Bad requests raise
``kserve.errors.InvalidInput`` (HTTP 400) with a message that says what is wrong; the request log
(``sonossl.monitor.request_log``) is fed off the request path.

    model = SonosslModel("sonossl", "models/export"); model.load()
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kserve
import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from sonossl.serve.frames import (MAX_DECODED_PIXELS, SPLIT_HINT, PreparedClip, RequestError,
                                  card_preprocess_params, check_shape, crop_text, decode_media, parse_crop,
                                  prepare_clip)

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
_V2_DTYPE = {"f": "FP32", "b": "BOOL", "U": "BYTES"}  # numpy kind -> Open Inference Protocol datatype
OUTPUTS = ("probs", "label", "saliency", "embedding", "blank")  # per frame, in this order by default


@dataclasses.dataclass(frozen=True)
class Limits:
    max_frames: int = 256  # per request
    max_side: int = 4096  # pixels, per frame side
    max_pixels: int = MAX_DECODED_PIXELS  # decoded from one encoded video, all frames together
    max_body_bytes: int = 64 * 2**20  # enforced by the server before the body is read (HTTP 413)


def _uint8_tensor(data: Any, shape: list[int], where: str) -> np.ndarray:
    """Validate JSON data as grey levels and return them as uint8 with ``shape``."""
    try:
        arr = np.asarray(data)
    except ValueError:
        raise RequestError(f"{where}: data is ragged (rows of different lengths)") from None
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise RequestError(f"{where}: data must be numbers (grey levels 0-255), got {arr.dtype.name} values")
    if arr.size != int(np.prod(shape)):
        raise RequestError(f"{where}: shape {shape} needs {int(np.prod(shape))} values, data holds {arr.size}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise RequestError(f"{where}: data contains NaN or infinite values")
        if (arr != np.round(arr)).any():
            raise RequestError(f"{where}: grey levels must be whole numbers")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise RequestError(f"{where}: grey levels must lie in 0-255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8).reshape(shape)


def _b64(value: Any, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected base64 text of an encoded video or image, got {type(value).__name__}")
    try:  # line breaks allowed: `base64 file` wraps its output every 76 characters
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: not valid base64") from None


class SonosslModel(kserve.Model):
    def __init__(self, name: str = "sonossl", model_dir: str | Path = DEFAULT_MODEL_DIR, limits: Limits = Limits(),
                 request_log=None):
        super().__init__(name, return_response_headers=True)  # predict sets the content type of pre-encoded JSON
        self.model_dir = Path(model_dir)
        self.limits = limits
        self.request_log = request_log
        self.bundle = None

    def load(self) -> bool:
        from sonossl.export import BUNDLE_FILE, load_bundle

        if not (self.model_dir / BUNDLE_FILE).is_file():
            raise FileNotFoundError(f"{self.model_dir}: no exported model ({BUNDLE_FILE}); pass --model-dir with the "
                                    "output of `sonossl export` (models/export)")
        import torch

        self.bundle = load_bundle(self.model_dir)
        if torch.cuda.is_available():  # a GPU node (sonossl deploy --gpu, the gpu overlay) serves on it
            self.bundle.to("cuda")
        card = self.bundle.card
        self.model_version = card["model_version"]
        self.preprocess_params = card_preprocess_params(card)
        self.ready = True
        log.info("loaded sonossl model %s from %s on %s", self.model_version, self.model_dir, self.bundle.device)
        return self.ready

    @property
    def outputs(self) -> tuple[str, ...]:
        """The loaded model's outputs: ``OUTPUTS``, without saliency when it was exported without a saliency model."""
        return tuple(n for n in OUTPUTS if n != "saliency" or self.bundle is None or self.bundle.saliency is not None)

    # -- requests -> clips ----------------------------------------------------------------------------------------

    def _clip_v2(self, request: InferRequest) -> tuple[list | np.ndarray, str]:
        if len(request.inputs) != 1:
            names = [i.name for i in request.inputs]
            raise RequestError(f"expected exactly one input (frames), got {len(names)}: {names}")
        inp = request.inputs[0]
        where = f"input {inp.name!r}"
        shape = [int(s) for s in inp.shape]
        if any(s < 0 for s in shape):
            raise RequestError(f"{where}: shape {shape} has a negative size")
        # a request in the binary data extension arrives here already parsed into inp.data (KServe's from_bytes;
        # a body that does not match its header is refused before, in the server), so both kinds are read alike
        if inp.datatype == "UINT8":
            if len(shape) not in (2, 3):
                raise RequestError(f"{where}: UINT8 frames must have shape [N, H, W] or [H, W], got {shape}")
            if len(shape) == 2:
                shape = [1, *shape]
            check_shape(shape, self.limits.max_frames, self.limits.max_side)
            return _uint8_tensor(inp.data, shape, where), "v2"
        if inp.datatype == "BYTES":
            items = list(np.asarray(inp.data, dtype=object).ravel()) if inp.data is not None else []
            if shape != [1] or len(items) != 1:
                raise RequestError(f"{where}: BYTES input must hold one encoded video or image (shape [1]), "
                                   f"got shape {shape} with {len(items)} element(s)")
            return decode_media(_b64(items[0], where), self.limits.max_frames, self.limits.max_side,
                                self.limits.max_pixels), "v2"
        raise RequestError(f"{where}: datatype {inp.datatype} is not accepted; send UINT8 frames [N, H, W] "
                           "or BYTES holding an encoded video or image")

    def _clip_v1(self, payload: dict) -> list | np.ndarray:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise RequestError('v1 request: expected {"instances": [...]} with frames or {"b64": ...}')
        if not instances:
            raise RequestError("empty batch: `instances` is empty")
        if all(isinstance(i, dict) for i in instances):
            if len(instances) != 1 or set(instances[0]) != {"b64"}:
                raise RequestError('v1 request: send one instance {"b64": "<encoded video or image>"} per request')
            return decode_media(_b64(instances[0]["b64"], "instances[0].b64"), self.limits.max_frames,
                                self.limits.max_side, self.limits.max_pixels)
        if len(instances) > self.limits.max_frames:
            raise RequestError(f"too many frames: {len(instances)} in one request, the limit is "
                               f"{self.limits.max_frames}; {SPLIT_HINT}")
        first = np.asarray(instances[0], dtype=object)
        if first.ndim != 2:
            raise RequestError(f"v1 request: each instance must be one frame, an H x W list of grey levels "
                               f"(instances[0] has {first.ndim} dimension(s))")
        shape = [len(instances), *first.shape]
        check_shape(shape, self.limits.max_frames, self.limits.max_side)
        return _uint8_tensor(instances, shape, "instances")

    # -- inference ------------------------------------------------------------------------------------------------

    def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> dict | bytes | InferResponse:
        # In the event loop's thread, as KServe runs a synchronous predict: on a CPU-bound server a worker thread
        # buys no throughput, and the hop cost a third of a short clip's latency here (benchmarks/serve.py).
        return self._predict(payload, headers or {}, response_headers)

    def _predict(self, payload: dict | InferRequest, headers: dict[str, str],
                 response_headers: dict[str, str] | None = None) -> dict | bytes | InferResponse:
        try:
            if isinstance(payload, InferRequest):
                wanted = self._wanted_outputs(payload)
                crop = (payload.parameters or {}).get("crop")
                where = "parameters.crop"
                clip, protocol = self._clip_v2(payload)
            elif isinstance(payload, dict):
                crop, where = payload.get("crop"), "crop"
                clip, protocol = self._clip_v1(payload), "v1"
            else:
                raise RequestError(f"unsupported request body ({type(payload).__name__})")
            prepared = prepare_clip(clip, self.preprocess_params, None if crop is None else parse_crop(crop, where))
        except RequestError as e:
            raise InvalidInput(str(e)) from None
        out = self.bundle.predict(prepared.frames)
        request_id = (payload.id if isinstance(payload, InferRequest) else None) or headers.get("x-request-id") \
            or uuid.uuid4().hex
        if self.request_log is not None:
            ts = datetime.now(UTC).isoformat()
            self.request_log.append(lambda: self._log_rows(ts, str(request_id), protocol, prepared, out),
                                    n_rows=len(prepared.frames))
        if protocol == "v1":
            return self._v1_response(prepared, out)
        return self._v2_response(payload, wanted, str(request_id), prepared, out, response_headers)

    def _log_rows(self, ts: str, request_id: str, protocol: str, prepared: PreparedClip,
                  out: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Rows for the request log (built in the log's thread); no pixels."""
        from sonossl.monitor.image_stats import image_stats

        stats = image_stats(prepared.frames, prepared.source_hw).to_dict("records")
        emb = out["embedding_reduced"]
        rows = []
        for i, s in enumerate(stats):
            row = {"ts": ts, "request_id": request_id, "model_version": self.model_version, "protocol": protocol,
                   "frame": i, "blank": bool(prepared.blank[i]), "label": str(out["label"][i]),
                   "confidence": round(float(out["probs"][i].max()), 5)}
            row.update({k: (float(v) if k not in ("height", "width") else int(v)) for k, v in s.items()})
            row.update({f"emb_{j}": round(float(v), 6) for j, v in enumerate(emb[i])})
            rows.append(row)
        return rows

    def _v1_response(self, prepared: PreparedClip, out: dict[str, np.ndarray]) -> dict:
        classes = self.bundle.classes
        preds = [{"label": str(out["label"][i]),
                  "probs": {c: round(float(p), 6) for c, p in zip(classes, out["probs"][i], strict=True)},
                  **({"saliency": np.round(out["saliency"][i], 7).tolist()} if "saliency" in out else {}),
                  "embedding": np.round(out["embedding"][i], 6).tolist(),
                  "blank": bool(prepared.blank[i])}
                 for i in range(len(prepared.frames))]
        return {"predictions": preds, "model_version": self.model_version, "classes": classes,
                "crop": crop_text(prepared.crop)}

    def _wanted_outputs(self, request: InferRequest) -> list[str]:
        wanted = [o.name for o in request.request_outputs or []] or list(self.outputs)
        unknown = [n for n in wanted if n not in self.outputs]
        if unknown:
            raise RequestError(f"unknown output(s) {unknown} in `outputs`; this model has {list(self.outputs)}")
        return wanted

    def _v2_response(self, request: InferRequest, wanted: list[str], request_id: str, prepared: PreparedClip,
                     out: dict[str, np.ndarray], response_headers: dict[str, str] | None) -> bytes | InferResponse:
        """The v2 response, JSON-encoded here (orjson, arrays in C) unless binary outputs are asked for.

        KServe's v2 route serialises an ``InferResponse`` through FastAPI's ``jsonable_encoder``, element by element,
        a third of a 4-frame request's time; bytes with a JSON content type go out as they are. Outputs named in the
        request's ``outputs`` are returned, in that order (all of the model's ``outputs`` by default); binary outputs
        (the binary data extension) go through KServe's own encoder.
        """
        tensors = {"probs": out["probs"].astype(np.float32), "label": out["label"].astype(str),
                   **({"saliency": out["saliency"].astype(np.float32)} if "saliency" in out else {}),
                   "embedding": out["embedding"].astype(np.float32), "blank": np.asarray(prepared.blank, dtype=bool)}
        binary = request.use_binary_outputs or any(
            (o.parameters or {}).get("binary_data", False) for o in request.request_outputs or [])
        parameters = {"model_version": self.model_version, "classes": ",".join(self.bundle.classes),
                      "crop": crop_text(prepared.crop)}
        if binary or response_headers is None:
            outputs = [InferOutput(name=n, shape=list(tensors[n].shape), datatype=_V2_DTYPE[tensors[n].dtype.kind],
                                   data=tensors[n].astype(object) if tensors[n].dtype.kind == "U" else tensors[n])
                       for n in wanted]  # KServe serialises BYTES from object arrays only
            return InferResponse(response_id=request_id, model_name=self.name, model_version=self.model_version,
                                 infer_outputs=outputs, parameters=parameters,
                                 requested_outputs=request.request_outputs,
                                 use_binary_outputs=request.use_binary_outputs)
        body = {"model_name": self.name, "model_version": self.model_version, "id": request_id,
                "parameters": parameters,
                "outputs": [{"name": n, "shape": list(tensors[n].shape), "datatype": _V2_DTYPE[tensors[n].dtype.kind],
                             "data": tensors[n].ravel().tolist() if tensors[n].dtype.kind == "U"
                             else np.ascontiguousarray(tensors[n]).ravel()} for n in wanted]}
        response_headers["content-type"] = "application/json"
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
