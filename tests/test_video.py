"""PyAV decoding: round trips per container and codec, grey levels, timestamps, and every way a file is unusable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import smooth_frames, write_audio_only, write_unknown_codec, write_vfr_video, write_video

from sonossl.data.video import VideoError, encode_video, gray_image, iter_frames, open_video, probe_video, read_video


def test_h264_round_trip_keeps_count_levels_and_times(tmp_path: Path) -> None:
    frames = smooth_frames(t=15, h=48, w=64)
    path = encode_video(tmp_path / "clip.mp4", frames, fps=12.5)
    decoded, times = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # H.264 at crf 18 on smooth content: a grey level or two of error, no shift of the levels.
    assert np.abs(decoded.astype(int) - frames).mean() < 2.0
    assert abs(decoded.astype(float).mean() - frames.mean()) < 1.0
    np.testing.assert_allclose(times, np.arange(15) / 12.5, atol=1e-6)
    info = probe_video(path)
    assert (info.codec, info.width, info.height, info.frames) == ("h264", 64, 48, 15)
    assert info.fps == pytest.approx(12.5)


def _with_display_matrix(path: Path, matrix: tuple[int, ...]) -> Path:
    """The MP4 with its track header's display matrix replaced (16.16 fixed point), as a phone writes it."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    offset = at + 8 + (4 * 5 if version == 0 else 8 + 8 + 4 + 4 + 8) + 8 + 2 + 2 + 2 + 2
    data[offset:offset + 36] = struct.pack(">9i", *matrix)
    out = path.with_name(f"turned-{path.name}")
    out.write_bytes(bytes(data))
    return out


def test_a_display_rotation_is_applied_as_players_apply_it(tmp_path: Path) -> None:
    """A portrait phone recording is stored sideways with a display matrix that turns it a quarter clockwise
    (QuickTime's matrix a=0, b=1, c=-1, d=0; FFmpeg calls it a rotation of -90): frames come out upright."""
    frames = np.full((6, 48, 64), 40, np.uint8)
    frames[:, :16, :16] = 220  # a bright square in the top left corner as stored
    stored = encode_video(tmp_path / "clip.mp4", frames, fps=10.0)
    turned = _with_display_matrix(stored, (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000))
    decoded, _ = read_video(turned)
    assert decoded.shape == (6, 64, 48)  # portrait
    # a quarter turn clockwise takes the top left corner to the top right
    assert decoded[:, :16, -16:].mean() > 200 and decoded[:, :16, :16].mean() < 60
    assert probe_video(turned).width == 64  # the container's size, as stored
    upside_down = _with_display_matrix(stored, (-0x10000, 0, 0, 0, -0x10000, 0, 0, 0, 0x40000000))
    decoded, _ = read_video(upside_down)
    assert decoded.shape == (6, 48, 64) and decoded[:, -16:, -16:].mean() > 200
    assert np.array_equal(read_video(stored)[0], np.rot90(read_video(upside_down)[0], 2, axes=(1, 2)))


@pytest.mark.parametrize(
    ("suffix", "codec", "tolerance"),
    [("avi", "mpeg4", 4.0), ("mov", "mpeg4", 4.0), ("mpeg", "mpeg2video", 6.0), ("gif", "gif", 0.0), ("mkv", "ffv1", 0.0)],
)
def test_container_and_codec_variants_decode(tmp_path: Path, suffix: str, codec: str, tolerance: float) -> None:
    frames = smooth_frames(t=12, h=48, w=64, seed=1)
    fps = 25.0 if suffix == "mpeg" else 10.0  # MPEG-2 allows only standard frame rates
    path = write_video(tmp_path / f"name with spaces+[1] (2).{suffix}", frames, fps=fps)
    with open_video(path) as video:
        assert video.info.codec == codec
        decoded = list(video.frames())
    assert [f.index for f in decoded] == list(range(12))
    images = np.stack([f.image for f in decoded])
    assert images.shape == frames.shape
    assert np.abs(images.astype(int) - frames).mean() <= tolerance
    times = np.array([f.time for f in decoded])
    np.testing.assert_allclose(np.diff(times), 1 / fps, atol=0.011)  # GIF stores centiseconds
    assert times[0] == 0.0


@pytest.mark.parametrize("suffix", ["mp4", "avi", "mpeg"])
def test_grey_levels_equal_pyav_gray_conversion(tmp_path: Path, suffix: str) -> None:
    """The fast luma path gives what ``to_ndarray(format="gray")`` gives, full range (mp4) or limited (others)."""
    import av

    frames = smooth_frames(t=4, h=48, w=64, seed=2)
    path = write_video(tmp_path / f"v.{suffix}", frames, fps=25.0)
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            ours = gray_image(frame)
            theirs = frame.to_ndarray(format="gray")
            assert ours.shape == theirs.shape
            assert np.abs(ours.astype(int) - theirs).max() <= 1
    ranges = {f.lut is None for f in iter_frames(path)}
    assert ranges == ({True} if suffix == "mp4" else {False})  # encode_video flags full range; the others do not


