"""Shared test fixtures: synthetic ultrasound-like frames (a fan with speckle and overlays) and tiny video files.

The fan mimics the simulator's output: a curvilinear sector (apex above the image top, near-field arc at the top)
on black in a 4:3 frame, speckle everywhere inside (dark but never black fluid), white text at the top left and a
depth scale on the right, both outside the fan. Videos are written with PyAV in the formats real data comes in.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

POCUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pocus"


@dataclass
class Fan:
    frames: np.ndarray  # (T, H, W) uint8
    mask: np.ndarray  # (H, W) bool, the imaging sector
    overlays: list[tuple[int, int, int, int]]  # (x0, y0, x1, y1) boxes of static overlays, exclusive ends


def fan_frames(t: int = 12, h: int = 96, w: int = 128, seed: int = 0, overlay: bool = True) -> Fan:
    """A moving speckle fan with a dark fluid region and, optionally, overlays outside it."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    ay, ax = -0.30 * h, w / 2  # apex above the image
    r = np.hypot(y - ay, x - ax)
    angle = np.degrees(np.arctan2(x - ax, y - ay))
    half = 32.0  # opening 64 degrees
    r0, r1 = 0.36 * h, 1.22 * h
    mask = (r >= r0) & (r <= r1) & (np.abs(angle) <= half)
    depth = np.clip((r - r0) / (r1 - r0), 0, 1)
    fluid = ((x - 0.45 * w) / (0.12 * w)) ** 2 + ((y - 0.55 * h) / (0.10 * h)) ** 2 < 1
    frames = np.zeros((t, h, w), dtype=np.uint8)
    for i in range(t):
        speckle = rng.rayleigh(1.0, (h, w))
        speckle = ndimage.uniform_filter(speckle, size=2)
        level = 150 * (1 - 0.5 * depth) * np.where(fluid, 0.12, 1.0) * speckle
        frames[i] = np.where(mask, np.clip(level + 8, 8, 255), 0).astype(np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    if overlay:
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 1), "FR 20", fill=255)
        x0, x1 = w - 6, w - 3  # depth scale: a bar with ticks, right of the fan
        draw.rectangle([x1 - 1, 4, x1, h // 2 + 8], fill=200)
        for ty in range(4, h // 2 + 8, 8):
            draw.rectangle([x0, ty, x1, ty], fill=200)
        layer = np.asarray(canvas)
        assert not (layer > 0)[mask].any(), "test fixture: overlays must lie outside the fan"
        ys, xs = np.nonzero(layer[: h // 4, : w // 2])
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        ys, xs = np.nonzero(layer[:, w // 2 :])
        boxes.append((int(xs.min()) + w // 2, int(ys.min()), int(xs.max()) + 1 + w // 2, int(ys.max()) + 1))
        frames = np.maximum(frames, layer[None])
    return Fan(frames=frames, mask=mask, overlays=boxes)


def write_video(path: Path, frames: np.ndarray, fps: float = 10.0, kind: str | None = None) -> Path:
    """Write grey frames (T, H, W) with PyAV; ``kind`` (default: from the suffix) picks container and codec:
    mp4 (H.264), avi / mov (MPEG-4 part 2), mpeg (MPEG-2 program stream), gif, mkv (FFV1, lossless)."""
    import av

    from sonossl.data.video import encode_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = kind or path.suffix.lstrip(".").lower()
    if kind == "mp4":
        return encode_video(path, frames, fps=fps)
    formats = {
        "avi": ("avi", "mpeg4", "yuv420p", {"qscale": "2"}),
        "mov": ("mov", "mpeg4", "yuv420p", {"qscale": "2"}),
        "mpeg": ("mpeg", "mpeg2video", "yuv420p", {"qscale": "2"}),
        "gif": ("gif", "gif", "gray", {}),
        "mkv": ("matroska", "ffv1", "gray", {}),
    }
    fmt, codec, pix_fmt, options = formats[kind]
    _, h, w = frames.shape
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = options
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")
            if pix_fmt != "gray":
                vf = vf.reformat(format=pix_fmt)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_vfr_video(path: Path, frames: np.ndarray, times_ms: list[int]) -> Path:
    """A variable-frame-rate file: lossless FFV1 in Matroska with each frame's pts set by hand (milliseconds)."""
    import av

    _, h, w = frames.shape
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=1000)
        stream.width, stream.height, stream.pix_fmt = w, h, "gray"
        stream.codec_context.time_base = Fraction(1, 1000)
        for frame, ms in zip(frames, times_ms, strict=True):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")
            vf.pts, vf.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    """An mp4 with one AAC audio stream and no video."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        for i in range(8):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 8000, i * 1024
            for packet in stream.encode(af):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_unknown_codec(path: Path, frames: np.ndarray) -> Path:
    """An AVI whose video FourCC names no codec FFmpeg can decode (the MPEG-4 tag is overwritten)."""
    write_video(path, frames, kind="avi")
    data = path.read_bytes()
    assert data.count(b"FMP4") >= 1
    path.write_bytes(data.replace(b"FMP4", b"ZQZQ"))
    return path


def smooth_frames(t: int = 10, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients with texture that lossy codecs keep within a few grey levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 2 * np.pi, 3)
    out = []
    for i in range(t):
        img = 128 + 60 * np.sin(x / 9 + base[0] + 0.3 * i) * np.cos(y / 7 + base[1]) + 30 * np.sin((x + y) / 13 + base[2])
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.uint8)


@pytest.fixture
def fan() -> Callable[..., Fan]:
    return fan_frames


@pytest.fixture
def video_writer() -> Callable[..., Path]:
    return write_video


@pytest.fixture(scope="session")
def pocus_dir() -> Path:
    """The real POCUS videos (``../shared/data/pocus``). Where ``../shared`` exists, as in this workplace and its CI,
    they must be there: a missing or incomplete copy fails the tests that need them. Only a checkout without
    ``../shared`` at all (on your own machine) skips them."""
    if (POCUS / "labels.csv").is_file():
        return POCUS
    shared = POCUS.parents[1]
    if shared.is_dir():
        pytest.fail(f"real data missing: {POCUS / 'labels.csv'} does not exist, but {shared} does")
    pytest.skip(f"real data missing: no {shared} beside the checkout (the POCUS videos exist only in this workplace)")


@pytest.fixture(scope="session")
def pocus_subset(pocus_dir, tmp_path_factory) -> Path:
    """12 small real videos, 4 per class, each from a different patient (copied to a temporary folder; read-only)."""
    import pandas as pd

    labels = pd.read_csv(pocus_dir / "labels.csv")
    labels = labels.sort_values("bytes").drop_duplicates("patient_id")
    pick = pd.concat([g.head(4) for _, g in labels.groupby("label")])
    root = tmp_path_factory.mktemp("pocus_subset")
    for rel in pick.path:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pocus_dir / rel, root / rel)
    pick.to_csv(root / "labels.csv", index=False)
    return root


REPO = Path(__file__).resolve().parents[1]


def _tiny_dataset(tmp_path_factory, name: str, test_set: bool = False) -> Path:
    """Simulated sweeps of the tiny profile (its ``simulate_test`` block with ``test_set``), preprocessed."""
    from sonossl.config import load_params
    from sonossl.data.clips import preprocess
    from sonossl.data.simulate import simulate

    params = load_params(REPO / "params.yaml", profile="tiny")
    root = tmp_path_factory.mktemp(name)
    simulate(root / "raw", params.simulate_test if test_set else params.simulate, progress=False)
    preprocess(root / "raw", root / "clips", params.preprocess, progress=False)
    return root / "clips"


@pytest.fixture(scope="session")
def tiny_clips(tmp_path_factory) -> Path:
    """A clip dataset from the simulator on the tiny profile (shared by the training tests; read-only)."""
    return _tiny_dataset(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_test_clips(tmp_path_factory) -> Path:
    """The tiny profile's independent test set (``simulate_test``: other fetuses), preprocessed like ``tiny_clips``."""
    return _tiny_dataset(tmp_path_factory, "tiny_test", test_set=True)


@pytest.fixture(scope="session")
def tiny_params():
    from sonossl.config import load_params

    return load_params(REPO / "params.yaml", profile="tiny")


class S3Server:
    """A real S3 server for tests: moto in server mode (``ThreadedMotoServer``) on 127.0.0.1, in this process.

    ``stop()`` behaves like a crashed server: the port stops listening and every open connection is cut, in-flight
    transfers included; ``start()`` again serves the same buckets (moto keeps them in this process) on the same
    port. ``crash_after_bytes = N`` makes the server stop by itself once N bytes of object data have gone through
    it (request bodies of PUTs, response bodies of GETs, counted together): a failure in the middle of a transfer.
    """

    def __init__(self, bucket: str) -> None:
        import threading

        self.bucket = bucket
        self.port = 0
        self.crash_after_bytes: int | None = None
        self.bytes_seen = 0
        self._moto = None
        self._lock = threading.Lock()  # request threads count bytes concurrently

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def start(self) -> "S3Server":
        import socket

        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        server = self
        connections: set[socket.socket] = set()

        class Handler(MotoRequestHandler):
            def setup(self):
                super().setup()
                connections.add(self.connection)

            def finish(self):
                connections.discard(self.connection)
                super().finish()

        def app(environ, start_response):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if environ["REQUEST_METHOD"] == "PUT":
                server._count(length)
            body = moto_app(environ, start_response)
            if environ["REQUEST_METHOD"] != "GET":
                return body
            return server._chunked(body)

        moto_app = DomainDispatcherApplication(create_backend_app)

        class Moto(ThreadedMotoServer):
            def _server_entry(self) -> None:
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=Handler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._connections = connections
        self._moto = Moto(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._moto.start()
        self.port = self._moto.get_host_and_port()[1]
        return self

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_seen += n
            crash = self.crash_after_bytes is not None and self.bytes_seen > self.crash_after_bytes
            if crash:
                self.crash_after_bytes = None
                self.stop()
        if crash:
            raise ConnectionAbortedError("test S3 server stopped")

    def _chunked(self, body):
        for block in body:
            for i in range(0, len(block), 256 * 1024):
                self._count(len(block[i:i + 256 * 1024]))
                yield block[i:i + 256 * 1024]

    def stop(self) -> None:
        import socket
        import threading

        if self._moto is None:
            return
        moto, self._moto = self._moto, None
        srv = moto._server
        # shutdown() waits for the serve loop; from a request thread that is fine (the loop runs in its own thread)
        threading.Thread(target=srv.shutdown, daemon=True).start()
        srv.socket.close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def objects(self) -> dict[str, bytes]:
        s3 = self.client()
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
                for o in page.get("Contents", [])]
        return {k: s3.get_object(Bucket=self.bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3 server on 127.0.0.1 with a fresh, empty bucket (``.bucket``) at ``.endpoint_url``.

    The environment holds dummy credentials, the region and ``AWS_ENDPOINT_URL_S3`` (so boto3 and
    ``sonossl.storage`` reach this server without arguments), and nothing from the user's ~/.aws.
    """
    import uuid

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = S3Server(bucket=f"test-{uuid.uuid4().hex[:12]}").start()  # moto's buckets live for the whole session
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint_url)
    server.client().create_bucket(Bucket=server.bucket)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_export(tiny_clips, tiny_params, tmp_path_factory) -> Path:
    """A model exported on the tiny profile (pretrain -> finetune planes and saliency -> export); read-only."""
    from sonossl.export import export
    from sonossl.train.finetune import finetune
    from sonossl.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("tiny_export")
    pretrain(tiny_clips, root / "pretrain", tiny_params.pretrain, progress=False)
    for task in ("planes", "saliency"):
        finetune(tiny_clips, root / "finetune" / f"ssl-{task}", tiny_params.finetune, task=task,
                 encoder=root / "pretrain", progress=False)
    export(tiny_clips, root / "finetune", root / "export", tiny_params, progress=False)
    return root / "export"


@pytest.fixture(scope="session")
def drift_export(tiny_params, tmp_path_factory) -> Path:
    """A tiny model exported from 12 sweeps: drift thresholds are learnt from windows of whole videos, so the
    reference needs more videos than the 4 of the tiny profile."""
    import dataclasses

    from sonossl.data.clips import preprocess
    from sonossl.data.simulate import simulate
    from sonossl.export import export
    from sonossl.train.finetune import finetune
    from sonossl.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("drift_export")
    simulate(root / "raw", dataclasses.replace(tiny_params.simulate, videos=12), progress=False)
    preprocess(root / "raw", root / "clips", tiny_params.preprocess, progress=False)
    pretrain(root / "clips", root / "pretrain", tiny_params.pretrain, progress=False)
    for task in ("planes", "saliency"):
        finetune(root / "clips", root / "finetune" / f"ssl-{task}", tiny_params.finetune, task=task,
                 encoder=root / "pretrain", progress=False)
    export(root / "clips", root / "finetune", root / "export", tiny_params, progress=False)
    return root / "export"


@dataclass
class ServerProcess:
    url: str
    process: object
    log_dir: Path | None
    output: Path


def send_json(handler, status: int, body: dict) -> None:
    """Answer an ``http.server`` request with ``body`` as JSON (the stand-in APIs of the tests)."""
    import json

    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, work: Path, request_log: str | None = None, *extra: str,
                 scheme: str = "http") -> ServerProcess:
    """``python -m sonossl.serve`` on 127.0.0.1 and a free port, ready to answer; stop it with ``stop_server``
    (``scheme="https"`` for a server given a certificate in ``extra``, which REQUESTS_CA_BUNDLE must name)."""
    import subprocess
    import sys

    from sonossl.serve.client import Client

    port = free_port()
    output = work / f"server-{port}.log"
    cmd = [sys.executable, "-m", "sonossl.serve", "--model-dir", str(model_dir), "--http-port", str(port),
           "--host", "127.0.0.1", "--log-flush-seconds", "0.2", *extra]
    if request_log:
        cmd += ["--request-log", str(request_log)]
    with open(output, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        Client(url).wait_ready(timeout=120, process=process)
    except Exception:
        process.kill()
        raise RuntimeError(f"server did not start: {output.read_text()[-3000:]}") from None
    return ServerProcess(url, process, Path(request_log) if request_log and "://" not in request_log else None, output)


def stop_server(server: ServerProcess) -> str:
    """SIGTERM (the request log is flushed on the way out), then the server's output."""
    import subprocess

    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
    return server.output.read_text()
