"""``tinyllava-serve``: a bundle or checkpoint behind OpenAI's Chat Completions API (docs/serve.md).

    tinyllava-serve                                            # runs/tiny-shapes/bundle on 127.0.0.1:8000
    tinyllava-serve --model runs/tiny-shapes/bundle --workers 2 --api-key KEY
    curl http://127.0.0.1:8000/v1/models

Serves on 127.0.0.1 unless --host says otherwise. The app is tinyllava_edge/apps/serve/app.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tinyllava_edge.cli.common import (
    USER_ERRORS,
    ArgumentParser,
    add_model_option,
    add_truncated_images_option,
    fail,
)


def build_parser() -> argparse.ArgumentParser:
    from tinyllava_edge.apps.serve import settings as d
    from tinyllava_edge.apps.variants import DEFAULT_BUNDLE
    from tinyllava_edge.runtime.devices import DEVICES

    parser = ArgumentParser(
        prog="tinyllava-serve",
        description="Serve a bundle or a checkpoint over HTTP with OpenAI's Chat Completions API.",
    )
    add_model_option(parser, f"a bundle or a checkpoint directory (default: {DEFAULT_BUNDLE}, the main job's)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run (%(default)s: detected)")
    parser.add_argument("--host", default=d.DEFAULT_HOST, help="address to listen on (%(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=d.DEFAULT_PORT, help="port (%(default)s; 0: a free one, printed)")
    parser.add_argument("--workers", type=int, default=d.DEFAULT_WORKERS,
                        help="runtime instances, each with its own KV cache, answering at once (%(default)s)")
    parser.add_argument("--queue", type=int, default=d.DEFAULT_QUEUE,
                        help="requests that may wait for a worker; more get 429 with Retry-After (%(default)s)")
    parser.add_argument("--api-key", help=f"require Authorization: Bearer KEY on /v1 (default: ${d.API_KEY_ENV})")
    parser.add_argument("--served-model-name", help="the model name clients send (default: the model directory's "
                                                    "name, or the Hub repository id)")
    parser.add_argument("--allow-files", type=Path, metavar="DIR",
                        help="also take file:// image URLs of files below DIR (default: data: URIs only)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages from ORIGIN to call the API (repeatable; default: no CORS)")
    parser.add_argument("--max-body-mb", type=float, default=d.DEFAULT_MAX_BODY_MB,
                        help="largest request body, in MiB (%(default)s)")
    parser.add_argument("--max-image-mb", type=float, default=d.DEFAULT_MAX_IMAGE_MB,
                        help="largest encoded image, in MiB (%(default)s)")
    parser.add_argument("--max-image-pixels", type=int, default=d.DEFAULT_MAX_IMAGE_PIXELS,
                        help="most pixels of one decoded image (%(default)s)")
    parser.add_argument("--stream-interval-ms", type=float, default=d.DEFAULT_STREAM_INTERVAL_MS,
                        help="least time between two chunks of a streamed answer; tokens that come faster are "
                             "joined into one chunk, the first goes out at once (%(default)s; 0: a chunk per batch "
                             "the event loop finds ready)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: the physical cores shared out "
                                                    "among the workers)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="uvicorn's log level; info logs every request (%(default)s)")
    add_truncated_images_option(parser)
    return parser


def settings_from_args(args: argparse.Namespace):
    """ServeSettings from the command line; TinyLlavaError for a value that cannot work."""
    from tinyllava_edge.apps.serve.settings import API_KEY_ENV, ServeSettings
    from tinyllava_edge.apps.variants import DEFAULT_BUNDLE, MAIN_JOB, REVISION_WITHOUT_MODEL
    from tinyllava_edge.errors import TinyLlavaError
    from tinyllava_edge.hub import model_name, resolve_model
    from tinyllava_edge.runtime.loader import backend_kind

    if args.model is None:
        if args.revision is not None:
            raise TinyLlavaError(REVISION_WITHOUT_MODEL)
        model = DEFAULT_BUNDLE
        if not model.is_dir():
            raise TinyLlavaError(f"no --model given and the default bundle {model} does not exist; run the main job "
                                 f"first ({MAIN_JOB}) or pass --model PATH (a bundle or a checkpoint)")
    else:
        model = resolve_model(args.model, args.revision)
    backend_kind(model)  # one sentence now for a path that is not a model, not after the server started
    if args.workers < 1:
        raise TinyLlavaError(f"--workers must be at least 1, got {args.workers}")
    if not 0 <= args.port < 65536:
        raise TinyLlavaError(f"--port must be between 0 and 65535, got {args.port}")
    if args.queue < 0:
        raise TinyLlavaError(f"--queue must be 0 or more, got {args.queue}")
    if args.threads is not None and args.threads < 1:
        raise TinyLlavaError(f"--threads must be at least 1, got {args.threads}")
    if not 0 <= args.stream_interval_ms <= 1000:
        raise TinyLlavaError(f"--stream-interval-ms must be between 0 and 1000, got {args.stream_interval_ms}")
    for name in ("max_body_mb", "max_image_mb", "max_image_pixels"):
        if getattr(args, name) <= 0:
            raise TinyLlavaError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.allow_files is not None and not args.allow_files.is_dir():
        raise TinyLlavaError(f"--allow-files {args.allow_files} is not a directory")
    return ServeSettings(
        model=model, served_model_name=args.served_model_name or model_name(model), device=args.device,
        workers=args.workers, queue=args.queue, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allow_files=args.allow_files, cors_origins=tuple(args.cors_origin),
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels, threads=args.threads, stream_interval_s=args.stream_interval_ms / 1e3,
        allow_truncated_images=args.allow_truncated_images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except USER_ERRORS as err:
        return fail(err)
    import uvicorn

    from tinyllava_edge.apps.serve.app import build_app, listening_socket
    from tinyllava_edge.apps.serve.settings import API_KEY_ENV

    try:  # bound here, so a taken port is one error line (uvicorn would log and exit)
        sock = listening_socket(args.host, args.port)
    except OSError as err:
        return fail(err, f"(listening on {args.host}:{args.port})")
    failures: list[BaseException] = []

    def on_load_failure(err: BaseException) -> None:
        failures.append(err)
        server.should_exit = True

    app = build_app(settings, on_load_failure=on_load_failure)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                                           timeout_graceful_shutdown=5))
    if not settings.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this port can use the model "
              f"(--api-key or ${API_KEY_ENV})", file=sys.stderr)
    port = sock.getsockname()[1]
    print(f"serving {settings.model} as {settings.served_model_name!r} on http://{args.host}:{port}/v1 "
          "(OpenAI API; GET /health answers 200 once loaded; Ctrl+C stops)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if failures:
        err = failures[0]
        return fail(err if isinstance(err, USER_ERRORS) else RuntimeError(f"the model did not load ({err!r})"))
    return 0

if __name__ == "__main__":
    sys.exit(main())
