"""The KServe endpoint, for real: ``python -m sonossl.serve`` on 127.0.0.1 serving the model exported on the tiny
profile, called over HTTP with v2 and v1 requests, bad inputs, a concurrent burst, and its request log checked."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import start_server, stop_server

MAX_FRAMES = 40
MAX_BODY_MB = 4


def _sweep(tiny_clips: Path, i: int = 0) -> Path:
    raw = tiny_clips.parent / "raw"
    return raw / sorted(line.split(",")[0] for line in (raw / "labels.csv").read_text().splitlines()[1:])[i]


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    srv = start_server(tiny_export, work, str(work / "requests"), "--max-frames", str(MAX_FRAMES),
                       "--max-body-mb", str(MAX_BODY_MB))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    from sonossl.serve.client import Client

    with Client(server.url) as c:  # its connections closed after the module's tests
        yield c


def _expected(tiny_export: Path, frames: np.ndarray) -> dict:
    """The in-process answer: training's preprocessing and the bundle, no server."""
    from sonossl.export import load_bundle
    from sonossl.serve.frames import card_preprocess_params, prepare_clip

    bundle = load_bundle(tiny_export)
    params = card_preprocess_params(bundle.card)
    return bundle.predict(prepare_clip(frames, params).frames)


def test_v2_frames_match_the_in_process_model(client, tiny_export, tiny_clips):
    from sonossl.data.video import read_video

    frames, _ = read_video(_sweep(tiny_clips))
    frames = frames[:12]
    out = client.infer_frames(frames)
    card = json.loads((tiny_export / "model_card.json").read_text())
    n, c = len(frames), len(card["classes"])
    assert out["model_version"] == card["model_version"] and out["classes"] == card["classes"]
    assert out["probs"].shape == (n, c) and np.allclose(out["probs"].sum(1), 1, atol=1e-5)
    size = int(card["output"]["saliency"].split(",")[1])
    assert out["saliency"].shape == (n, size, size) and np.allclose(out["saliency"].sum((1, 2)), 1, atol=1e-3)
    assert out["embedding"].shape[0] == n and out["blank"].shape == (n,)
    expected = _expected(tiny_export, frames)
    assert np.allclose(out["probs"], expected["probs"], atol=1e-5)
    assert list(out["label"]) == list(expected["label"])
    assert np.allclose(out["embedding"], expected["embedding"], atol=1e-4)


def test_v2_encoded_video_and_image(client, tiny_clips, tmp_path):
    from PIL import Image

    from sonossl.data.video import read_video

    path = _sweep(tiny_clips, 1)
    frames, _ = read_video(path)
    out = client.infer_video(path)  # mp4 bytes, decoded by the server
    assert out["probs"].shape[0] == len(frames)
    assert np.allclose(out["probs"], client.infer_frames(frames)["probs"], atol=1e-5)
    png = io.BytesIO()
    Image.fromarray(frames[0]).save(png, format="PNG")
    one = client.infer_video(png.getvalue())  # a still image: one frame
    assert one["probs"].shape[0] == 1 and one["saliency"].shape[0] == 1


