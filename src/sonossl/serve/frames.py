"""What a client sends, turned into the frames the model sees: decode, sector crop, resize, blank check.

The code is training's own, imported: ``sonossl.data.video`` decodes encoded bytes (any container and codec the
training data may come in, or a still image), and ``sonossl.data.clips`` finds the ultrasound sector over the clip,
crops inside it, resizes to the model's frame size and flags blank frames with the training thresholds. A frame
served is therefore preprocessed exactly as a frame trained on. The sector is found from the clip's brightness and
motion, so send a clip (a few frames of one sweep) where you can; a single frame still works from brightness alone.
A request may pin the crop instead (``parse_crop``: "x0,y0,side", as every response gives it), so that the parts of a
video too long for one request are cropped alike (``sonossl.serve.client.Client.infer_long_video``).

    clip = decode_media(data, max_frames=256)          # encoded video or image bytes -> (N, H, W) uint8
    prepared = prepare_clip(clip, card_preprocess_params(model_card))   # -> frames (N, S, S), blank (N,), ...
"""

from __future__ import annotations

import dataclasses
import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sonossl.config import PreprocessParams
from sonossl.data.clips import _frame_crop, _is_blank, _snap_crop, _video_crop, head_frames
from sonossl.data.sector import CropBox
from sonossl.data.video import DecodedFrame

MIN_SIDE = 16  # smaller frames hold no ultrasound image worth a prediction
MAX_DECODED_PIXELS = 2**29  # per request: 256 frames of 1920x1080 fit (512 MiB of grey levels)
# what a client does with a video over the frame limit: parts cropped alike, not parts that each find their own crop
SPLIT_HINT = ("send it in parts with one crop pinned (a response's crop; v2 parameters.crop, v1 crop; "
              "Client.infer_long_video and `sonossl infer` do)")


class RequestError(ValueError):
    """The request cannot be served as sent; the message says what is wrong (a 4xx for the client)."""


@dataclass
class PreparedClip:
    frames: np.ndarray  # (N, S, S) uint8, as the model sees them
    blank: np.ndarray  # (N,) bool: dark or uniform crops, which training drops
    source_hw: tuple[int, int]  # the frame size as sent
    crop: CropBox  # the sector crop, in source pixels


def check_shape(shape: tuple[int, ...] | list[int], max_frames: int, max_side: int) -> None:
    """Shape and size limits of a clip (N, H, W); RequestError naming the problem."""
    if len(shape) != 3:
        raise RequestError(f"frames must have shape [N, H, W] (or [H, W] for one frame), got {list(shape)}")
    n, h, w = shape
    if n == 0:
        raise RequestError("empty batch: the request holds no frames")
    if n > max_frames:
        raise RequestError(f"too many frames: {n} in one request, the limit is {max_frames}; {SPLIT_HINT}")
    if min(h, w) < MIN_SIDE or max(h, w) > max_side:
        raise RequestError(f"frame size {w}x{h} is outside the accepted range ({MIN_SIDE} to {max_side} pixels a side)")


def decode_media(data: bytes, max_frames: int, max_side: int = 4096,
                 max_pixels: int = MAX_DECODED_PIXELS) -> list[DecodedFrame]:
    """Decode an encoded video or image into frames; RequestError when the bytes are not decodable, too long or too
    large. The limits are checked frame by frame as they decode: a few megabytes of video can hold gigabytes of
    frames, which must be refused before they are in memory, not after. A still image's size is read from its
    header first (Pillow, no pixel decoded), because FFmpeg decodes an image's one frame already to open it: a
    16000x16000 PNG is 280 KB. Whatever the container, FFmpeg itself decodes no frame of more than ``max_side``
    squared pixels (its ``max_pixels``; an image inside a video container, which Pillow does not read, is decoded
    while the container opens), and a video's stated frame size is checked before its frames decode."""
    from sonossl.data.video import VideoError, open_video

    if not data:
        raise RequestError("empty bytes: expected an encoded video or image")
    stated = _image_header_size(data)
    if stated is not None:
        _check_stated(stated, max_frames, max_side, max_pixels)
    frames: list[DecodedFrame] = []
    pixels, frame_limit = 0, min(max_side * max_side, max_pixels)
    with tempfile.TemporaryDirectory(prefix="sonossl-serve-") as tmp:
        path = Path(tmp) / "media"
        path.write_bytes(data)
        try:
            with open_video(path, max_pixels=frame_limit) as video:
                # the stored size, before any display rotation: the same sides and pixel count
                _check_stated((video.info.width, video.info.height), max_frames, max_side, max_pixels)
                for f in video.frames():
                    if len(frames) == max_frames:
                        raise RequestError(f"too many frames: the video has more than {max_frames}, the limit "
                                           f"per request; {SPLIT_HINT}")
                    if not frames:
                        check_shape((1, *f.levels.shape), max_frames, max_side)
                    elif f.levels.shape != frames[0].levels.shape:
                        raise RequestError("frame size changes within the video")
                    pixels += f.levels.size
                    if pixels > max_pixels:
                        h, w = f.levels.shape
                        raise RequestError(f"video too large: {len(frames) + 1} frames of {w}x{h} exceed "
                                           f"{max_pixels:,} decoded pixels per request; send fewer frames or "
                                           "smaller ones")
                    # the decoder reuses its buffers: keep a copy of the stored levels (and their map to grey)
                    frames.append(DecodedFrame(f.index, f.time, np.array(f.levels), f.lut))
        except VideoError as e:
            if "max pixel count" in e.reason:  # FFmpeg refused to decode a frame for its size
                raise RequestError(f"frame too large: {e.reason}; frames of more than {frame_limit:,} pixels "
                                   f"({max_side}x{max_side}) are not decoded") from None
            raise RequestError(f"undecodable bytes: {e.reason}") from None
    if not frames:
        raise RequestError("undecodable bytes: no frames")
    return frames  # the size and count limits were checked frame by frame above


