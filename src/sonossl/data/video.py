"""Video I/O with PyAV: the one place where sonossl encodes, probes and decodes video files.

Encoding writes grey frames as H.264 (libx264, yuv420p, flagged full range so that a decoder's conversion to grey
gives back the same levels; ``pix_fmt='gray'`` comes back shifted in PyAV 18) with deterministic settings, so the
same frames give the same bytes.

Decoding reads any container and codec FFmpeg knows (mp4, mov, avi, mpeg, gif, mkv, ...) as grey uint8 frames with
their presentation times in seconds (variable frame rates stay exact), and turns every way a file can be unusable
(missing, empty, not a video, truncated, corrupt, no video stream, no decoder) into a ``VideoError`` with a short
reason. Corruption that FFmpeg conceals is caught from its error log and from a shortfall against the frame count
the container declares.

    encode_video("sweep.mp4", frames_uint8_THW, fps=20)
    probe_video("sweep.mp4").frames                       # 200 (as declared by the container)
    for frame in iter_frames("sweep.mp4"): frame.index, frame.time, frame.image   # (H, W) uint8
    with open_video("sweep.mp4") as video: video.info.fps, next(video.frames())
    frames, times = read_video("sweep.mp4")              # (T, H, W) uint8, (T,) seconds from the first frame
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from sonossl.atomic import atomic_file


def encode_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18, codec: str = "libx264") -> Path:
    """Write grey uint8 frames (T, H, W) to ``path`` atomically; H and W must be even."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (T, H, W), got {frames.dtype} {frames.shape}")
    t, h, w = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise ValueError(f"{path}: need at least one frame and even height and width, got {frames.shape}")
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_file(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            # threads=1 and no wall-clock metadata keep the output byte-reproducible.
            stream.codec_context.thread_count = 1
            stream.codec_context.color_range = 2  # AVCOL_RANGE_JPEG: full range
            stream.options = {"crf": str(crf), "preset": "medium", "tune": "grain"} if codec == "libx264" else {}
            chroma = np.full((h // 2, w // 2), 128, dtype=np.uint8)
            for frame in frames:
                planes = np.concatenate([frame.reshape(-1), chroma.reshape(-1), chroma.reshape(-1)])
                vf = av.VideoFrame.from_ndarray(planes.reshape(h * 3 // 2, w), format="yuv420p")
                vf.color_range = 2
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


# Decoder threading: slice threads work only inside a decode call. Frame threads ("AUTO") decode ahead on their own
# and may log while Python frees their codec context, which deadlocks on the GIL while logging is captured; they buy
# nothing when, as in preprocessing, one decoder runs per core.
THREAD_TYPE = "SLICE"
# A container that declares N frames but yields fewer than this share of them is truncated.
MIN_DECLARED_SHARE = 0.9

# Leading bytes of the containers videos come in, to tell a damaged video from a file that is no video at all.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "MP4/MOV"),
    (4, b"moov", "MP4/MOV"),
    (4, b"mdat", "MP4/MOV"),
    (4, b"wide", "MP4/MOV"),
    (4, b"free", "MP4/MOV"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x01\xba", "MPEG"),
    (0, b"\x00\x00\x01\xb3", "MPEG"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"FLV", "FLV"),
)


# 8-bit formats whose first plane is luma: grey is that plane, stretched from the limited (MPEG) range 16-235 to
# 0-255 unless the frame is flagged full range. This is what ``frame.to_ndarray(format="gray")`` computes (equal, or
# within one grey level where swscale picks a lower-precision path), at a third of its cost.
_LUMA_FORMATS = frozenset(
    {"yuv420p", "yuv422p", "yuv444p", "yuv410p", "yuv411p", "yuv440p", "nv12", "nv21"}
    | {"yuvj420p", "yuvj422p", "yuvj444p", "yuvj440p"}
)
_LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
_FULL_RANGE = 2  # AVCOL_RANGE_JPEG


class VideoError(ValueError):
    """A file that cannot be used as a video; ``reason`` is a short phrase for reports (no path in it)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (``frames`` 0 and ``fps`` None when it does not say;
    ``width`` and ``height`` as stored, before any display rotation ``Video.frames`` applies)."""

    container: str
    codec: str
    width: int
    height: int
    frames: int
    fps: float | None
    duration: float | None  # seconds


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame. ``image`` is its grey image; ``levels`` and ``lut`` are the same without the copy:
    the stored levels (the luma plane, as decoded) and the table that maps them to grey (None: they are grey), so
    a caller that crops or resizes first can map only the pixels it keeps."""

    index: int  # position in decoding order, 0-based (the row of per-frame annotations)
    time: float  # presentation time in seconds from the first frame
    levels: np.ndarray  # (H, W) uint8, possibly a strided view into the decoder's buffer
    lut: np.ndarray | None = None  # (256,) uint8

    @property
    def image(self) -> np.ndarray:
        """Grey levels (H, W) uint8."""
        return self.levels if self.lut is None else self.lut[self.levels]


def _sniff(path: Path) -> str:
    """Why a file FFmpeg cannot open is unusable: a damaged video container, a text file, or something else."""
    with open(path, "rb") as f:
        head = f.read(512)
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return f"corrupt or truncated {name} file"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "corrupt or truncated AVI file"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "corrupt or truncated MPEG-TS file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "not a video (a text file)"
    return "not a video (unrecognised file format)"


def _levels(frame) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored levels, lut to grey or None) of a decoded ``av.VideoFrame``; see ``gray_image``."""
    name = frame.format.name
    if name not in _LUMA_FORMATS:
        return frame.to_ndarray(format="gray"), None
    plane = frame.planes[0]
    luma = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    if frame.color_range == _FULL_RANGE or name.startswith("yuvj"):
        return luma, None
    return luma, _LIMITED_TO_FULL


def gray_image(frame) -> np.ndarray:
    """Grey levels (H, W) uint8 of a decoded ``av.VideoFrame``, the same levels as ``to_ndarray(format="gray")``."""
    levels, lut = _levels(frame)
    return np.array(levels) if lut is None else lut[levels]


def _first_error(logs: list) -> str | None:
    import av.logging

    for level, _name, message in logs:
        if level <= av.logging.ERROR:
            return message.strip()
    return None


class _ErrorLog:
    """FFmpeg's error messages from all threads while a file is open (decoders conceal damage and only log it).

    PyAV's log callback takes the GIL from FFmpeg's threads; closing a decoder (which joins its frame threads with
    the GIL held) while one of them logs would deadlock. So logging is switched off again before every close.
    """

    def __init__(self) -> None:
        self.messages: list = []
        self._capture = None
        self._previous = None
        self._skip = None

    def start(self) -> None:
        import av.logging

        self._previous, self._skip = av.logging.get_level(), av.logging.get_skip_repeated()
        av.logging.set_level(av.logging.ERROR)
        # PyAV holds back a repeated message until a different one arrives, which would hand it to the next file.
        av.logging.set_skip_repeated(False)
        self._capture = av.logging.Capture(local=False)
        self.messages = self._capture.__enter__()

    def stop(self) -> None:
        import av.logging

        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
            av.logging.set_level(None)  # C-level no-op callback: threads never wait for the GIL
            av.logging.set_skip_repeated(self._skip)

    def restore(self) -> None:
        import av.logging

        av.logging.set_level(self._previous)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(path, "file not found")
    if not path.is_file():
        raise VideoError(path, "not a file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")


def _open_container(path: Path, logs: list, max_pixels: int | None = None):
    """``av.open`` with failures mapped to VideoError; returns (container, first video stream). ``max_pixels``:
    FFmpeg's own limit on a frame's pixels, for the probe that opening runs and for the decoder (a larger frame is
    never decoded; the stream then states no size, and its decoding fails)."""
    import av

    options = {"max_pixels": str(max_pixels)} if max_pixels else {}
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore", options=options)
    except PermissionError:
        raise VideoError(path, "not readable (permission denied)") from None
    except av.error.FFmpegError as e:
        kind = _sniff(path)
        if kind.startswith("not a video"):
            raise VideoError(path, kind) from None
        detail = _first_error(logs) or getattr(e, "strerror", None) or str(e)
        raise VideoError(path, f"{kind} ({detail})") from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise VideoError(path, f"no video stream (contains: {', '.join(kinds)})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(path, "unsupported codec (no decoder for the video stream in this FFmpeg build)")
        if options:
            stream.codec_context.options = options
    except BaseException:
        container.close()
        raise
    return container, stream


def _stream_info(container, stream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    return VideoInfo(
        container=container.format.name,
        codec=stream.codec_context.name,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        frames=int(stream.frames or 0),
        fps=float(rate) if rate else None,
        duration=duration,
    )


class Video:
    """An open video file: ``info`` from the container, ``frames()`` to decode it. Made by ``open_video``."""

    def __init__(self, path: Path, container, stream, logs: list, thread_type: str) -> None:
        self.path = path
        self.info = _stream_info(container, stream)
        self._container, self._stream, self._logs = container, stream, logs
        stream.thread_type = thread_type

    def frames(self) -> Iterator[DecodedFrame]:
        """Decode frame by frame as grey images with presentation times; VideoError when the file is unusable.

        Frames are turned as the container's display matrix says (``frame.rotation``, counterclockwise, in quarter
        turns), as players show them: a phone's portrait recording is stored sideways with a rotation of -90.
        Times come from each frame's pts (not index / fps), shifted so the first frame is at 0, and are made
        strictly increasing (a repeated or missing pts gets the previous time plus one nominal frame interval). A
        decode error, a decoder error message (concealed damage) or fewer frames than the container declares raise
        VideoError; frames already yielded then belong to an unusable file. Stopping early skips the end-of-file
        checks.
        """
        import av

        path, logs = self.path, self._logs
        step = 1.0 / self.info.fps if self.info.fps else 1.0 / 25.0
        index, start, last = 0, None, None
        try:
            for frame in self._container.decode(self._stream):
                if logs:
                    error = _first_error(logs)
                    if error:
                        raise VideoError(path, f"corrupt video data (decoder error at frame {index}: {error})")
                t = frame.time
                if t is None:
                    t = last + step if last is not None else 0.0
                if start is None:
                    start = t
                t -= start
                if last is not None and t <= last:
                    t = last + step
                last = t
                levels, lut = _levels(frame)
                turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
                if turns:  # a display rotation (a phone held upright): the frame as a player shows it
                    levels = np.ascontiguousarray(np.rot90(levels, turns))
                yield DecodedFrame(index=index, time=t, levels=levels, lut=lut)
                index += 1
        except av.error.DecoderNotFoundError:
            raise VideoError(path, "unsupported codec (no decoder for the video stream in this FFmpeg build)") from None
        except av.error.FFmpegError as e:
            detail = _first_error(logs) or getattr(e, "strerror", None) or str(e)
            raise VideoError(path, f"corrupt or truncated video (decoding failed at frame {index}: {detail})") from None
        error = _first_error(logs)
        if error:
            raise VideoError(path, f"corrupt video data (decoder error: {error})")
        if index == 0:
            raise VideoError(path, "no decodable frames")
        declared = self.info.frames
        if declared and index < MIN_DECLARED_SHARE * declared - 1:
            raise VideoError(path, f"truncated (decoded {index} of the {declared} frames the container declares)")


@contextlib.contextmanager
def open_video(path: str | Path, thread_type: str = THREAD_TYPE, max_pixels: int | None = None) -> Iterator[Video]:
    """Open ``path`` for decoding (once, for both its info and its frames); VideoError when it is unusable.
    ``max_pixels``: frames larger than this are never decoded, not even by the probe that opening runs (a still
    image inside a video container is decoded there)."""
    path = Path(path)
    _check_file(path)
    log = _ErrorLog()
    container = stream = None
    log.start()
    try:
        container, stream = _open_container(path, log.messages, max_pixels)
        yield Video(path, container, stream, log.messages, thread_type)
    finally:
        log.stop()
        try:
            if container is not None:
                # Decoder threads still at work (the caller stopped early) finish here, without the GIL; the codec
                # context is freed later, whenever Python collects it, and must find them idle by then.
                stream.codec_context.flush_buffers()
                container.close()
        finally:
            log.restore()


def probe_video(path: str | Path) -> VideoInfo:
    """Container-level facts about the first video stream, without decoding; VideoError when unusable."""
    with open_video(path) as video:
        return video.info


def iter_frames(path: str | Path, thread_type: str = THREAD_TYPE) -> Iterator[DecodedFrame]:
    """Decode ``path`` frame by frame (see ``Video.frames``); VideoError when unusable."""
    with open_video(path, thread_type) as video:
        yield from video.frames()


def read_video(path: str | Path, thread_type: str = THREAD_TYPE) -> tuple[np.ndarray, np.ndarray]:
    """All frames of ``path``: grey (T, H, W) uint8 and times (T,) in seconds from the first frame."""
    frames, times = [], []
    for frame in iter_frames(path, thread_type=thread_type):
        frames.append(frame.image)
        times.append(frame.time)
    return np.stack(frames), np.asarray(times, dtype=np.float64)
