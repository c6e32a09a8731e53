"""``python -m sonossl.serve``: the entry point of the serving image.

    python -m sonossl.serve --model-dir models/export --http-port 8080 --host 127.0.0.1 --request-log logs/requests

KServe's own options are accepted (a ServingRuntime passes ``--model_name``); those that apply here are honoured:
``--model_name``, ``--http_port``, ``--ssl_certfile`` with ``--ssl_keyfile`` (HTTPS; on 8443 when the port is left
at 8080, as KServe does), ``--access_log_format``, ``--timeout-keep-alive`` and ``--event-loop``. The server runs
one REST worker and no gRPC: ``--workers`` other than 1 is refused (scale with replicas: the model is CPU-bound and
the request log belongs to one process), and the gRPC options have no effect.
"""

from __future__ import annotations

import argparse
import logging
import sys


# KServe's options passed on to its ModelServer (whose defaults come from the process's own sys.argv, parsed when
# kserve is imported: a main() called from code would silently drop them)
SERVER_OPTIONS = ("access_log_format", "timeout_keep_alive", "event_loop", "max_threads",
                  "max_asyncio_workers", "enable_latency_logging", "enable_docs_url")


def build_parser() -> argparse.ArgumentParser:
    from kserve.model_server import parser as kserve_parser

    from sonossl.serve.model import DEFAULT_MODEL_DIR, Limits

    p = argparse.ArgumentParser(prog="python -m sonossl.serve", parents=[kserve_parser],
                                description="Serve an exported sonossl model (Open Inference Protocol v2 and v1).")
    p.add_argument("--model-dir", "--model_dir", dest="model_dir", default=DEFAULT_MODEL_DIR,
                   help=f"export folder (model.pt, model_card.json); default {DEFAULT_MODEL_DIR}, where KServe puts it")
    p.add_argument("--http-port", dest="http_port", type=int, default=8080, help="HTTP port (same as --http_port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on: 127.0.0.1 (default, this machine only) or 0.0.0.0 (in a cluster)")
    p.add_argument("--request-log", default=None,
                   help="folder or s3:// prefix for the request log (drift monitoring); default: no log")
    p.add_argument("--log-flush-seconds", type=float, default=5.0, help="how often the request log is written")
    p.add_argument("--max-frames", type=int, default=Limits.max_frames, help="frames per request")
    p.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / 2**20, help="request size limit")
    p.set_defaults(model_name="sonossl")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sonossl.serve.model import Limits
    from sonossl.serve.server import serve

    if args.workers != 1:
        print(f"sonossl serve: error: --workers {args.workers}: the server runs one worker; scale with replicas",
              file=sys.stderr)
        return 2
    limits = Limits(max_frames=args.max_frames, max_body_bytes=int(args.max_body_mb * 2**20))
    try:
        serve(args.model_dir, host=args.host, port=args.http_port, name=args.model_name, limits=limits,
              request_log=args.request_log, log_flush_seconds=args.log_flush_seconds,
              ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
              server_options={k: getattr(args, k) for k in SERVER_OPTIONS})
    except (FileNotFoundError, ValueError) as e:
        print(f"sonossl serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
