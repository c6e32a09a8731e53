"""``sonossl.storage`` and ``sonossl artifacts`` against a real S3 server (moto, server mode, on 127.0.0.1):
byte-identical round trips (multipart included), checksum verification, a server that dies mid-transfer, clear
errors for missing objects, refused credentials and unreachable endpoints, and no secrets in logs or output."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sonossl.storage import (StorageCorrupt, StorageError, download, get_bytes, list_uris, parse_s3_uri, put_bytes,
                             upload)
from sonossl.storage import s3 as s3mod

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzzSECRET"  # a distinctive value to look for in logs and output


def _tree(root: Path, big: int = 11 * MiB) -> dict[str, bytes]:
    """A folder with nested files, an empty file, odd names and one file above the multipart threshold."""
    rng = np.random.default_rng(0)
    files = {
        "model.pt": rng.bytes(big),
        "model_card.json": b'{"model_version": "abc"}\n',
        "reference/embeddings.npy": rng.bytes(3000),
        "reference/a b+c (1).txt": "frame \u00e9\n".encode(),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fast_client(server, attempts: int = 2):
    return s3mod.client(server.endpoint_url, max_attempts=attempts)


@pytest.mark.parametrize("uri,expected", [
    ("s3://bucket/a/b.txt", ("bucket", "a/b.txt")),
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://bucket/prefix/", ("bucket", "prefix/")),
])
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["bucket/key", "s3:/bucket/key", "s3://", "s3:///key", "http://bucket/key", "", None])
def test_parse_s3_uri_refuses_what_is_not_an_s3_uri(uri):
    with pytest.raises(StorageError, match="not an S3 URI"):
        parse_s3_uri(uri)


def test_push_pull_tree_is_byte_identical_multipart_included(s3_server, tmp_path):
    src = tmp_path / "export"
    files = _tree(src)
    uri = f"s3://{s3_server.bucket}/runs/export"
    keys = upload(src, uri, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    assert keys == sorted(f"runs/export/{rel}" for rel in files)
    assert list_uris(uri) == [f"s3://{s3_server.bucket}/{k}" for k in keys]

    s3 = s3_server.client()
    head = s3.head_object(Bucket=s3_server.bucket, Key="runs/export/model.pt")
    assert head["ETag"].endswith('-3"'), head["ETag"]  # 11 MiB in 5 MiB parts: a real multipart upload
    assert head["Metadata"]["sha256"] == hashlib.sha256(files["model.pt"]).hexdigest()  # x-amz-meta-sha256
    for key in keys:
        meta = s3.head_object(Bucket=s3_server.bucket, Key=key)["Metadata"]
        assert meta["sha256"] == hashlib.sha256(files[key.removeprefix("runs/export/")]).hexdigest()

    # Pull into a folder that holds an older version, with a file the new one lacks: refused unless replace=True,
    # then replaced as a whole.
    dst = tmp_path / "restored"
    (dst / "stale").mkdir(parents=True)
    (dst / "stale" / "old.bin").write_bytes(b"old")
    with pytest.raises(StorageError, match=r"holds 1 file\(s\) or folder\(s\) that .* does not \(stale/old.bin\)"):
        download(uri, dst)
    assert download(uri, dst, replace=True) == dst
    assert _read_tree(dst) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "restored"]  # no staging or temp files left

    # One object to a file, and into an existing folder.
    download(f"{uri}/reference/embeddings.npy", tmp_path / "one" / "emb.npy")
    assert (tmp_path / "one" / "emb.npy").read_bytes() == files["reference/embeddings.npy"]
    assert download(f"{uri}/model_card.json", tmp_path / "one") == tmp_path / "one" / "model_card.json"
    assert (tmp_path / "one" / "model_card.json").read_bytes() == files["model_card.json"]

    # Pushing the same tree again sends nothing: every object is already there with the same sha256.
    seen = s3_server.bytes_seen
    assert upload(src, uri, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB) == keys
    assert s3_server.bytes_seen == seen
    # A changed file is sent again, and only that one.
    (src / "model_card.json").write_bytes(b'{"model_version": "def"}\n')
    upload(src, uri)
    assert s3_server.bytes_seen == seen + len(b'{"model_version": "def"}\n')
    assert get_bytes(f"{uri}/model_card.json") == b'{"model_version": "def"}\n'


def test_single_file_push_and_bytes_round_trip(s3_server, tmp_path):
    f = tmp_path / "metrics.json"
    f.write_bytes(b'{"f1": 0.5}')
    assert upload(f, f"s3://{s3_server.bucket}/m/") == ["m/metrics.json"]  # a trailing slash: keep the name
    assert upload(f, f"s3://{s3_server.bucket}/m/renamed.json") == ["m/renamed.json"]
    assert put_bytes(b"\x00\x01log line\n", f"s3://{s3_server.bucket}/logs/2026/01.jsonl") == "logs/2026/01.jsonl"
    assert get_bytes(f"s3://{s3_server.bucket}/logs/2026/01.jsonl") == b"\x00\x01log line\n"
    assert list_uris(f"s3://{s3_server.bucket}") == [
        f"s3://{s3_server.bucket}/{k}" for k in ("logs/2026/01.jsonl", "m/metrics.json", "m/renamed.json")]
    assert list_uris(f"s3://{s3_server.bucket}/nothing/here") == []
    with pytest.raises(StorageError, match="not an object URI"):
        put_bytes(b"x", f"s3://{s3_server.bucket}/prefix/")


def test_conditional_writes_refuse_a_stale_version(s3_server):
    """``put_bytes_if`` writes only over the version read (or only where nothing is yet): the S3 server's
    If-Match / If-None-Match, which the drift index relies on when reports run at once."""
    from sonossl.storage import StorageConflict, get_bytes_etag, put_bytes_if

    uri = f"s3://{s3_server.bucket}/reports/index.json"
    first = put_bytes_if(b"[1]", uri, None)  # nothing there yet
    with pytest.raises(StorageConflict, match="reports/index.json: the object changed meanwhile"):
        put_bytes_if(b"[2]", uri, None)  # another writer created it first
    data, etag = get_bytes_etag(uri)
    assert (data, etag) == (b"[1]", first)
    second = put_bytes_if(b"[1, 2]", uri, etag)
    with pytest.raises(StorageConflict):
        put_bytes_if(b"[1, 3]", uri, first)  # read before the write above: refused, nothing lost
    assert get_bytes_etag(uri) == (b"[1, 2]", second)
    assert isinstance(StorageConflict("x"), StorageError)  # callers that catch StorageError still do


def test_corrupted_object_is_detected_and_nothing_is_written(s3_server, tmp_path):
    src = tmp_path / "src"
    files = _tree(src, big=6 * MiB)
    uri = f"s3://{s3_server.bucket}/models/export"
    upload(src, uri, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3 = s3_server.client()
    key = "models/export/model.pt"
    meta = s3.head_object(Bucket=s3_server.bucket, Key=key)["Metadata"]
    bad = bytearray(files["model.pt"])
    bad[12345] ^= 0xFF  # one flipped bit's worth of damage, same size, the old metadata kept
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(bad), Metadata=meta)
    expected, got = meta["sha256"], hashlib.sha256(bytes(bad)).hexdigest()

    with pytest.raises(StorageError) as err:
        download(f"{uri}/model.pt", tmp_path / "out" / "model.pt")
    message = str(err.value)
    assert f"s3://{s3_server.bucket}/{key}" in message and "checksum mismatch" in message
    assert expected in message and got in message
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor a temporary one

    # A whole prefix: the destination folder keeps its previous content, and no staging folder is left.
    dst = tmp_path / "restored"
    dst.mkdir()
    (dst / "previous.txt").write_text("previous version")
    with pytest.raises(StorageError, match="checksum mismatch"):
        download(uri, dst, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "restored", "src"]
    assert _read_tree(dst) == {"previous.txt": b"previous version"}

    with pytest.raises(StorageError, match=f"{key}: checksum mismatch"):
        get_bytes(f"s3://{s3_server.bucket}/{key}")
    # An object written by another tool has no checksum to check against: refused, not trusted.
    s3.put_object(Bucket=s3_server.bucket, Key="foreign.bin", Body=b"abc")
    with pytest.raises(StorageError, match="no sha256 metadata"):
        get_bytes(f"s3://{s3_server.bucket}/foreign.bin")

    # A push compares metadata, which the damage left as it was: the same push sends nothing; --force repairs it.
    seen = s3_server.bytes_seen
    upload(src, uri, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    assert s3_server.bytes_seen == seen
    upload(src, uri, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, force=True)
    assert s3_server.bytes_seen - seen >= sum(len(b) for b in files.values())  # every file sent again
    assert _read_tree(download(uri, tmp_path / "repaired")) == files
    assert issubclass(StorageCorrupt, StorageError)


def test_keys_that_would_escape_the_destination_are_refused(s3_server, tmp_path, monkeypatch):
    s3 = s3_server.client()
    put_bytes(b"ok", f"s3://{s3_server.bucket}/ds/ok.txt")
    digest = hashlib.sha256(b"evil").hexdigest()
    s3.put_object(Bucket=s3_server.bucket, Key="ds/sub/../../../evil.txt", Body=b"evil", Metadata={"sha256": digest})
    assert f"s3://{s3_server.bucket}/ds/sub/../../../evil.txt" in list_uris(f"s3://{s3_server.bucket}/ds")
    with pytest.raises(StorageError, match="outside the destination"):
        download(f"s3://{s3_server.bucket}/ds", tmp_path / "a" / "b" / "dst")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil.txt").exists()
    assert not (tmp_path / "a" / "b" / "dst").exists()
    # the current folder or one above it would be replaced as a whole, siblings and all: refused, naming the way in
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    s3.delete_object(Bucket=s3_server.bucket, Key="ds/sub/../../../evil.txt")
    for dest in (".", "..", str(tmp_path)):
        with pytest.raises(StorageError, match=rf"to '{re.escape(dest)}': a prefix replaces its destination folder as "
                                               rf"a whole, .* end it with '/' to download into it: {re.escape(dest)}/ds"):
            download(f"s3://{s3_server.bucket}/ds", dest)
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"
    assert download(f"s3://{s3_server.bucket}/ds", "./") == Path("ds")  # into it: ./ds


def test_missing_object_and_bucket_give_clear_errors(s3_server, tmp_path):
    b = s3_server.bucket
    with pytest.raises(StorageError, match=f"s3://{b}/nope.bin: no such object"):
        get_bytes(f"s3://{b}/nope.bin")
    with pytest.raises(StorageError, match=f"cannot download s3://{b}/nope: no such object or prefix"):
        download(f"s3://{b}/nope", tmp_path / "x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        download("s3://no-such-bucket/k", tmp_path / "x")
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        upload(f, "s3://no-such-bucket/k")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        upload(tmp_path / "missing", f"s3://{b}/k")
    assert not (tmp_path / "x").exists()


def test_server_stopped_mid_download_then_retry(s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(s3mod, "BACKOFF_S", 0.05)
    files = _tree(tmp_path / "src")
    uri = f"s3://{s3_server.bucket}/export"
    upload(tmp_path / "src", uri)
    dst = tmp_path / "dst"

    s3_server.crash_after_bytes = s3_server.bytes_seen + 3 * MiB  # dies 3 MiB into the 11 MiB object
    with pytest.raises(StorageError) as err:
        download(uri, dst, client=_fast_client(s3_server))
    message = str(err.value)
    assert s3_server.endpoint_url in message and "unreachable or closed the connection" in message
    assert s3_server.bytes_seen > 3 * MiB  # it did fail in the middle of the transfer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial file, no staging folder

    s3_server.start()  # same port, same buckets
    download(uri, dst, client=_fast_client(s3_server))
    assert _read_tree(dst) == files


def test_server_stopped_mid_upload_then_retry_leaves_no_duplicates(s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(s3mod, "BACKOFF_S", 0.05)
    files = _tree(tmp_path / "src")
    uri = f"s3://{s3_server.bucket}/export"
    s3_server.crash_after_bytes = 6 * MiB  # inside the multipart upload of the 11 MiB model.pt
    with pytest.raises(StorageError) as err:
        upload(tmp_path / "src", uri, client=_fast_client(s3_server), multipart_threshold=5 * MiB,
               multipart_chunksize=5 * MiB)
    assert s3_server.endpoint_url in str(err.value) and "unreachable or closed the connection" in str(err.value)

    s3_server.start()
    s3 = s3_server.client()
    assert "model.pt" not in {k.rsplit("/", 1)[-1] for k in s3_server.objects()}  # no partial object is visible
    unfinished = s3.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", [])
    assert [u["Key"] for u in unfinished] == ["export/model.pt"]  # the dead transfer's parts

    keys = upload(tmp_path / "src", uri, client=_fast_client(s3_server), multipart_threshold=5 * MiB,
                  multipart_chunksize=5 * MiB)
    stored = s3_server.objects()
    assert sorted(stored) == keys == sorted(f"export/{rel}" for rel in files)  # each key once, nothing else
    assert stored == {f"export/{rel}": data for rel, data in files.items()}
    assert s3.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", []) == []  # leftovers aborted


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_names_it_and_never_shows_the_secret(s3_server, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(s3mod, "BACKOFF_S", 0.05)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    caplog.set_level(logging.DEBUG)  # botocore's debug log included: it must not hold the secret either
    with pytest.raises(StorageError) as err:
        get_bytes(f"s3://{s3_server.bucket}/x", client=s3mod.client(endpoint, max_attempts=2))
    assert endpoint in str(err.value) and "unreachable" in str(err.value)
    captured = capsys.readouterr()
    assert SECRET not in str(err.value) + caplog.text + captured.out + captured.err
    assert "Authorization" in caplog.text  # the debug log was really captured (a signed request was made)

    (tmp_path / "f.txt").write_text("x")
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET, AWS_MAX_ATTEMPTS="1")  # fail fast: 2 tries, 1 s apart
    proc = subprocess.run([sys.executable, "-m", "sonossl.cli", "-q", "artifacts", "push", str(tmp_path / "f.txt"),
                           f"s3://{s3_server.bucket}/f.txt", "--endpoint-url", endpoint], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("sonossl artifacts: error: cannot upload to")
    assert endpoint in proc.stderr and "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_refused_and_missing_credentials_are_clear_errors(s3_server, tmp_path, monkeypatch, caplog):
    import moto.settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks keys: ours is unknown
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as err:
        get_bytes(f"s3://{s3_server.bucket}/x")
    assert "access denied by" in str(err.value) and s3_server.endpoint_url in str(err.value)
    assert "InvalidAccessKeyId" in str(err.value) and SECRET not in str(err.value) + caplog.text
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no usable AWS credentials .*AWS_ACCESS_KEY_ID"):
        get_bytes(f"s3://{s3_server.bucket}/x")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sonossl.cli", "-q", "artifacts", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_push_pull(s3_server, tmp_path):
    files = _tree(tmp_path / "export", big=300_000)
    uri = f"s3://{s3_server.bucket}/cli/export"
    push = cli("push", str(tmp_path / "export"), uri, "--endpoint-url", s3_server.endpoint_url)
    assert push.returncode == 0, push.stderr
    size = sum(len(d) for d in files.values())
    assert push.stdout.strip() == (f"pushed {tmp_path / 'export'} -> {uri}: 5 file(s), {size:,} bytes in place "
                                   "(sha256 in metadata)")
    assert "uploaded 5 of 5 file(s)" in push.stderr
    pull = cli("pull", uri, str(tmp_path / "back"))  # endpoint from AWS_ENDPOINT_URL_S3
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.strip() == f"pulled {uri} -> {tmp_path / 'back'}: 5 file(s), {size:,} bytes (sha256 verified)"
    assert _read_tree(tmp_path / "back") == files
    missing = cli("pull", f"s3://{s3_server.bucket}/cli/nothing", str(tmp_path / "x"))
    assert missing.returncode == 2 and "no such object or prefix" in missing.stderr


def test_cli_pull_of_a_damaged_checkpoint_store(s3_server, tmp_path):
    """The PyTorchJob's master pulls the checkpoint store before torchrun starts. A copy damaged on the server fails
    that pull, and so every restart of the job, unless --discard-damaged: a warning, the store emptied, the local
    folder left as it is, and the job starts fresh (as the pipeline steps' store does)."""
    uri = f"s3://{s3_server.bucket}/ck/pretrain"
    _tree(tmp_path / "copy", big=1000)
    upload(tmp_path / "copy", uri)
    s3 = s3_server.client()
    key = "ck/pretrain/model.pt"
    meta = s3.head_object(Bucket=s3_server.bucket, Key=key)["Metadata"]
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"damaged", Metadata=meta)
    held = s3_server.objects()
    local = tmp_path / "pretrain"
    local.mkdir()
    (local / "kept.txt").write_text("local")

    plain = cli("pull", "--missing-ok", "--replace", uri, str(local))  # as the PyTorchJob pulls
    assert plain.returncode == 2 and f"{key}: checksum mismatch" in plain.stderr
    assert s3_server.objects() == held
    discard = cli("pull", "--missing-ok", "--discard-damaged", "--replace", uri, str(local))
    assert discard.returncode == 0, discard.stderr
    assert f"WARNING sonossl.cli: s3://{s3_server.bucket}/{key}: checksum mismatch" in discard.stderr
    assert discard.stdout.strip() == (f"deleted {uri} (5 object(s)), as it cannot be pulled; {local} left as it is "
                                      "(--discard-damaged)")
    assert not [k for k in s3_server.objects() if k.startswith("ck/pretrain/")]
    assert _read_tree(local) == {"kept.txt": b"local"}
    again = cli("pull", "--missing-ok", "--discard-damaged", uri, str(local))  # the next restart: nothing there
    assert again.returncode == 0 and again.stdout.startswith(f"nothing at {uri}")

    # a URI that names an object (a pull reads that object, not the prefix of the same name): that object goes,
    # the folder beside it stays; so does ck/pretrain10/, whose name merely starts the same
    upload(tmp_path / "copy", uri)
    upload(tmp_path / "copy", uri + "10")
    s3.put_object(Bucket=s3_server.bucket, Key="ck/pretrain", Body=b"damaged", Metadata={"sha256": "0" * 64})
    before = set(s3_server.objects())
    one = cli("pull", "--discard-damaged", uri, str(tmp_path / "one"))
    assert one.returncode == 0 and f"deleted {uri} (1 object(s))" in one.stdout
    assert set(s3_server.objects()) == before - {"ck/pretrain"}
    # an object without a checksum (written by another tool) is unverifiable, not known to be damaged: kept, and
    # the pull fails as without the option
    s3.put_object(Bucket=s3_server.bucket, Key="ck/plain/ckpt.pt", Body=b"bytes")
    plain = cli("pull", "--discard-damaged", f"s3://{s3_server.bucket}/ck/plain", str(tmp_path / "plain"))
    assert plain.returncode == 2 and "no sha256 metadata" in plain.stderr
    assert "ck/plain/ckpt.pt" in s3_server.objects()