def _image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a still image's header (PNG, JPEG, BMP, GIF, TIFF, WebP, ...), read without decoding a
    pixel; None for bytes Pillow does not take for an image (a video)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError as e:  # over twice Pillow's pixel limit: far over ours too
        raise RequestError(f"image too large: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # not an image, or a damaged header
        return None


def _check_stated(size: tuple[int, int], max_frames: int, max_side: int, max_pixels: int) -> None:
    """The frame size a header states (0 where it states none), against the limits, before anything decodes."""
    w, h = size
    if w > 0 and h > 0:
        check_shape((1, h, w), max_frames, max_side)
        if w * h > max_pixels:
            raise RequestError(f"frame size {w}x{h} exceeds {max_pixels:,} decoded pixels per request; send "
                               "smaller frames")


def card_preprocess_params(card: dict) -> PreprocessParams:
    """The preprocessing a model was trained with (frame size, blank thresholds), from its model card."""
    pre = card["params"]["preprocess"]
    return dataclasses.replace(PreprocessParams(), frame_size=int(pre["frame_size"]),
                               blank_mean=float(pre["blank_mean"]), blank_std=float(pre["blank_std"]))


def as_decoded(frames: np.ndarray) -> list[DecodedFrame]:
    """A uint8 (N, H, W) array as decoded frames (grey levels, no map)."""
    return [DecodedFrame(i, float(i), np.ascontiguousarray(f)) for i, f in enumerate(frames)]


def prepare_clip(frames: list[DecodedFrame] | np.ndarray, params: PreprocessParams,
                 crop: CropBox | None = None) -> PreparedClip:
    """Sector crop and resize, as in ``sonossl.data.clips.preprocess``; one crop box for the whole clip: found
    from its frames, or ``crop`` as given (snapped to the frame size as a found one is; RequestError where it does
    not fit the frames)."""
    if isinstance(frames, np.ndarray):
        frames = as_decoded(frames)
    h, w = frames[0].levels.shape
    if crop is None:
        crop = _video_crop(frames)
    elif crop.x0 + crop.side > w or crop.y0 + crop.side > h:
        raise RequestError(f"crop {crop_text(crop)}: a square of {crop.side} pixels at x0={crop.x0}, y0={crop.y0} "
                           f"does not fit the {w}x{h} frames")
    crop = _snap_crop(crop, params.frame_size)
    small = np.stack([_frame_crop(f, crop, params.frame_size) for f in frames])
    blank = np.array([_is_blank(s, params) for s in small], dtype=bool)
    return PreparedClip(frames=small, blank=blank, source_hw=(int(h), int(w)), crop=crop)


def crop_text(crop: CropBox) -> str:
    """A crop as requests and responses carry it: "x0,y0,side" in source pixels."""
    return f"{crop.x0},{crop.y0},{crop.side}"


def parse_crop(value: Any, where: str) -> CropBox:
    """A crop pinned by a request: "x0,y0,side" (as responses give it; v2 parameters are scalars) or a list of the
    three whole numbers, in ASCII digits; RequestError naming ``where`` otherwise. The side may be below MIN_SIDE:
    the crop found in a small frame can be (a 16-pixel frame's is 13), and it must be possible to send it back."""
    parts = value.split(",") if isinstance(value, str) else value
    numbers = []
    if isinstance(parts, list | tuple) and len(parts) == 3:
        for part in parts:
            text = part.strip() if isinstance(part, str) else part
            if isinstance(text, int) and not isinstance(text, bool) and 0 <= text < 10**6:
                numbers.append(text)
            elif isinstance(text, str) and re.fullmatch(r"[0-9]{1,6}", text):
                numbers.append(int(text))
    if len(numbers) != 3 or numbers[2] < 1:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise RequestError(f'{where}: expected the sector crop as "x0,y0,side", three whole numbers of pixels (the '
                           f"side at least 1), as a response's `crop` gives it; got {shown}")
    x0, y0, side = numbers
    return CropBox(x0=x0, y0=y0, side=side, method="given")


def video_head(frames: Iterator[DecodedFrame]) -> list[DecodedFrame]:
    """The first frames of a video that preprocessing finds its sector from (``sonossl.data.clips.head_frames``
    of them), copied, as the decoder reuses its buffers; the iterator goes
    on from the next frame. ``sonossl.data.clips._video_crop`` of them is the video's crop as training found it."""
    head: list[DecodedFrame] = []
    for f in frames:
        if head and f.levels.shape != head[0].levels.shape:
            raise ValueError(f"frame size changes mid-video ({head[0].levels.shape[1]}x{head[0].levels.shape[0]} "
                             f"-> {f.levels.shape[1]}x{f.levels.shape[0]})")
        head.append(DecodedFrame(f.index, f.time, np.array(f.levels), f.lut))
        if len(head) == head_frames(*f.levels.shape):
            break
    return head