def test_variable_frame_rate_times_come_from_pts(tmp_path: Path) -> None:
    times_ms = [0, 40, 60, 200, 210, 500, 530, 900]
    frames = smooth_frames(t=len(times_ms), h=32, w=32)
    path = write_vfr_video(tmp_path / "vfr.mkv", frames, times_ms)
    decoded, times = read_video(path)
    np.testing.assert_allclose(times, np.array(times_ms) / 1000, atol=1e-6)
    np.testing.assert_array_equal(decoded, frames)  # FFV1 is lossless


def _unusable(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    frames = smooth_frames(t=20, h=48, w=64)
    good = encode_video(tmp_path / "good.mp4", frames, fps=10)
    data = good.read_bytes()
    truncated_avi = write_video(tmp_path / "full.avi", frames)
    avi = truncated_avi.read_bytes()
    (tmp_path / "truncated.avi").write_bytes(avi[: len(avi) // 2])
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("this is a text file renamed to .mp4\n" * 20)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "folder.mp4").mkdir()
    write_audio_only(tmp_path / "audio.mp4")
    write_unknown_codec(tmp_path / "unknown.avi", frames)
    return {
        "missing": (tmp_path / "missing.mp4", "file not found"),
        "empty": (tmp_path / "empty.mp4", "empty file (0 bytes)"),
        "text": (tmp_path / "notes.mp4", "not a video (a text file)"),
        "noise": (tmp_path / "noise.mp4", "not a video (unrecognised file format)"),
        "directory": (tmp_path / "folder.mp4", "not a file"),
        "truncated mp4": (tmp_path / "truncated.mp4", "corrupt or truncated MP4/MOV file (moov atom not found)"),
        "truncated avi": (tmp_path / "truncated.avi", "corrupt"),  # header cut or decoder errors, by the cut
        "audio only": (tmp_path / "audio.mp4", "no video stream (contains: audio)"),
        "unknown codec": (tmp_path / "unknown.avi", "unsupported codec"),
    }


def test_every_kind_of_unusable_file_has_a_clear_reason(tmp_path: Path) -> None:
    cases = _unusable(tmp_path)
    for name, (path, reason) in cases.items():
        with pytest.raises(VideoError) as err:
            read_video(path)
        assert err.value.reason.startswith(reason), f"{name}: {err.value.reason!r}"
        assert str(path) in str(err.value)
    # The good file next to them decodes: the failures are about the files, not the decoder state.
    assert read_video(tmp_path / "good.mp4")[0].shape == (20, 48, 64)


def test_damage_the_decoder_conceals_is_still_reported(tmp_path: Path) -> None:
    """Overwritten bytes inside the H.264 data: FFmpeg conceals the damage and only logs it."""
    frames = smooth_frames(t=30, h=64, w=64, seed=3)
    data = bytearray(encode_video(tmp_path / "clean.mp4", frames, fps=10).read_bytes())
    start = data.index(b"mdat") + len(data) // 3
    data[start : start + 400] = np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes()
    (tmp_path / "damaged.mp4").write_bytes(bytes(data))
    with pytest.raises(VideoError) as err:
        read_video(tmp_path / "damaged.mp4")
    assert err.value.reason.startswith(("corrupt video data", "corrupt or truncated video"))


def test_truncation_is_detected_against_the_declared_frame_count(tmp_path: Path) -> None:
    """An AVI cut at a packet boundary decodes cleanly but yields fewer frames than its header declares."""
    frames = smooth_frames(t=40, h=48, w=64, seed=4)
    path = write_video(tmp_path / "full.avi", frames)
    data = path.read_bytes()
    # The index (idx1) sits at the end; cutting the last third of the file removes frames and the index.
    cut = tmp_path / "cut.avi"
    movi = data.index(b"movi")
    chunks, pos = [], movi + 4
    while data[pos : pos + 2] == b"00":  # '00dc' video chunks: 4-byte id, 4-byte size, payload, pad to even
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        chunks.append(pos)
        pos += 8 + size + (size & 1)
    cut.write_bytes(data[: chunks[len(chunks) // 2]])
    with pytest.raises(VideoError) as err:
        read_video(cut)
    assert err.value.reason.startswith("truncated (decoded 20 of the 40 frames")