def test_credentials_from_a_profile_are_used(s3_server, tmp_path, monkeypatch):
    """With moto checking signatures, the keys of a named profile (not the environment's) get access."""
    import json

    import boto3
    import moto.settings

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    iam.create_user(UserName="pipeline")
    policy = iam.create_policy(PolicyName="s3-all", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    iam.attach_user_policy(UserName="pipeline", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[pipeline]\naws_access_key_id = {key['AccessKeyId']}\n"
                           f"aws_secret_access_key = {key['SecretAccessKey']}\n")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "pipeline")
    uri = f"s3://{s3_server.bucket}/from-profile.txt"
    put_bytes(b"signed with the profile's key", uri)
    assert get_bytes(uri) == b"signed with the profile's key"

    monkeypatch.setenv("AWS_PROFILE", "nobody")  # a profile that does not exist: a clear error, not a traceback
    with pytest.raises(StorageError, match=r"The config profile \(nobody\) could not be found: set AWS_PROFILE"):
        get_bytes(uri)
    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(StorageError, match="Invalid endpoint: 127.0.0.1:9000"):
        s3mod.client("127.0.0.1:9000")


@pytest.mark.parametrize("change", ["replaced", "appended"])
def test_a_file_changed_while_it_is_pushed_goes_up_as_hashed(s3_server, tmp_path, monkeypatch, change):
    """A checkpoint replaced (atomic rename) or a log appended to between the hash and the upload: the object holds
    the bytes that were hashed. Hashing by name and uploading by name again stored the new bytes under the old
    sha256, which every later pull refused as corrupted."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / "last.pt"
    path.write_bytes(b"epoch 1" * 1000)
    real_head = s3mod._head

    def head_then_change(*args, **kwargs):  # runs after the hash, before the upload
        if change == "replaced":
            (folder / ".last.pt.tmp").write_bytes(b"epoch 2" * 1200)
            os.replace(folder / ".last.pt.tmp", path)
        else:
            with open(path, "ab") as f:
                f.write(b"more")
        return real_head(*args, **kwargs)

    monkeypatch.setattr(s3mod, "_head", head_then_change)
    uri = f"s3://{s3_server.bucket}/store/last.pt"
    upload(path, uri)
    monkeypatch.setattr(s3mod, "_head", real_head)
    assert download(uri, tmp_path / "back.pt").read_bytes() == b"epoch 1" * 1000  # sha256-verified


def test_temporary_files_of_a_killed_write_are_not_pushed(s3_server, tmp_path, caplog):
    src = tmp_path / "clips"
    (src / "sub").mkdir(parents=True)
    for name in ("frames.npy", "sub/meta.json", ".dvcignore", "sub/.hidden.txt"):
        (src / name).write_bytes(b"data")
    for name in (".frames.npy.tmp-123.npy", ".meta.json.abc1_3yz.tmp", "sub/.x.bin.k2j3m8q0.part",
                 ".sim.staging-abcd1234/frames.npy", ".old.old-77/frames.npy"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="sonossl.storage.s3"):
        keys = upload(src, f"s3://{s3_server.bucket}/c")
    assert keys == ["c/.dvcignore", "c/frames.npy", "c/sub/.hidden.txt", "c/sub/meta.json"]  # dot files are data
    assert any("5 temporary file(s) of an interrupted write left out" in r.getMessage() for r in caplog.records)
    out = subprocess.run([sys.executable, "-m", "sonossl.cli", "-q", "artifacts", "push", str(src),
                          f"s3://{s3_server.bucket}/c", "--endpoint-url", s3_server.endpoint_url],
                         capture_output=True, text=True, env=os.environ, check=True).stdout
    assert f"pushed {src} -> s3://{s3_server.bucket}/c: 4 file(s), 16 bytes in place" in out  # what went up


def test_a_destination_ending_in_a_slash_is_a_folder_to_download_into(s3_server, tmp_path, monkeypatch):
    """`pull s3://…/clips/sim data/clips/` writes data/clips/sim and leaves the other datasets there (without the
    slash, the prefix replaced data/clips as a whole); an object into `dir/` lands in dir, not in a file `dir`."""
    (tmp_path / "up/sim").mkdir(parents=True)
    (tmp_path / "up/sim/frames.npy").write_bytes(b"sim frames")
    upload(tmp_path / "up/sim", f"s3://{s3_server.bucket}/clips/sim")
    (tmp_path / "data/clips/pocus").mkdir(parents=True)
    (tmp_path / "data/clips/pocus/frames.npy").write_bytes(b"pocus frames")
    assert download(f"s3://{s3_server.bucket}/clips/sim", f"{tmp_path}/data/clips/") == tmp_path / "data/clips/sim"
    assert _read_tree(tmp_path / "data/clips") == {"pocus/frames.npy": b"pocus frames",
                                                   "sim/frames.npy": b"sim frames"}
    out = download(f"s3://{s3_server.bucket}/clips/sim/frames.npy", f"{tmp_path}/new/")
    assert out == tmp_path / "new/frames.npy" and out.read_bytes() == b"sim frames"

    synced = []
    monkeypatch.setattr(s3mod, "fsync_file", lambda p: synced.append(Path(p).name))
    download(f"s3://{s3_server.bucket}/clips/sim/frames.npy", tmp_path / "again.npy")
    assert len(synced) == 1 and synced[0].startswith(".again.npy.") and synced[0].endswith(".part")


def test_a_pull_never_deletes_local_files_the_prefix_does_not_hold_unless_told(s3_server, tmp_path):
    """`pull s3://…/models/export models` used to replace models/ (the user's other models) by the export's
    files. A destination holding files the prefix does not, or a file or link in the folder's place, is refused
    before anything is downloaded, naming them; pulling again over the prefix's own files replaces them; --replace
    (replace=True) replaces the folder as a whole."""
    (tmp_path / "up/ref").mkdir(parents=True)
    (tmp_path / "up/model.pt").write_bytes(b"new model")
    (tmp_path / "up/ref/emb.npy").write_bytes(b"new emb")
    uri = f"s3://{s3_server.bucket}/models/export"
    upload(tmp_path / "up", uri)
    models = tmp_path / "models"
    for name in ("model.pt", "pretrain/encoder.pt", "finetune/a.pt", "finetune/b.pt", "finetune/c.pt"):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (models / name).write_bytes(b"mine")
    held = _read_tree(models)
    with pytest.raises(StorageError) as e:
        download(uri, models)
    assert str(e.value) == (f"cannot download {uri} to {models}: {models} holds 4 file(s) or folder(s) that {uri} "
                            "does not (finetune/a.pt, finetune/b.pt, finetune/c.pt, ...), and a prefix replaces its "
                            "destination as a whole; give a folder of its own, end it with '/' to download into it "
                            f"({models}/export), or replace it (`sonossl artifacts pull --replace`, replace=True)")
    assert _read_tree(models) == held
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "up", target_is_directory=True)
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"mine")
    for dest, kind in ((link, "a symbolic link"), (a_file, "a file")):
        with pytest.raises(StorageError) as e:
            download(uri, dest)
        assert str(e.value) == (f"cannot download {uri} to {dest}: {dest} is {kind}, not a folder, and a prefix "
                                "replaces its destination as a whole; give a folder of its own, or replace it "
                                "(`sonossl artifacts pull --replace`, replace=True)")
    # nothing is deleted unasked: a hidden name like a temporary one, a killed write's file, an empty folder; and
    # with the '/' already given there is no folder of its own to suggest
    for extra in (".settings.old-2024", ".frames.npy.tmp-123.npy", "empty/"):
        mine = tmp_path / "dl" / "export"
        shutil.rmtree(tmp_path / "dl", ignore_errors=True)
        download(uri, f"{tmp_path / 'dl'}/")
        (mine / extra).mkdir() if extra.endswith("/") else (mine / extra).write_bytes(b"mine")
        with pytest.raises(StorageError) as e:
            download(uri, f"{tmp_path / 'dl'}/")
        assert f"{mine} holds 1 file(s) or folder(s) that {uri} does not ({extra}), and" in str(e.value)
        assert "end it with '/'" not in str(e.value)
    assert a_file.read_bytes() == b"mine" and _read_tree(tmp_path / "up") == {"model.pt": b"new model",
                                                                               "ref/emb.npy": b"new emb"}

    export = tmp_path / "export"  # a copy pulled earlier, stale: the same files, other bytes
    (export / "ref").mkdir(parents=True)
    (export / "model.pt").write_bytes(b"old model")
    (export / "ref/emb.npy").write_bytes(b"old emb")
    assert _read_tree(download(uri, export)) == {"model.pt": b"new model", "ref/emb.npy": b"new emb"}

    out = cli("pull", "--replace", uri, str(models))
    assert out.returncode == 0, out.stderr
    assert _read_tree(models) == {"model.pt": b"new model", "ref/emb.npy": b"new emb"}
    refused = cli("pull", uri, str(a_file))
    assert refused.returncode == 2 and "is a file, not a folder" in refused.stderr and "--replace" in refused.stderr


def test_push_with_delete_makes_the_prefix_a_copy_of_the_folder(s3_server, tmp_path):
    """Without --delete a file deleted here stays in the prefix and a pull brings it back; with it, it goes. A
    sibling prefix that shares the name's start is not touched, and a whole bucket or a single file is refused."""
    src = tmp_path / "export"
    (src / "ref").mkdir(parents=True)
    for name in ("model.pt", "old.txt", "ref/emb.npy"):
        (src / name).write_bytes(name.encode())
    uri = f"s3://{s3_server.bucket}/models/export"
    upload(src, uri)
    upload(src, f"{uri}-staging")  # s3://…/models/export-staging: another prefix
    (src / "old.txt").unlink()
    upload(src, uri)
    assert _read_tree(download(uri, tmp_path / "back1")) == {"model.pt": b"model.pt", "old.txt": b"old.txt",
                                                            "ref/emb.npy": b"ref/emb.npy"}  # came back
    out = subprocess.run([sys.executable, "-m", "sonossl.cli", "artifacts", "push", "--delete", str(src), uri,
                          "--endpoint-url", s3_server.endpoint_url], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "deleted 1 object(s) under" in out.stderr
    assert _read_tree(download(uri, tmp_path / "back2")) == {"model.pt": b"model.pt", "ref/emb.npy": b"ref/emb.npy"}
    assert "models/export-staging/old.txt" in s3_server.objects()
    with pytest.raises(StorageError, match="with delete: give a folder and a prefix under the bucket"):
        upload(src, f"s3://{s3_server.bucket}", delete=True)
    with pytest.raises(StorageError, match="with delete: give a folder"):
        upload(src / "model.pt", f"{uri}/model.pt", delete=True)
