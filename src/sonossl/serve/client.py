"""A small client for the sonossl endpoint (Open Inference Protocol v2), for scripts, tests and benchmarks.

    with Client("http://127.0.0.1:8080") as client:   # closes its connections at the end
        out = client.infer_video("sweep.mp4")          # or client.infer_frames(frames_u8)  (N, H, W)
        out = client.infer_long_video("long.mp4")      # a video of more frames than one request takes
    out["label"], out["probs"].shape, out["model_version"], out["crop"]
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

_DTYPES = {"FP32": np.float32, "BOOL": bool, "BYTES": object, "UINT8": np.uint8}


class EndpointError(RuntimeError):
    """The endpoint answered with an error; ``status`` is the HTTP status and the message its explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _grey_levels(frames: Any) -> np.ndarray:
    """``frames`` as uint8, refusing what a cast would change: frames in [0, 1] (as image libraries load them) would
    become black, 16-bit levels would wrap around, and the endpoint would answer for frames it was never shown."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    if frames.dtype == bool or not np.issubdtype(frames.dtype, np.number):
        raise ValueError(f"frames: dtype {frames.dtype}; expected grey levels, whole numbers 0-255 (uint8)")
    if frames.size:
        low, high = frames.min(), frames.max()
        whole = bool(np.isfinite(frames).all() and (frames == np.round(frames)).all())
        if not whole or low < 0 or high > 255:
            hint = (": frames in [0, 1]? send (frames * 255).round().astype(np.uint8)" if whole is False and high <= 1
                    else "")
            raise ValueError(f"frames: dtype {frames.dtype} with values from {low} to {high}; expected grey levels, "
                             f"whole numbers 0-255 (uint8); converting would change them{hint}")
    return frames.astype(np.uint8)


class Client:
    def __init__(self, url: str, model: str = "sonossl", timeout: float = 60.0,
                 headers: dict[str, str] | None = None):
        """``headers`` go with every request: ``Host`` for an InferenceService behind an ingress gateway called by
        its address, ``Authorization`` where the gateway wants a token."""
        import requests

        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.session = requests.Session()
        self.session.headers.update(headers or {})

    def close(self) -> None:
        """Close the connections the client keeps open (also on leaving ``with Client(...) as c:``)."""
        self.session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ready(self, timeout: float = 2.0) -> Any:
        """One request to the model's readiness route; the response (200: ready)."""
        return self.session.get(f"{self.url}/v2/models/{self.model}/ready", timeout=timeout)

    def wait_ready(self, timeout: float = 60.0, process=None) -> None:
        """Poll the model's readiness route until it answers 200 (or the server ``process`` exits)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if self.ready().status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url}: model {self.model} not ready after {timeout} s")

    def _post(self, body: dict[str, Any], raw: bytes | None = None) -> dict[str, Any]:
        url = f"{self.url}/v2/models/{self.model}/infer"
        if raw is None:
            r = self.session.post(url, data=orjson.dumps(body), timeout=self.timeout,
                                  headers={"Content-Type": "application/json"})
        else:  # the v2 binary data extension: a JSON header, then the tensor's bytes
            header = json.dumps(body).encode()
            r = self.session.post(url, data=header + raw, timeout=self.timeout,
                                  headers={"Content-Type": "application/octet-stream",
                                           "Inference-Header-Content-Length": str(len(header))})
        if r.status_code != 200:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text
            raise EndpointError(r.status_code, message)
        try:
            return self.decode(orjson.loads(r.content))  # orjson (a KServe dependency): a third of json's time
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise EndpointError(r.status_code, f"not an Open Inference Protocol v2 response ({type(e).__name__}: "
                                               f"{e}): {r.text[:200]!r}") from None

    @staticmethod
    def decode(response: dict[str, Any]) -> dict[str, Any]:
        """A v2 response as numpy arrays by output name, plus ``id``, ``model_version``, ``classes`` and ``crop``
        (the sector crop used, "x0,y0,side")."""
        out: dict[str, Any] = {o["name"]: np.asarray(o["data"], dtype=_DTYPES.get(o["datatype"])).reshape(o["shape"])
                               for o in response["outputs"]}
        params = response.get("parameters") or {}
        out["id"] = response.get("id")
        out["model_version"] = params.get("model_version")
        out["classes"] = str(params.get("classes", "")).split(",")
        out["crop"] = params.get("crop")
        return out

    def infer_frames(self, frames: np.ndarray, binary: bool = False, crop: str | None = None) -> dict[str, Any]:
        """Grey frames (N, H, W) uint8, as a JSON list of numbers, or raw (``binary``: the v2 binary data extension;
        KServe 0.21 turns such a tensor back into a Python list, so it is no faster on the server). Another dtype is
        accepted only where every value is a whole number 0-255; anything else is refused (``ValueError``).
        ``crop`` ("x0,y0,side", as a response's ``crop``) pins the sector crop instead of finding it from these
        frames."""
        frames = np.ascontiguousarray(_grey_levels(frames))
        spec = {"name": "frames", "shape": list(frames.shape), "datatype": "UINT8"}
        extra = {"parameters": {"crop": crop}} if crop is not None else {}
        if binary:
            return self._post({"inputs": [{**spec, "parameters": {"binary_data_size": frames.nbytes}}], **extra},
                              frames.tobytes())
        return self._post({"inputs": [{**spec, "data": frames.ravel().tolist()}], **extra})

    def infer_video(self, video: str | Path | bytes) -> dict[str, Any]:
        """An encoded video or image (a path or its bytes), sent base64 in JSON."""
        data = video if isinstance(video, bytes) else Path(video).read_bytes()
        return self._post({"inputs": [{"name": "video", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(data).decode()]}]})

    def infer_long_video(self, video: str | Path, frames_per_request: int = 256, binary: bool = True) -> dict[str, Any]:
        """A video of any length, also one over the endpoint's frame limit per request (``--max-frames``, 256 by
        default). It is decoded here, its sector crop found as preprocessing finds it (from its first frames:
        ``sonossl.serve.frames.video_head``), and sent as grey frames in parts of at most ``frames_per_request``
        with that crop pinned, so each part is cropped alike. Returns the outputs concatenated in frame order, with
        ``model_version``, ``classes``, ``crop`` and ``ids`` (one per request). A frame's answer is the one it gets
        in one request of the whole video as grey frames with that crop pinned. Unpinned, a server finds the crop
        from every frame of a request, which for a video of more frames than preprocessing reads (48 MiB of them)
        can differ by a few pixels; sent encoded (``infer_video``), the server also maps levels to grey after
        resizing, which can move a pixel by a grey level. Parts answered by different model versions
        (a rollout under way) raise RuntimeError: their answers do not belong together."""
        from sonossl.data.clips import _video_crop
        from sonossl.data.video import open_video
        from sonossl.serve.frames import crop_text, video_head

        if frames_per_request < 1:
            raise ValueError(f"frames_per_request: at least 1, got {frames_per_request}")
        parts: list[dict[str, Any]] = []
        with open_video(Path(video)) as v:
            frames = v.frames()
            head = video_head(frames)
            crop = crop_text(_video_crop(head))
            size = head[0].levels.shape

            def grey() -> Any:
                for f in itertools.chain(head, frames):
                    if f.levels.shape != size:
                        raise ValueError(f"{video}: frame size changes mid-video ({size[1]}x{size[0]} -> "
                                         f"{f.levels.shape[1]}x{f.levels.shape[0]})")
                    yield np.array(f.image)  # a copy: the decoder reuses its buffers

            rest = grey()
            while batch := list(itertools.islice(rest, frames_per_request)):
                parts.append(self.infer_frames(np.stack(batch), binary=binary, crop=crop))
        missing = sorted({"probs", "label", "blank"} - set(parts[0]))
        if missing:
            raise EndpointError(200, f"the response has no {', '.join(missing)} output(s): not a sonossl model?")
        versions = sorted({str(p["model_version"]) for p in parts})
        if len(versions) > 1:
            raise RuntimeError(f"{video}: the parts were answered by different model versions {versions} (a rollout "
                               "under way?); send it again")
        first = parts[0]
        out = {k: np.concatenate([p[k] for p in parts]) for k, v in first.items() if isinstance(v, np.ndarray)}
        return {**out, "model_version": first["model_version"], "classes": first["classes"], "crop": first["crop"],
                "ids": [p["id"] for p in parts]}