def test_v1_frames_and_b64(server, tiny_clips):
    from sonossl.data.video import read_video

    frames, _ = read_video(_sweep(tiny_clips))
    url = f"{server.url}/v1/models/sonossl:predict"
    r = requests.post(url, json={"instances": frames[:3].tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 3 and body["model_version"] and len(body["crop"].split(",")) == 3
    p = body["predictions"][0]
    assert set(p) == {"label", "probs", "saliency", "embedding", "blank"}
    assert abs(sum(p["probs"].values()) - 1) < 1e-4 and p["label"] in body["classes"]
    b64 = base64.b64encode(_sweep(tiny_clips).read_bytes()).decode()
    r = requests.post(url, json={"instances": [{"b64": b64}]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["predictions"]) == len(frames)
    # base64 wrapped every 76 characters, as `base64 file` writes it, is the same video
    wrapped = base64.encodebytes(_sweep(tiny_clips).read_bytes()).decode()
    assert "\n" in wrapped
    again = requests.post(url, json={"instances": [{"b64": wrapped}]}, timeout=60)
    assert again.status_code == 200 and again.json()["predictions"] == r.json()["predictions"]


def _v2(data=None, shape=(2, 32, 32), datatype="UINT8", name="frames"):
    if data is None:
        data = [0] * int(np.prod(shape))
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}


BAD_V2 = {
    "wrong datatype": (_v2(datatype="FP32"), 400, "datatype FP32 is not accepted"),
    "shape does not match the data": (_v2(data=[1, 2, 3]), 400, "needs 2048 values, data holds 3"),
    "wrong rank": (_v2(shape=(2, 2, 16, 16)), 400, "must have shape [N, H, W]"),
    "empty batch": (_v2(data=[], shape=(0, 32, 32)), 400, "empty batch"),
    "out of range": (_v2(data=[300] * 2048), 400, "must lie in 0-255"),
    "not numbers": (_v2(data=["a"] * 2048), 400, "must be numbers"),
    "two inputs": ({"inputs": _v2()["inputs"] * 2}, 400, "exactly one input"),
    "undecodable bytes": (_v2(data=[base64.b64encode(b"this is no video").decode()], shape=(1,),
                              datatype="BYTES"), 400, "undecodable bytes: not a video"),
    "not base64": (_v2(data=["***"], shape=(1,), datatype="BYTES"), 400, "not valid base64"),
    "too many frames": (_v2(shape=(MAX_FRAMES + 1, 16, 16)), 400, f"the limit is {MAX_FRAMES}"),
    "frame too small": (_v2(shape=(1, 4, 4)), 400, "outside the accepted range"),
    "crop not three numbers": ({**_v2(), "parameters": {"crop": "1,2"}}, 400,
                               'parameters.crop: expected the sector crop as \\"x0,y0,side\\"'),
    "crop not whole numbers": ({**_v2(), "parameters": {"crop": "0,0,20.5"}}, 400, "got '0,0,20.5'"),
    "crop of no side": ({**_v2(), "parameters": {"crop": "0,0,0"}}, 400, "the side at least 1"),
    "crop in other digits": ({**_v2(), "parameters": {"crop": "\u0661,\u0662,32"}}, 400, "three whole numbers"),
    "crop with a sign": ({**_v2(), "parameters": {"crop": "+1,0,16"}}, 400, "three whole numbers"),
    "crop too long to echo": ({**_v2(), "parameters": {"crop": "9" * 5000}}, 400, "got '" + "9" * 56 + '..."}'),
    "crop outside the frames": ({**_v2(), "parameters": {"crop": "10,0,30"}}, 400,
                                "a square of 30 pixels at x0=10, y0=0 does not fit the 32x32 frames"),
}


def test_bad_inputs_get_a_4xx_that_names_the_problem_and_the_server_stays_up(server, client, tiny_clips):
    infer = f"{server.url}/v2/models/sonossl/infer"
    for case, (body, status, message) in BAD_V2.items():
        r = requests.post(infer, json=body, timeout=30)
        assert r.status_code == status, (case, r.status_code, r.text)
        assert message in r.text, (case, r.text)
    # JSON that is not JSON; NaN (Python's json writes it, strict JSON has no NaN)
    r = requests.post(infer, data=b'{"inputs": [', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "JSON decode error" in r.text
    r = requests.post(f"{server.url}/v1/models/sonossl:predict", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "Unrecognized request format" in r.text
    nan = json.dumps(_v2(data=[float("nan")] * 2048))
    r = requests.post(infer, data=nan, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "NaN" in r.text
    # over the size limit: refused before the body is read
    big = b"0" * (MAX_BODY_MB * 2**20 + 1)
    r = requests.post(infer, data=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "over the limit" in r.text
    # a body of unknown length (chunked: a generator), as a proxy may send it: counted as it arrives
    chunks = (big[i:i + 2**20] for i in range(0, len(big), 2**20))
    r = requests.post(infer, data=chunks, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "request body of at least" in r.text
    small = json.dumps(_v2(shape=(1, 32, 32), data=[90] * 1024)).encode()
    r = requests.post(infer, data=(small[i:i + 1000] for i in range(0, len(small), 1000)),
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"][0] == 1, r.text
    # v1 mistakes
    for body, message in [({"instances": []}, "empty batch"), ({"rows": [1]}, "expected {\"instances\""),
                          ({"instances": [[1, 2, 3]]}, "H x W list"),
                          ({"instances": [{"b64": "", "x": 1}]}, "one instance"),
                          ({"instances": [[[0] * 32] * 32], "crop": [0, 0]}, "crop: expected the sector crop")]:
        r = requests.post(f"{server.url}/v1/models/sonossl:predict", json=body, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    # still serving
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert client.infer_video(_sweep(tiny_clips))["probs"].shape[0] > 0


def test_a_video_over_the_frame_limit_is_sent_in_parts_cropped_alike(server, client, tiny_export, tiny_clips,
                                                                      tmp_path):
    """One request takes at most --max-frames; infer_long_video sends a longer video in parts, each with the crop
    preprocessing finds from the video's first frames pinned, so every frame gets the answer of the whole video
    cropped once (parts that each found their own crop would each be cropped differently)."""
    from conftest import write_video
    from sonossl.data.clips import _video_crop
    from sonossl.data.video import iter_frames, read_video
    from sonossl.export import load_bundle
    from sonossl.serve.client import EndpointError
    from sonossl.serve.frames import card_preprocess_params, parse_crop, prepare_clip, video_head

    frames = np.concatenate([read_video(_sweep(tiny_clips, i))[0] for i in range(3)])
    assert len(frames) > 2 * MAX_FRAMES
    path = write_video(tmp_path / "long.mp4", frames)
    with pytest.raises(EndpointError, match=f"more than {MAX_FRAMES}, the limit per request; send it in parts with "
                                            r"one crop pinned \(a response's crop; v2 parameters.crop, v1 crop; "
                                            r"Client.infer_long_video and `sonossl infer` do\)"):
        client.infer_video(path)
    out = client.infer_long_video(path, frames_per_request=MAX_FRAMES)
    grey = np.stack([np.array(f.image) for f in iter_frames(path)])
    n = len(grey)
    assert out["probs"].shape[0] == out["embedding"].shape[0] == out["blank"].shape[0] == len(out["label"]) == n
    assert len(out["ids"]) == -(-n // MAX_FRAMES) and len(set(out["ids"])) == len(out["ids"])
    bundle = load_bundle(tiny_export)
    crop = _video_crop(video_head(iter_frames(path)))  # as preprocessing finds it, from the first frames
    prepared = prepare_clip(grey, card_preprocess_params(bundle.card), crop)
    assert out["crop"] == f"{prepared.crop.x0},{prepared.crop.y0},{prepared.crop.side}"
    expected = bundle.predict(prepared.frames)
    assert np.allclose(out["probs"], expected["probs"], atol=1e-5) and list(out["label"]) == list(expected["label"])
    assert np.allclose(out["embedding"], expected["embedding"], atol=1e-4)
    # a part sent again with that crop pinned gets the same answer; the pinned crop comes back as it was snapped
    part = client.infer_frames(grey[-7:], crop=out["crop"])
    assert part["crop"] == out["crop"] and np.allclose(part["probs"], out["probs"][-7:], atol=1e-5)
    assert parse_crop(out["crop"], "x") == parse_crop(out["crop"].split(","), "x")
    small = client.infer_frames(grey[:3, :16, :16])  # a small frame's crop (side under 16) can be sent back
    assert int(small["crop"].split(",")[2]) < 16 and client.infer_frames(grey[:3, :16, :16], crop=small["crop"])[
        "crop"] == small["crop"]
    with pytest.raises(ValueError, match="frames_per_request: at least 1"):
        client.infer_long_video(path, frames_per_request=0)


def test_a_concurrent_burst_is_served_without_error(client, tiny_clips):
    from sonossl.data.video import read_video

    frames, _ = read_video(_sweep(tiny_clips, 2))
    clips = [frames[i % 20:i % 20 + 4] for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(client.infer_frames, clips))
    assert all(o["probs"].shape[0] == 4 for o in outs)
    # same input, same answer, whatever the interleaving
    assert np.allclose(outs[0]["probs"], outs[20]["probs"], atol=1e-5)


def test_request_log_holds_statistics_and_embeddings_but_no_pixels(server, client, tiny_clips, tiny_export):
    import time

    from sonossl.monitor.request_log import read_request_log

    frames = np.full((3, 64, 80), 0, np.uint8)
    frames[:, 10:60, 10:70] = 90  # a bright box: not blank
    request_id = client.infer_frames(frames)["id"]
    deadline, rows = time.monotonic() + 10, []
    while len(rows) < 3 and time.monotonic() < deadline:  # the log is written every 0.2 s, off the request path
        time.sleep(0.2)
        if list(server.log_dir.rglob("*.jsonl")):
            log = read_request_log(server.log_dir)
            rows = log[log.request_id == request_id]
    assert len(rows) == 3 and set(rows.width) == {80}
    card = json.loads((tiny_export / "model_card.json").read_text())
    dims = card["reference"]["embedding_dims"]
    assert {"ts", "request_id", "model_version", "mean", "contrast", "speckle_snr", "coverage", "label",
            "confidence", "blank"} <= set(rows.columns)
    assert [c for c in rows.columns if c.startswith("emb_")] == [f"emb_{j}" for j in range(dims)]
    assert set(rows.model_version) == {card["model_version"]}
    assert rows.request_id.nunique() == 1 and rows.frame.tolist() == [0, 1, 2]
    # nothing that could hold an image: every value is a scalar
    raw = "".join(p.read_text() for p in server.log_dir.rglob("*.jsonl"))
    assert "[" not in raw


def test_request_log_to_s3(tiny_export, s3_server, tmp_path, tiny_clips):
    from sonossl.monitor.request_log import read_request_log
    from sonossl.serve.client import Client

    uri = f"s3://{s3_server.bucket}/sonossl/requests"
    srv = start_server(tiny_export, tmp_path, uri)
    try:
        n = Client(srv.url).infer_video(_sweep(tiny_clips))["probs"].shape[0]
    finally:
        output = stop_server(srv)  # SIGTERM flushes the log
    assert "Traceback" not in output
    rows = read_request_log(uri)
    assert len(rows) == n and rows.request_id.nunique() == 1
    assert all(k.startswith("sonossl/requests/date=") and k.endswith(".jsonl") for k in s3_server.objects())


def test_a_missing_model_is_a_clear_error(tmp_path, capsys):
    from sonossl.cli import main

    assert main(["serve", "--model-dir", str(tmp_path), "--http-port", "1"]) == 2
    assert f"{tmp_path}: no exported model (model.pt)" in capsys.readouterr().err


def test_the_client_sends_grey_levels_as_they_are_or_refuses_them(server, client, tiny_clips):
    """Whole numbers 0-255 of any dtype are the same frames; frames in [0, 1] (as image libraries load them) or 16-bit
    levels would have been cast to uint8, black or wrapped, and answered with confident labels: refused, naming the
    range, before anything is sent."""
    from sonossl.data.video import read_video

    frames, _ = read_video(_sweep(tiny_clips))
    frames = frames[:3]
    expected = client.infer_frames(frames)["probs"]
    assert np.allclose(client.infer_frames(frames.astype(np.float32))["probs"], expected, atol=1e-6)
    assert np.allclose(client.infer_frames(frames.astype(np.int64).tolist())["probs"], expected, atol=1e-6)
    for bad, match in [(frames / 255.0, r"dtype float64 with values from 0\.0 to .*frames in \[0, 1\]\?"),
                       (frames.astype(np.uint16) * 4, "dtype uint16 with values from 0 to [0-9]+; expected grey levels"),
                       (frames.astype(bool), "dtype bool")]:
        with pytest.raises(ValueError, match=match):
            client.infer_frames(bad)


def test_the_binary_data_extension_gives_the_same_answer(server, client, tiny_clips):
    from sonossl.data.video import read_video

    frames, _ = read_video(_sweep(tiny_clips))
    assert np.allclose(client.infer_frames(frames[:5], binary=True)["probs"],
                       client.infer_frames(frames[:5])["probs"], atol=1e-6)
    # a body that does not match its JSON header is the client's mistake: a 400 saying so, not a 500
    infer = f"{server.url}/v2/models/sonossl/infer"
    for spec, payload, length in [
            ({"shape": [1, 64, 64], "datatype": "UINT8"}, b"\0" * 100, None),  # 100 bytes for 4096 pixels
            ({"shape": [1], "datatype": "BYTES"}, b"\xff" * 10, None),  # a BYTES element cut short
            ({"shape": [1, 64, 64], "datatype": "UINT8"}, b"\0" * 4096, "twelve")]:  # the header length
        header = json.dumps({"inputs": [{"name": "frames", **spec,
                                         "parameters": {"binary_data_size": len(payload)}}]}).encode()
        r = requests.post(infer, data=header + payload, timeout=30, headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": length or str(len(header))})
        assert r.status_code == 400 and "binary data extension" in r.json()["error"], (spec, r.text)
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


def test_an_encoded_video_is_refused_while_it_decodes_not_after(tmp_path):
    """A few kilobytes of video can hold gigabytes of frames: the size limits stop the decoding at the first frame
    too large (FFmpeg decodes none over max_side squared pixels), or at the frame that takes the clip past the pixel
    budget."""
    from conftest import write_video
    from sonossl.serve.frames import RequestError, decode_media

    data = write_video(tmp_path / "v.mkv", np.full((50, 64, 64), 90, np.uint8)).read_bytes()
    assert len(decode_media(data, max_frames=256)) == 50
    with pytest.raises(RequestError, match="frame too large: .*Picture size 64x64 exceeds .* max pixel count 1024"):
        decode_media(data, max_frames=256, max_side=32)
    with pytest.raises(RequestError, match=r"video too large: 11 frames of 64x64 exceed 40,960 decoded pixels"):
        decode_media(data, max_frames=256, max_pixels=10 * 64 * 64)


def test_a_stated_frame_size_too_large_is_refused_before_any_frame_decodes(tmp_path, monkeypatch):
    """A still image's size is in its header, and FFmpeg decodes the image to open it: a 16000x16000 PNG (280 KB)
    took 3.6 s and 263 MiB before its size was refused. Its header is read first now (Pillow), by side and by pixel
    count, before FFmpeg opens anything; a video's stated size is checked before its first frame decodes."""
    import zlib

    import av

    from conftest import write_video
    from sonossl.data import video
    from sonossl.serve import frames
    from sonossl.serve.frames import RequestError, decode_media

    path = tmp_path / "wide.png"
    with av.open(str(path), "w") as out:  # one grey frame of 5000x20: too wide for the default 4096 a side
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 5000, 20, "gray"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((20, 5000), 90, np.uint8), format="gray")):
            out.mux(packet)
    data = path.read_bytes()
    assert decode_media(data, max_frames=4, max_side=5000)[0].levels.shape == (20, 5000)

    clip = write_video(tmp_path / "v.mkv", np.full((5, 8, 64), 90, np.uint8)).read_bytes()  # 8 rows: too few

    def no_decoding(*args, **kw):
        raise AssertionError("decoded")

    monkeypatch.setattr(frames, "_image_header_size", lambda data: None)  # as FFmpeg alone sees it
    monkeypatch.setattr(video.Video, "frames", no_decoding)
    with pytest.raises(RequestError, match="frame size 5000x20 is outside the accepted range"):
        decode_media(data, max_frames=4)
    with pytest.raises(RequestError, match="frame size 64x8 is outside the accepted range"):
        decode_media(clip, max_frames=4)
    monkeypatch.undo()
    monkeypatch.setattr(video, "open_video", no_decoding)  # the image's header: FFmpeg never opens it
    with pytest.raises(RequestError, match="frame size 5000x20 is outside the accepted range"):
        decode_media(data, max_frames=4)
    with pytest.raises(RequestError, match=r"frame size 5000x20 exceeds 50,000 decoded pixels"):
        decode_media(data, max_frames=4, max_side=5000, max_pixels=50_000)
    # a PNG header of 16000x16000 (over Pillow's own limit of 179 M pixels): refused from the header alone
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (16000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(RequestError, match=r"image too large: Image size \(256000000 pixels\)"):
        decode_media(bomb, max_frames=4)
    monkeypatch.undo()
    # a PNG frame of 100x100 inside an AVI that states 16x16: Pillow does not read it, and FFmpeg, which would
    # decode it while opening the container, decodes no frame over max_side squared pixels
    avi = tmp_path / "png.avi"
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (100).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 101 * 100)) + chunk(b"IEND", b""))
    with av.open(str(avi), "w", format="avi") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "gray"
        packet = av.Packet(png)
        packet.stream, packet.pts, packet.dts = stream, 0, 0
        out.mux(packet)
    assert decode_media(avi.read_bytes(), max_frames=4)[0].levels.shape == (100, 100)
    with pytest.raises(RequestError, match=r"frame too large: .* max pixel count 4096, .*\(64x64\) are not"):
        decode_media(avi.read_bytes(), max_frames=4, max_side=64)


def test_https_with_a_certificate_and_one_worker(tiny_export, tmp_path, monkeypatch, capsys):
    """--ssl_certfile and --ssl_keyfile serve HTTPS (KServe's options, honoured); a missing file or half a pair is
    refused, naming the option, and so is --workers other than 1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from sonossl.serve.__main__ import main
    from sonossl.serve.client import Client

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    common = ["--model-dir", str(tiny_export), "--http-port", "1"]
    assert main([*common, "--ssl_certfile", str(tmp_path / "cert.pem")]) == 2
    assert "needs both --ssl_certfile and --ssl_keyfile" in capsys.readouterr().err
    assert main([*common, "--ssl_certfile", str(tmp_path / "cert.pem"), "--ssl_keyfile", str(tmp_path / "no")]) == 2
    assert f"--ssl_keyfile {tmp_path / 'no'}: no such file" in capsys.readouterr().err
    assert main([*common, "--workers", "2"]) == 2
    assert "--workers 2: the server runs one worker" in capsys.readouterr().err

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "cert.pem"))  # requests prefers it to verify=
    srv = start_server(tiny_export, tmp_path, None, "--ssl_certfile", str(tmp_path / "cert.pem"), "--ssl_keyfile",
                       str(tmp_path / "key.pem"), scheme="https")
    try:
        assert srv.url.startswith("https://")
        assert Client(srv.url).infer_frames(np.full((2, 32, 32), 90, np.uint8))["probs"].shape[0] == 2
        with pytest.raises(requests.ConnectionError):  # no plain HTTP beside it
            requests.get(srv.url.replace("https://", "http://") + "/v2/health/ready", timeout=10)
    finally:
        output = stop_server(srv)
    assert f"sonossl serving on {srv.url}" in output


def test_a_bundle_predicts_on_the_device_it_was_moved_to(tiny_export, tiny_clips):
    """A GPU node serves on cuda (``SonosslModel.load``): the inputs follow the models, the outputs come back to
    numpy. Here, without a GPU, the device is the CPU and the answer is the in-process one."""
    from sonossl.export import load_bundle

    frames = np.full((3, 32, 32), 90, np.uint8)
    bundle = load_bundle(tiny_export)
    assert bundle.to("cpu") is bundle and bundle.device.type == "cpu"
    assert np.array_equal(bundle.predict(frames)["probs"], _expected(tiny_export, frames)["probs"])


def test_v2_output_selection_binary_outputs_and_headers(server, client, tiny_clips):
    """The pre-encoded v2 JSON is a well-formed HTTP response; `outputs` selects tensors; binary outputs work."""
    from sonossl.data.video import read_video

    frames, _ = read_video(_sweep(tiny_clips))
    frames = frames[:3]
    infer = f"{server.url}/v2/models/sonossl/infer"
    spec = {"name": "frames", "shape": list(frames.shape), "datatype": "UINT8", "data": frames.ravel().tolist()}
    r = requests.post(infer, json={"id": "r-1", "inputs": [spec]}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert int(r.headers.get("content-length", len(r.content))) == len(r.content)  # or chunked
    full = r.json()
    assert full["id"] == "r-1" and [o["name"] for o in full["outputs"]] == ["probs", "label", "saliency",
                                                                             "embedding", "blank"]
    probs = next(o for o in full["outputs"] if o["name"] == "probs")
    assert probs["datatype"] == "FP32" and probs["shape"][0] == 3 and len(probs["data"]) == np.prod(probs["shape"])

    r = requests.post(infer, json={"inputs": [spec], "outputs": [{"name": "label"}, {"name": "probs"}]}, timeout=60)
    assert r.status_code == 200, r.text
    picked = r.json()["outputs"]
    assert [o["name"] for o in picked] == ["label", "probs"] and picked[1]["data"] == probs["data"]

    r = requests.post(infer, json={"inputs": [spec], "outputs": [{"name": "logits"}]}, timeout=60)
    assert r.status_code == 400 and "unknown output(s) ['logits']" in r.text

    # the binary data extension for outputs: a JSON header, then the raw float32 tensor
    binary_probs = [{"name": "probs", "parameters": {"binary_data": True}}]
    r = requests.post(infer, json={"inputs": [spec], "outputs": binary_probs}, timeout=60)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(r.content) - n
    raw = np.frombuffer(r.content[n:], np.float32)
    assert np.allclose(raw, probs["data"], atol=1e-6)
    r = requests.post(infer, json={"inputs": [spec], "parameters": {"binary_data_output": True}}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream", r.text
    header = json.loads(r.content[: int(r.headers["inference-header-content-length"])])
    assert [o["name"] for o in header["outputs"]] == [o["name"] for o in full["outputs"]]
    assert client.infer_frames(frames)["probs"].shape == (3, len(full["parameters"]["classes"].split(",")))


@pytest.fixture(scope="module")
def planes_only_export(tiny_export, tiny_clips, tiny_params, tmp_path_factory) -> Path:
    """A model exported from a plane-detection run alone, as from videos without gaze maps: no saliency model."""
    import shutil

    from sonossl.export import export

    root = tmp_path_factory.mktemp("planes_only")
    shutil.copytree(tiny_export.parent / "finetune" / "ssl-planes", root / "finetune" / "ssl-planes")
    export(tiny_clips, root / "finetune", root / "export", tiny_params, progress=False)
    return root / "export"


def test_a_model_without_saliency_exports_and_serves_without_it(planes_only_export, tiny_export, tiny_clips,
                                                                 tmp_path):
    """Your own videos rarely come with gaze maps: export takes the plane model alone, its card says so, and the
    server answers v2 and v1 without a saliency output (asking for one is a 400 that lists what there is)."""
    from sonossl.data.video import read_video
    from sonossl.serve.client import Client

    card = json.loads((planes_only_export / "model_card.json").read_text())
    full = json.loads((tiny_export / "model_card.json").read_text())
    assert card["saliency"] is None and card["metrics"]["saliency"] is None and card["test_set"]["saliency"] is None
    assert list(card["output"]) == ["probs", "label", "embedding"]
    assert card["planes"] == full["planes"] and card["metrics"]["planes"] == full["metrics"]["planes"]
    assert card["model_version"] != full["model_version"]  # the version hashes the weights it holds
    md = (planes_only_export / "model_card.md").read_text()
    assert "(no saliency model)" in md and "saliency model:" not in md and "- saliency:" not in md

    frames = read_video(_sweep(tiny_clips))[0][:5]
    expected = _expected(planes_only_export, frames)
    assert "saliency" not in expected
    assert np.array_equal(expected["probs"], _expected(tiny_export, frames)["probs"])  # the same plane model

    srv = start_server(planes_only_export, tmp_path)
    try:
        out = Client(srv.url).infer_frames(frames)
        assert "saliency" not in out and out["model_version"] == card["model_version"]
        assert np.allclose(out["probs"], expected["probs"], atol=1e-6)
        assert list(out["label"]) == list(expected["label"])
        spec = {"name": "frames", "shape": list(frames.shape), "datatype": "UINT8", "data": frames.ravel().tolist()}
        r = requests.post(f"{srv.url}/v2/models/sonossl/infer", json={"inputs": [spec],
                                                                      "outputs": [{"name": "saliency"}]}, timeout=60)
        assert r.status_code == 400 and "this model has ['probs', 'label', 'embedding', 'blank']" in r.text
        r = requests.post(f"{srv.url}/v1/models/sonossl:predict", json={"instances": frames[:2].tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        assert [sorted(p) for p in r.json()["predictions"]] == [["blank", "embedding", "label", "probs"]] * 2
    finally:
        stop_server(srv)


def test_the_server_runs_one_torch_thread_per_cpu_of_its_limit(monkeypatch):
    """torch counts the node's cores; under a CPU limit the server takes the limit instead, unless OMP_NUM_THREADS
    is set (then the user's number stands)."""
    import torch

    from sonossl.serve import server

    before = torch.get_num_threads()
    monkeypatch.setattr("sonossl.machine.cpu_quota", lambda: 1)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        server._fit_threads_to_cpu_limit()
        assert torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        server._fit_threads_to_cpu_limit()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)



def test_kserve_s_server_options_reach_the_model_server_from_main_s_own_arguments(monkeypatch, tmp_path):
    """KServe's ModelServer takes its defaults from the process's sys.argv, parsed when kserve is imported: options
    given to main() from code were dropped. They are passed on explicitly now."""
    from sonossl.serve import server
    from sonossl.serve.__main__ import main

    got = {}

    class Recorder:
        def __init__(self, host, **kwargs):
            got.update(kwargs)

        def start(self, models):
            got["models"] = [m.name for m in models]

    monkeypatch.setattr(server, "_ModelServer", Recorder)
    monkeypatch.setattr(server, "app", type("App", (), {"add_middleware": lambda *a, **k: None})())
    class Model:
        def __init__(self, name, *args, **kwargs):
            self.name = name

        def load(self):
            pass

    monkeypatch.setattr(server, "SonosslModel", Model)
    assert main(["--model-dir", str(tmp_path), "--timeout-keep-alive", "7", "--event-loop", "asyncio",
                 "--access_log_format", "%(h)s %(r)s"]) == 0
    assert (got["timeout_keep_alive"], got["event_loop"], got["access_log_format"]) == (7, "asyncio", "%(h)s %(r)s")
    assert got["models"] == ["sonossl"] and got["http_port"] == 8080


def test_the_body_limit_counts_a_chunked_body_even_beside_a_content_length():
    """HTTP/1.1 reads a body as chunked when both headers come (h11 does): the declared length must not let a
    larger chunked body through (a 5-byte Content-Length let 3,000 bytes past a 1,000-byte limit). A body within
    the limit reaches the app whole, in one message."""
    import asyncio

    from sonossl.serve.server import BodyLimit

    def run(parts: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], list[bytes]]:
        sent, seen = [], []

        async def app(scope, receive, send):
            message = await receive()
            seen.append(message["body"])
            await send({"type": "http.response.start", "status": 200, "headers": []})

        async def receive():
            body = parts.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(parts)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "headers": headers}
        asyncio.run(BodyLimit(app, max_bytes=1000)(scope, receive, send))
        return sent, seen

    both = [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")]
    sent, seen = run([b"x" * 600, b"x" * 600, b"x" * 1800], both)
    assert sent[0]["status"] == 413 and not seen and b"at least 1200 bytes" in sent[1]["body"]
    sent, seen = run([b"x" * 400, b"y" * 400], [(b"transfer-encoding", b"chunked")])
    assert sent[0]["status"] == 200 and seen == [b"x" * 400 + b"y" * 400]


def test_the_infer_command_sends_a_raw_dataset_and_files_and_writes_every_frame(server, tiny_clips, tmp_path,
                                                                                 capsys):
    """`sonossl infer`: a raw dataset folder (its labels kept as `expected`) and a file, each answered whole by way
    of parts; a file that is no video is named with its reason (exit 2) while the others are still written; an
    endpoint that cannot be reached, a model it does not serve and a malformed header are one-line errors."""
    import shutil

    import pandas as pd

    from conftest import free_port
    from sonossl.cli import main
    from sonossl.serve.client import Client

    raw = tmp_path / "raw"  # a raw dataset of two of the tiny sweeps, labelled per video
    (raw / "videos").mkdir(parents=True)
    for i in (0, 2):
        shutil.copy(_sweep(tiny_clips, i), raw / "videos" / f"v{i}.mp4")
    (raw / "labels.csv").write_text("path,label\nvideos/v0.mp4,covid\nvideos/v2.mp4,regular\n")
    one = _sweep(tiny_clips, 1)
    out = tmp_path / "frames.csv"
    args = ["-q", "infer", "--url", server.url, "--frames-per-request", str(MAX_FRAMES), "--out", str(out)]
    assert main([*args, str(raw), str(one)]) == 0
    frames = pd.read_csv(out, dtype={"crop": str, "expected": str}, keep_default_na=False)
    assert list(frames["video"].unique()) == [str(raw / "videos/v0.mp4"), str(raw / "videos/v2.mp4"), str(one)]
    assert frames.groupby("video", sort=False)["expected"].first().tolist() == ["covid", "regular", ""]
    direct = Client(server.url).infer_long_video(one, frames_per_request=MAX_FRAMES)
    sweep = frames[frames.video == str(one)]
    assert list(sweep["label"]) == list(direct["label"]) and (sweep["crop"] == direct["crop"]).all()
    assert list(sweep["frame"]) == list(range(len(direct["label"])))
    assert np.allclose(sweep[[f"p_{c}" for c in direct["classes"]]].to_numpy(), direct["probs"], atol=2e-6)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["video", "frames", "blank", "label", "share", "expected"]
    assert f"wrote {out}: {len(frames)} frame(s) of 3 video(s)" in printed

    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    out.unlink()
    assert main([*args, str(bad), str(one)]) == 2
    err = capsys.readouterr().err
    assert f"sonossl infer: {bad}: not a video (a text file)" in err and "1 of 2 video(s) not answered" in err
    assert pd.read_csv(out)["video"].unique().tolist() == [str(one)]  # the answered one is written
    for given, message in [(["--url", f"http://127.0.0.1:{free_port()}"], "cannot reach http://127.0.0.1:"),
                           (["--url", server.url, "--model", "other"], "model 'other' is not ready (HTTP 404"),
                           (["--url", server.url, "--header", "Host"], "--header 'Host': expected NAME=VALUE"),
                           (["--url", server.url, "--frames-per-request", "0"], "--frames-per-request: at least 1"),
                           (["--url", server.url, str(tmp_path / "nothing")], "neither a video file nor a raw")]:
        assert main(["infer", *given, str(one)]) == 2
        assert message in capsys.readouterr().err, given
    with Client(server.url, headers={"Host": "sonossl.sonossl.example.com"}) as c:
        assert c.session.headers["Host"] == "sonossl.sonossl.example.com"


def test_the_infer_command_keeps_what_was_answered_and_refuses_ambiguous_lists(tmp_path, tiny_clips, capsys):
    """A connection lost mid-run keeps the answers so far and lists the videos not sent; a 200 that is not a v2
    response fails its video, not the run; a labels.csv listing a video twice, or a path outside its folder, is
    refused before anything is sent (their frames would have merged under one name, or read another folder)."""
    import shutil
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from conftest import send_json
    from sonossl.serve.batch import infer_videos, list_videos
    from sonossl.serve.client import Client, EndpointError

    raw = tmp_path / "raw"
    (raw / "videos").mkdir(parents=True)
    shutil.copy(_sweep(tiny_clips, 0), raw / "videos/a.mp4")
    for rows, message in [("videos/a.mp4,x\n./videos/a.mp4,y\n",
                           f"labels.csv row 3: {raw / 'videos/a.mp4'} is listed twice (first: {raw}/labels.csv row 2)"),
                          ("../a.mp4,x\n", "row 2: path '../a.mp4': path outside the dataset root"),
                          (",x\n", "row 2: path '': empty path")]:
        (raw / "labels.csv").write_text("path,label\n" + rows)
        with pytest.raises(ValueError, match=re.escape(message)):
            list_videos([raw])
    with pytest.raises(ValueError, match="is listed twice"):
        list_videos([raw / "videos/a.mp4", raw / "videos" / ".." / "videos/a.mp4"])
    shutil.copy(_sweep(tiny_clips, 0), tmp_path / "cache.mp4")  # a symlink may point outside, as DVC's symlink
    (raw / "videos/b.mp4").symlink_to(tmp_path / "cache.mp4")  # cache does: followed, as preprocess follows it
    (raw / "labels.csv").write_text("path,label\nvideos/a.mp4,x\nvideos/b.mp4,y\n")
    assert [(p.name, label) for p, label in list_videos([raw])] == [("a.mp4", "x"), ("b.mp4", "y")]

    class Flaky:  # answers the first video, then the endpoint is gone
        calls = 0

        def infer_long_video(self, path, frames_per_request):
            Flaky.calls += 1
            if Flaky.calls > 1:
                raise requests.ConnectionError("connection refused")
            return {"label": np.array(["a", "b"]), "blank": np.array([False, False]), "classes": ["a", "b"],
                    "probs": np.array([[0.9, 0.1], [0.2, 0.8]]), "crop": "0,0,16", "model_version": "v"}

    videos = [(tmp_path / f"{i}.mp4", None) for i in range(4)]
    frames, failed = infer_videos(Flaky(), videos)
    assert frames["video"].unique().tolist() == [str(tmp_path / "0.mp4")] and Flaky.calls == 2
    assert list(failed) == [str(p) for p, _ in videos[1:]]
    assert all(r.startswith("not sent: the endpoint could not be reached any more") for r in failed.values())

    class NotV2(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            send_json(self, 200, {"outputs": "nothing"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotV2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EndpointError, match=r"HTTP 200: not an Open Inference Protocol v2 response"):
            Client(f"http://127.0.0.1:{server.server_port}").infer_frames(np.zeros((1, 32, 32), np.uint8))
    finally:
        server.shutdown()
        server.server_close()
