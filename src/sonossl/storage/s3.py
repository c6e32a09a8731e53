"""Artefacts on S3 (AWS or any S3-compatible server such as MinIO): upload and download with checksums and retries.

- **Checksums.** Every upload computes the SHA-256 of the file locally and stores it as object metadata
  (``x-amz-meta-sha256``), multipart uploads included (an S3 ETag is not a content hash for multipart objects).
  Every download is checked against it before the file appears at its destination; a mismatch, or an object
  without the metadata, is a ``StorageError`` naming the object (and both hashes).
- **Atomic local writes.** A file is downloaded to a temporary name beside its destination and renamed once
  verified; a prefix lands in a staging folder that replaces the destination folder as a whole
  (``sonossl.atomic.atomic_dir``). An interrupted or failed download leaves the destination as it was.
- **Retries.** botocore's ``standard`` retry mode (exponential backoff with jitter) for each request, s3transfer's
  own retries of interrupted download streams, and on top of both a whole-file retry with backoff for connection
  failures (a multipart upload that lost its connection half-way is restarted, not left half-done).
- **Multipart** above ``MULTIPART_THRESHOLD`` (boto3 ``TransferConfig``), parts of ``MULTIPART_CHUNKSIZE``.
- **Credentials** come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE`` and the shared config files, instance roles); the endpoint from the argument, else
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO: ``http://host:9000``). Nothing here logs or prints them.
- **Uploads are idempotent.** A file whose object already exists with the same SHA-256 is not sent again, so
  rerunning a push after a failure completes it without duplicates.

    keys = upload("models/export", "s3://my-bucket/sonossl/models/export")      # a folder, recursively
    download("s3://my-bucket/sonossl/models/export", "restored/export")          # verified, atomic
    put_bytes(b"{}", "s3://my-bucket/x.json");  data = get_bytes("s3://my-bucket/x.json")
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from sonossl.atomic import atomic_dir, current_umask, fsync_file, is_temporary

log = logging.getLogger(__name__)

SHA256_KEY = "sha256"  # user metadata key: sent as the x-amz-meta-sha256 header
MULTIPART_THRESHOLD = 64 * 1024**2
MULTIPART_CHUNKSIZE = 16 * 1024**2  # S3 parts must be at least 5 MiB (except the last)
MAX_ATTEMPTS = 5  # botocore attempts per request (standard mode: exponential backoff with jitter)
FILE_ATTEMPTS = 2  # whole-file attempts on connection failures, on top of botocore's
BACKOFF_S = 1.0  # first whole-file backoff; doubled each time
_READ_CHUNK = 1024**2

T = TypeVar("T")


class StorageError(ValueError):
    """A transfer that failed for a reason the user can act on (bad URI, missing object, checksum, endpoint, auth)."""


class StorageConflict(StorageError):
    """A conditional request lost: the object changed since it was read (``put_bytes_if``; a download's object
    replaced mid-transfer)."""


class StorageCorrupt(StorageError):
    """An object whose bytes do not match its sha256 metadata, or that has none: it cannot be trusted; push it
    again with ``force`` (``sonossl artifacts push --force``)."""


class ChecksumMismatch(StorageCorrupt):
    """An object whose bytes do not match its sha256 metadata: damaged (one without metadata, written by another
    tool, is a ``StorageCorrupt`` only: unverifiable, not known to be damaged)."""


class StorageNotFound(StorageError):
    """The object (or bucket) does not exist: the one failure a caller may treat as "nothing there yet"."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; ``s3://bucket`` -> ``("bucket", "")``."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise StorageError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or "/" in bucket or bucket in (".", ".."):
        raise StorageError(f"not an S3 URI: {uri!r}: no bucket name (expected s3://bucket/key)")
    return bucket, key


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def endpoint_from_env() -> str | None:
    """The S3 endpoint set in the environment (MinIO, a local server), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def client(endpoint_url: str | None = None, *, max_attempts: int | None = None) -> Any:
    """A boto3 S3 client from the standard AWS credential chain; ``endpoint_url`` (else the environment) for MinIO.

    ``max_attempts`` per request defaults to ``AWS_MAX_ATTEMPTS`` (the standard variable), else ``MAX_ATTEMPTS``.
    """
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or endpoint_from_env()
    if max_attempts is None:
        env = os.environ.get("AWS_MAX_ATTEMPTS", "")
        max_attempts = int(env) if env.isdigit() and int(env) > 0 else MAX_ATTEMPTS
    config = Config(retries={"mode": "standard", "max_attempts": max_attempts}, connect_timeout=10, read_timeout=60,
                    # path-style addressing works with every S3-compatible server (MinIO, IP endpoints)
                    s3={"addressing_style": "path"} if endpoint_url else None)
    from botocore.exceptions import ProfileNotFound

    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
    except ProfileNotFound as e:
        raise StorageError(f"{e}: set AWS_PROFILE to a profile of ~/.aws/config or ~/.aws/credentials (or "
                           "AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE), or unset it") from None
    except ValueError as e:  # botocore: "Invalid endpoint: ..."
        raise StorageError(f"{e} (expected e.g. http://127.0.0.1:9000 or https://s3.eu-west-1.amazonaws.com)") \
            from None


_new_client = client  # the functions below take a ``client`` argument, which hides the name


def _transfer_config(threshold: int | None = None, chunksize: int | None = None) -> Any:
    from boto3.s3.transfer import TransferConfig

    threshold = MULTIPART_THRESHOLD if threshold is None else threshold
    chunksize = MULTIPART_CHUNKSIZE if chunksize is None else chunksize
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=max(chunksize, 5 * 1024**2),
                          max_concurrency=4)


def _endpoint(s3: Any) -> str:
    return getattr(getattr(s3, "meta", None), "endpoint_url", None) or "the S3 endpoint"


def _storage_error(e: BaseException, s3: Any, uri: str, action: str) -> StorageError:
    """Turn a botocore/s3transfer exception into one clear line. Never include credentials (botocore's messages
    hold none; the request headers, which hold a signature, are not part of them)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    endpoint = _endpoint(s3)
    if isinstance(e, StorageError):
        return e
    e = _botocore_cause(e)
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return StorageError(f"cannot {action} {uri}: no usable AWS credentials ({type(e).__name__}); set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code, status = str(err.get("Code", "")), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            bucket, _ = parse_s3_uri(uri)
            return StorageNotFound(f"cannot {action} {uri}: bucket {bucket!r} does not exist at {endpoint}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageNotFound(f"cannot {action} {uri}: no such object at {endpoint}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                    "InvalidToken", "403", "Forbidden") or status == 403:
            return StorageError(f"cannot {action} {uri}: access denied by {endpoint} ({code}); check the "
                                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                                "bucket policy")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return StorageConflict(f"cannot {action} {uri}: the object changed meanwhile; run it again")
        return StorageError(f"cannot {action} {uri}: {endpoint} answered {code or status}: "
                            f"{err.get('Message', '')}".rstrip(": "))
    if isinstance(e, EndpointConnectionError | ConnectionClosedError) or _is_connection_error(e):
        return StorageError(f"cannot {action} {uri}: S3 endpoint {endpoint} unreachable or closed the connection "
                            f"({type(e).__name__}); check that the server is up and the endpoint URL, then retry")
    return StorageError(f"cannot {action} {uri} at {endpoint}: {type(e).__name__}: {e}")


def _chain(e: BaseException | None) -> list[BaseException]:
    """``e`` and what it wraps: s3transfer/boto3 re-raise botocore errors inside their own (S3UploadFailedError,
    RetriesExceededError), as a cause, a context or ``last_exception``."""
    out: list[BaseException] = []
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ or e.__context__ or getattr(e, "last_exception", None)
    return out


def _botocore_cause(e: BaseException) -> BaseException:
    from botocore.exceptions import BotoCoreError, ClientError

    return next((x for x in _chain(e) if isinstance(x, ClientError | BotoCoreError)), e)


def _is_connection_error(e: BaseException) -> bool:
    """Failures worth a whole-file retry: the connection broke (server restarting, network), not a refusal."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from s3transfer.exceptions import RetriesExceededError

    kinds = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
             IncompleteReadError, ResponseStreamingError, ConnectionError, RetriesExceededError)
    return any(isinstance(x, kinds) for x in _chain(e))


def _retrying(op: Callable[[], T], s3: Any, uri: str, action: str, attempts: int = FILE_ATTEMPTS) -> T:
    """Run ``op``; on a connection failure wait and run it again (exponential backoff); other errors at once."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as e:
            if attempt == attempts or not _is_connection_error(e):
                raise _storage_error(e, s3, uri, action) from None
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s %s: connection to %s failed (%s); retry %d of %d in %.0f s", action, uri, _endpoint(s3),
                        type(e).__name__, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return _sha256_of(f)[0]


def _sha256_of(fh: Any) -> tuple[str, int]:
    """SHA-256 and length of what an open file holds from its position to its end."""
    h, size = hashlib.sha256(), 0
    while chunk := fh.read(_READ_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _head(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD response, or None when it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _forbidden(e: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and (e.response.get("Error", {}).get("Code") in ("403", "AccessDenied")
                                           or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


class _Snapshot(io.RawIOBase):
    """The first ``size`` bytes of an open file, seekable: the bytes that were hashed, sent even when the file
    grows meanwhile (a log appended to); a file replaced by a rename stays the old one through the open handle."""

    def __init__(self, fh: Any, size: int):
        self.fh, self.size, self.pos = fh, size, 0
        fh.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, min(self.size, base + offset))
        self.fh.seek(self.pos)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = self.fh.read(n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _upload_file(s3: Any, path: Path, bucket: str, key: str, config: Any, bar: Any, force: bool = False) -> bool:
    """Upload one file with its sha256 in the metadata; False when an identical object is already there (by its
    metadata and length; ``force`` sends it anyway, over an object damaged with its metadata left as it was).

    The file is opened once: hashed, then sent from the same handle, at most the bytes hashed. Hashing by name and
    sending by name again let a file replaced in between (a checkpoint, every epoch, under a running mirror) go up
    under the sha256 of its predecessor: a store that no restore could read."""
    uri = _uri(bucket, key)
    with open(path, "rb") as fh:
        digest, size = _sha256_of(fh)

        def op() -> bool:
            try:
                head = _head(s3, bucket, key)
            except Exception as e:
                if not _forbidden(e):
                    raise
                head = None  # allowed to write but not to read: just upload (a refused upload still fails clearly)
            if not force and head is not None and head.get("Metadata", {}).get(SHA256_KEY) == digest \
                    and head.get("ContentLength") == size:
                bar.update(size)
                return False
            if size >= config.multipart_threshold:
                _abort_unfinished(s3, bucket, key)
            s3.upload_fileobj(_Snapshot(fh, size), bucket, key, ExtraArgs={"Metadata": {SHA256_KEY: digest}},
                              Config=config, Callback=bar.update)
            return True

        return _retrying(op, s3, uri, "upload to")


def _abort_unfinished(s3: Any, bucket: str, key: str) -> None:
    """Abort multipart uploads of ``key`` that an interrupted push left behind (their parts are invisible to a
    listing but stored, and billed, until aborted): whoever pushes a key owns its unfinished uploads."""
    try:
        pages = s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key)
        stale = [u["UploadId"] for page in pages for u in page.get("Uploads", []) if u["Key"] == key]
    except Exception as e:
        if not _forbidden(e):
            raise
        log.debug("not allowed to list multipart uploads in %s; leftovers, if any, stay", bucket)
        return
    for upload_id in stale:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    if stale:
        log.warning("aborted %d unfinished multipart upload(s) of %s left by an interrupted transfer", len(stale),
                    _uri(bucket, key))


def files_to_upload(local_path: str | os.PathLike) -> tuple[list[Path], int]:
    """What ``upload`` sends of ``local_path``: the file itself, or the folder's files, sorted, without the
    temporary files of a killed write or download (``.frames.npy.tmp-123.npy``, ``.sim.staging-*/``); and how many
    of those were left out."""
    local_path = Path(local_path)
    if local_path.is_file():
        return [local_path], 0
    if not local_path.is_dir():
        raise FileNotFoundError(f"{local_path}: no such file or folder to upload")
    found = [p for p in sorted(local_path.rglob("*")) if p.is_file()]
    kept = [p for p in found if not any(is_temporary(part) for part in p.relative_to(local_path).parts)]
    return kept, len(found) - len(kept)


def upload(local_path: str | os.PathLike, uri: str, *, client: Any = None, multipart_threshold: int | None = None,
           multipart_chunksize: int | None = None, progress: bool = False,
           log_level: int = logging.INFO, delete: bool = False, force: bool = False) -> list[str]:
    """Upload a file (to ``uri``, or ``uri/<name>`` when ``uri`` ends with ``/``) or a folder, recursively, under
    the prefix ``uri``. Returns the keys that now hold the files, sorted (objects already there with the same
    SHA-256 are kept, not sent again). ``log_level``: of the line that says what was sent (a caller that copies
    one file at a time, every minute, passes DEBUG); warnings stay warnings. ``delete`` (a folder only): then also
    delete the objects under the prefix that the folder no longer holds, once every file is up, so that the prefix
    is a copy of the folder (a pull would otherwise bring back files deleted here). ``force``: send every file,
    even where an object with the same sha256 metadata and length is there (the repair of an object damaged on the
    server, which its metadata alone cannot show)."""
    s3 = client or _new_client()
    local_path = Path(local_path)
    bucket, prefix = parse_s3_uri(uri)
    kept, skipped = files_to_upload(local_path)
    if delete and (local_path.is_file() or not prefix.strip("/")):
        raise StorageError(f"push {local_path} -> {uri} with delete: give a folder and a prefix under the bucket "
                           "(deleting what a single file or a whole bucket does not hold is refused)")
    if local_path.is_file():
        key = prefix + local_path.name if (not prefix or prefix.endswith("/")) else prefix
        files = [(local_path, key)]
    else:
        base = prefix.rstrip("/")
        if skipped:
            log.warning("%s: %d temporary file(s) of an interrupted write left out", local_path, skipped)
        files = [(p, f"{base}/{p.relative_to(local_path).as_posix()}" if base else p.relative_to(local_path).as_posix())
                 for p in kept]
        if not files:
            raise StorageError(f"{local_path}: folder holds no files to upload")
    config = _transfer_config(multipart_threshold, multipart_chunksize)
    sent = 0
    with _progress(sum(p.stat().st_size for p, _ in files), f"upload {local_path.name}", progress) as bar:
        for path, key in files:
            sent += _upload_file(s3, path, bucket, key, config, bar, force)
    log.log(log_level, "uploaded %d of %d file(s) to %s (%d already there, identical)", sent, len(files), uri,
            len(files) - sent)
    keys = sorted(key for _, key in files)
    if delete:
        _delete_others(s3, bucket, prefix.rstrip("/") + "/", set(keys), local_path)
    return keys


def delete_prefix(uri: str, *, client: Any = None) -> int:
    """Delete every object under the prefix ``uri`` (``s3://bucket/prefix``; a whole bucket is refused); returns
    how many."""
    s3 = client or _new_client()
    bucket, prefix = parse_s3_uri(uri)
    if not prefix.strip("/"):
        raise StorageError(f"delete {uri}: give a prefix under the bucket (deleting a whole bucket is refused)")
    return _delete_others(s3, bucket, prefix.rstrip("/") + "/", set(), None)


def delete(uri: str, *, client: Any = None) -> int:
    """Delete what ``download(uri, ...)`` reads: the object ``uri`` names, or else every object under the prefix
    ``uri``; returns how many objects were deleted."""
    s3 = client or _new_client()
    bucket, key = parse_s3_uri(uri)
    if key and not key.endswith("/") and _retrying(lambda: _head(s3, bucket, key), s3, uri, "delete") is not None:
        _retrying(lambda: s3.delete_object(Bucket=bucket, Key=key), s3, uri, "delete")
        log.info("deleted %s", uri)
        return 1
    return delete_prefix(uri, client=s3)


def _delete_others(s3: Any, bucket: str, prefix: str, keep: set[str], folder: Path | None) -> int:
    """Delete the objects under ``prefix`` whose keys are not in ``keep`` (1,000 per request, S3's limit);
    ``folder``: the folder they are missing from, for the log line (None: every object was to go)."""
    uri = _uri(bucket, prefix)
    stale = [u.split("/", 3)[3] for u in list_uris(uri, client=s3)]
    stale = [k for k in stale if k not in keep]
    for i in range(0, len(stale), 1000):
        batch = {"Objects": [{"Key": k} for k in stale[i:i + 1000]], "Quiet": True}
        out = _retrying(lambda b=batch: s3.delete_objects(Bucket=bucket, Delete=b), s3, uri, "delete in")
        if out.get("Errors"):
            first = out["Errors"][0]
            raise StorageError(f"cannot delete {_uri(bucket, first.get('Key', '?'))}: {first.get('Code')} "
                               f"{first.get('Message', '')}".rstrip())
    if stale:
        log.info("deleted %d object(s) under %s%s", len(stale), uri,
                 f" that {folder} no longer holds" if folder is not None else "")
    return len(stale)


def _put(data: bytes, uri: str, client: Any, **condition: str) -> dict[str, Any]:
    """One object written with its sha256 in the metadata (and S3's write ``condition``, if any); the response."""
    s3 = client or _new_client()
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"not an object URI: {uri!r} (expected s3://bucket/key, not a prefix)")
    digest = hashlib.sha256(data).hexdigest()
    return _retrying(lambda: s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={SHA256_KEY: digest},
                                           **condition), s3, uri, "write")


def put_bytes(data: bytes, uri: str, *, client: Any = None) -> str:
    """Write ``data`` to one object, with its sha256 in the metadata; returns the key."""
    _put(data, uri, client)
    return parse_s3_uri(uri)[1]


def put_bytes_if(data: bytes, uri: str, etag: str | None, *, client: Any = None) -> str:
    """Write ``data`` to one object only if it is still the version read (``etag``, from ``get_bytes_etag``), or,
    with ``etag=None``, only if there is none yet (S3's conditional writes, If-Match / If-None-Match); returns the
    new ETag. Raises ``StorageConflict`` when another writer came first: read again, merge, try again. A server that
    ignores the conditions (some S3-compatible ones) makes this a plain ``put_bytes``."""
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
    return str(_put(data, uri, client, **condition)["ETag"])


def _expected_sha256(head: dict[str, Any], uri: str) -> str:
    digest = head.get("Metadata", {}).get(SHA256_KEY)
    if not digest:
        raise StorageCorrupt(f"{uri}: object has no sha256 metadata (x-amz-meta-sha256), so it cannot be verified; "
                           "upload it with `sonossl artifacts push`")
    return str(digest)


def _mismatch(uri: str, expected: str, got: str) -> StorageError:
    return ChecksumMismatch(f"{uri}: checksum mismatch: the object's sha256 metadata says {expected}, the downloaded "
                        f"bytes hash to {got}; the object is corrupted (or was overwritten without its metadata): "
                        "nothing was written")


def get_bytes(uri: str, *, client: Any = None) -> bytes:
    """Read one object, verified against its sha256 metadata."""
    return get_bytes_etag(uri, client=client)[0]


def get_bytes_etag(uri: str, *, client: Any = None) -> tuple[bytes, str]:
    """Read one object, verified against its sha256 metadata, and its ETag (for ``put_bytes_if``)."""
    s3 = client or _new_client()
    bucket, key = parse_s3_uri(uri)

    def op() -> tuple[bytes, dict[str, Any]]:
        resp = s3.get_object(Bucket=bucket, Key=key)  # body and metadata of one response: one object version
        return resp["Body"].read(), resp

    data, resp = _retrying(op, s3, uri, "read")
    expected = _expected_sha256(resp, uri)
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise _mismatch(uri, expected, got)
    return data, str(resp["ETag"])


def list_uris(prefix_uri: str, *, client: Any = None, start_after: str = "") -> list[str]:
    """All object URIs under a prefix (``s3://bucket/prefix``; ``s3://bucket`` for the whole bucket), sorted;
    with ``start_after`` (a key) only those whose keys sort after it (S3 lists keys in that order, so the ones
    before it are not even listed)."""
    s3 = client or _new_client()
    bucket, prefix = parse_s3_uri(prefix_uri)
    after = {"StartAfter": start_after} if start_after else {}

    def op() -> list[str]:
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **after):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys

    return sorted(_uri(bucket, k) for k in _retrying(op, s3, prefix_uri, "list"))


def holds(uri: str, *, client: Any = None) -> bool:
    """Whether ``uri`` names an object, or a prefix with objects under it (``uri/...``)."""
    base = uri.rstrip("/")
    return any(u == base or u.startswith(base + "/") for u in list_uris(uri, client=client))


def _download_file(s3: Any, bucket: str, key: str, dest: Path, config: Any, bar: Any,
                   head: dict[str, Any] | None = None) -> Path:
    """Download one object to ``dest`` through a temporary file, verified before the rename."""
    uri = _uri(bucket, key)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def op() -> Path:
        nonlocal head
        head = head or _head(s3, bucket, key)
        if head is None:
            raise StorageError(f"cannot download {uri}: no such object at {_endpoint(s3)}")
        expected = _expected_sha256(head, uri)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            s3.download_file(bucket, key, tmp, Config=config, Callback=bar.update)
            got = file_sha256(tmp)
            if got != expected:
                now = _head(s3, bucket, key)
                if now is not None and now.get("ETag") != head.get("ETag"):
                    raise StorageError(f"cannot download {uri}: the object was replaced during the download; "
                                       "run it again")
                raise _mismatch(uri, expected, got)
            os.chmod(tmp, 0o666 & ~current_umask())
            fsync_file(tmp)  # a rename is durable only with its data
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            head = None  # a retry looks again: the object may have been replaced meanwhile
            raise
        return dest

    return _retrying(op, s3, uri, "download")


def _safe_relative(bucket: str, key: str, prefix: str, uri: str) -> str:
    """The local relative path of ``key`` under ``prefix``; refuses keys that would leave the destination."""
    rel = key[len(prefix):]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel \
            or "\0" in rel or posixpath.isabs(rel):
        raise StorageError(f"{_uri(bucket, key)}: object key would be written outside the destination "
                           f"folder ({rel!r}); refusing to download {uri}")
    return rel


def _would_delete(dest: Path, incoming: set[str]) -> list[str]:
    """What replacing ``dest`` by a folder of the files ``incoming`` (paths relative to it) would lose: ``dest``
    itself when it is a file or a symbolic link, else every entry under it that is not incoming (relative paths,
    sorted; an empty folder ends in '/'), hidden and temporary-looking names included: a pull deletes nothing
    unasked."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        return [str(dest)]
    if not dest.exists():
        return []
    folders = {str(PurePosixPath(rel).parent) for rel in incoming}
    folders |= {str(p) for rel in folders for p in PurePosixPath(rel).parents}
    lost = []
    for p in dest.rglob("*"):
        rel = p.relative_to(dest).as_posix()
        if p.is_dir() and not p.is_symlink():
            if rel not in folders and not any(p.iterdir()):
                lost.append(rel + "/")
        elif rel not in incoming:
            lost.append(rel)
    return sorted(lost)


def download(uri: str, local_path: str | os.PathLike, *, client: Any = None, progress: bool = False,
             replace: bool = False) -> Path:
    """Download one object to the file ``local_path`` (into it, when it is a folder), or every object under the
    prefix ``uri`` into the folder ``local_path``, which is replaced as a whole only once every file is in and
    verified. A ``local_path`` written with a trailing ``/`` is a folder to download into, under the object's or
    the prefix's last name, like ``cp -r``: ``download("s3://b/clips/sim", "data/clips/")`` writes
    ``data/clips/sim`` and leaves the rest of ``data/clips`` alone. Replacing a folder that holds files the prefix
    does not (or a file, or a symbolic link) would delete them: refused, before anything is downloaded, unless
    ``replace``. Returns the path written."""
    s3 = client or _new_client()
    into = str(local_path).endswith(("/", os.sep))
    local_path = Path(local_path)
    bucket, key = parse_s3_uri(uri)
    config = _transfer_config()
    head = _retrying(lambda: _head(s3, bucket, key), s3, uri, "download") if key and not key.endswith("/") else None
    if into:
        local_path = local_path / (posixpath.basename(key.rstrip("/")) or bucket)
    if head is not None:
        if local_path.is_dir():  # like cp: into the folder, under the object's name
            local_path = local_path / posixpath.basename(key)
        with _progress(int(head.get("ContentLength", 0)), f"download {local_path.name}", progress) as bar:
            _download_file(s3, bucket, key, local_path, config, bar, head)
        log.info("downloaded %s to %s (sha256 verified)", uri, local_path)
        return local_path

    prefix = key if not key or key.endswith("/") else key + "/"
    listing: list[dict[str, Any]] = []

    def op() -> None:
        listing.clear()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            listing.extend(page.get("Contents", []))

    _retrying(op, s3, uri, "download")
    objects = [o for o in listing if not o["Key"].endswith("/")]  # folder markers some tools create
    if not objects:
        raise StorageError(f"cannot download {uri}: no such object or prefix at {_endpoint(s3)}")
    here = Path.cwd().resolve()
    if local_path.resolve() == here or local_path.resolve() in here.parents:  # '.', '..': replaced as a whole
        raise StorageError(f"cannot download {uri} to {str(local_path)!r}: a prefix replaces its destination folder "
                           f"as a whole, and {str(local_path)!r} is the current folder or one above it; give a "
                           f"folder of its own (or end it with '/' to download into it: {local_path}/"
                           f"{posixpath.basename(prefix.rstrip('/')) or bucket})")
    # every key is checked before anything is written
    rels = [(o, _safe_relative(bucket, o["Key"], prefix, uri)) for o in objects]
    lost = [] if replace else _would_delete(local_path, {rel for _, rel in rels})
    if lost:
        into_it = ""
        if lost != [str(local_path)]:
            what = (f"{local_path} holds {len(lost)} file(s) or folder(s) that {uri} does not "
                    f"({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''})")
            if not into:  # a folder of its own inside it (with the '/' already given, that folder is this one)
                into_it = (f" end it with '/' to download into it ({local_path}/"
                           f"{posixpath.basename(prefix.rstrip('/')) or bucket}),")
        else:
            what = f"{local_path} is {'a symbolic link' if local_path.is_symlink() else 'a file'}, not a folder"
        raise StorageError(f"cannot download {uri} to {local_path}: {what}, and a prefix replaces its destination "
                           f"as a whole; give a folder of its own,{into_it} or replace it (`sonossl artifacts pull "
                           "--replace`, replace=True)")
    with _progress(sum(int(o["Size"]) for o in objects), f"download {local_path.name}", progress) as bar, \
            atomic_dir(local_path) as staging:
        for obj, rel in rels:
            _download_file(s3, bucket, obj["Key"], staging / rel, config, bar)
    log.info("downloaded %d file(s) from %s to %s (sha256 verified)", len(objects), uri, local_path)
    return local_path
