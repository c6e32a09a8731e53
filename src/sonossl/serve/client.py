"""A small client for the sonossl endpoint (Open Inference Protocol v2), for scripts, tests and benchmarks.

    client = Client("http://127.0.0.1:8080")
    out = client.infer_video("sweep.mp4")        # or client.infer_frames(frames_u8)  (N, H, W)
    out["label"], out["probs"].shape, out["model_version"]
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"FP32": np.float32, "BOOL": bool, "BYTES": object, "UINT8": np.uint8}


class EndpointError(RuntimeError):
    """The endpoint answered with an error; ``status`` is the HTTP status and the message its explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    def __init__(self, url: str, model: str = "sonossl", timeout: float = 60.0):
        import requests

        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.session = requests.Session()

    def wait_ready(self, timeout: float = 60.0, process=None) -> None:
        """Poll the model's readiness route until it answers 200 (or the server ``process`` exits)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if self.session.get(f"{self.url}/v2/models/{self.model}/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url}: model {self.model} not ready after {timeout} s")

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.session.post(f"{self.url}/v2/models/{self.model}/infer", json=body, timeout=self.timeout)
        if r.status_code != 200:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text
            raise EndpointError(r.status_code, message)
        return self.decode(r.json())

    @staticmethod
    def decode(response: dict[str, Any]) -> dict[str, Any]:
        """A v2 response as numpy arrays by output name, plus ``id``, ``model_version`` and ``classes``."""
        out: dict[str, Any] = {o["name"]: np.asarray(o["data"], dtype=_DTYPES.get(o["datatype"])).reshape(o["shape"])
                               for o in response["outputs"]}
        params = response.get("parameters") or {}
        out["id"] = response.get("id")
        out["model_version"] = params.get("model_version")
        out["classes"] = str(params.get("classes", "")).split(",")
        return out

    def infer_frames(self, frames: np.ndarray) -> dict[str, Any]:
        frames = np.asarray(frames, dtype=np.uint8)
        return self._post({"inputs": [{"name": "frames", "shape": list(frames.shape), "datatype": "UINT8",
                                       "data": frames.ravel().tolist()}]})

    def infer_video(self, video: str | Path | bytes) -> dict[str, Any]:
        data = video if isinstance(video, bytes) else Path(video).read_bytes()
        return self._post({"inputs": [{"name": "video", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(data).decode()]}]})
