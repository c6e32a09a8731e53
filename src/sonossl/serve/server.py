"""The model server: KServe's own ModelServer, with the listen address made configurable and a request size limit.

KServe 0.21 binds its REST server to 0.0.0.0, hard-coded. Inside a cluster that is what a pod needs; on a laptop or
in tests it exposes the model to the network, so ``serve`` takes ``host`` (0.0.0.0 in the image, 127.0.0.1 by
default) and sets it on the uvicorn config KServe builds. Bodies over ``Limits.max_body_bytes`` are refused with
HTTP 413 before they are read, so one oversized upload cannot exhaust the server's memory.

    serve("models/export", host="127.0.0.1", port=8080, request_log="logs/requests")   # blocks until stopped
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from kserve import ModelServer
from kserve.errors import InvalidInput
from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
from kserve.protocol.rest.server import RESTServer

from sonossl.serve.model import DEFAULT_MODEL_DIR, Limits, SonosslModel

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: 413 for a body larger than ``max_bytes``: refused before it is read when its Content-Length
    says so, or, for a body of unknown length (chunked, as a proxy or an HTTP/2 client may send it), as soon as the
    bytes received pass the limit; such a body is held here and handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            status, message = None, None
            # chunked first: a request may carry both headers, and then HTTP/1.1 (RFC 9112) reads it as chunked
            if headers.get(b"transfer-encoding"):
                received = await self._read_chunked(receive)
                if received is None:  # the client went away
                    return
                if isinstance(received, int):
                    status, message = 413, (f"request body of at least {received} bytes is over the limit of "
                                            f"{self.max_bytes} bytes; send fewer frames per request")
                else:
                    receive = received
            elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                status, message = 413, (f"request body of {length.decode(errors='replace')} bytes is over the limit of "
                                        f"{self.max_bytes} bytes; send fewer frames per request")
            if status is not None:
                body = json.dumps({"error": message}).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _read_chunked(self, receive):
        """The whole body of unknown length, as a ``receive`` that replays it; the count of bytes received when it
        passed the limit (nothing more is read); None when the client disconnected."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_bytes:
                return size
            parts.append(part)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(parts), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return whole
            return await receive()  # after the body: a disconnect, as the server reports it

        return replay


class V2ContentType:
    """ASGI middleware: name the content type of v2 infer responses, which KServe 0.21 strips from byte bodies.

    The model answers v2 with JSON it encoded itself (``SonosslModel._v2_response``) and KServe answers binary outputs
    with a JSON header followed by raw tensors; its v2 route drops the content type of both. This puts back
    ``application/json``, or ``application/octet-stream`` when the body carries binary outputs.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            return await self.app(scope, receive, send)

        async def send_typed(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"content-type" not in names:
                    kind = b"application/octet-stream" if b"inference-header-content-length" in names \
                        else b"application/json"
                    message = {**message, "headers": [*message.get("headers", []), (b"content-type", kind)]}
            await send(message)

        await self.app(scope, receive, send_typed)


class _ModelServer(ModelServer):
    """KServe's ModelServer (one REST worker, no gRPC) listening on ``host``.

    A v2 request in the binary data extension is parsed by KServe before the model sees it, and a body that does
    not match its JSON header (a tensor of the wrong size, a BYTES element cut short, a non-numeric header length)
    raised a plain ValueError there: a 500. Here it is a 400 that says what does not match."""

    def __init__(self, host: str, **kwargs):
        super().__init__(**kwargs)
        self.host = host
        decode = self.dataplane.decode_inference_request

        def decode_checked(body, headers, model_name):
            if not isinstance(body, bytes):
                return decode(body, headers, model_name)
            try:
                return decode(body, headers, model_name)
            except InvalidInput:
                raise
            except Exception as e:  # noqa: BLE001 - any parse failure of the client's bytes is the client's
                raise InvalidInput(f"binary data extension: the body does not match its JSON header "
                                   f"({type(e).__name__}: {e})") from None

        self.dataplane.decode_inference_request = decode_checked

    def start(self, models) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        # the uvicorn server reads its config when it binds: this is the only address it listens on
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        scheme = "https" if self.ssl_certfile else "http"
        log.info("sonossl serving on %s://%s:%d (v1 and v2)", scheme, self.host, self.http_port)
        asyncio.run(self._serve())


def _fit_threads_to_cpu_limit() -> None:
    """One torch thread per CPU of the container's limit (``sonossl.machine.cpu_quota``), unless OMP_NUM_THREADS
    says otherwise: torch counts the node's cores, and a pod limited to 2 CPUs on a 64-core node would otherwise
    run 32 threads against 2 CPUs of quota and be throttled at every request."""
    import torch

    from sonossl.machine import cpu_quota

    quota = cpu_quota()
    if quota is not None and "OMP_NUM_THREADS" not in os.environ and quota < torch.get_num_threads():
        log.info("CPU limit %d: %d torch threads, not %d", quota, quota, torch.get_num_threads())
        torch.set_num_threads(quota)


def serve(model_dir: str | Path = DEFAULT_MODEL_DIR, host: str = "127.0.0.1", port: int = 8080,
          name: str = "sonossl", limits: Limits = Limits(), request_log: str | None = None,
          log_flush_seconds: float = 5.0, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          server_options: dict[str, Any] | None = None) -> None:
    """Load the exported model and serve it until SIGTERM/SIGINT (HTTPS on ``port`` with a certificate and its key);
    the request log is flushed on the way out. ``server_options``: more of KServe's ModelServer arguments
    (``access_log_format``, ``timeout_keep_alive``, ``event_loop``), given here, not read from ``sys.argv`` as
    KServe's defaults are."""
    from sonossl.monitor.request_log import RequestLog

    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise ValueError("HTTPS needs both --ssl_certfile and --ssl_keyfile, got only one")
    for option, path in (("--ssl_certfile", ssl_certfile), ("--ssl_keyfile", ssl_keyfile)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{option} {path}: no such file")

    _fit_threads_to_cpu_limit()
    rlog = RequestLog(request_log, flush_seconds=log_flush_seconds) if request_log else None
    model = SonosslModel(name, model_dir, limits=limits, request_log=rlog)
    model.load()
    app.add_middleware(V2ContentType)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    try:
        _ModelServer(host, http_port=port, enable_grpc=False, ssl_certfile=ssl_certfile or None,
                     ssl_keyfile=ssl_keyfile or None, **(server_options or {})).start([model])
    finally:
        if rlog is not None:
            rlog.close()
