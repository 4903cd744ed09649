"""``tinyllava-demo``: the Gradio demo in a browser (see tinyllava_edge/apps/demo.py).

    tinyllava-demo                                   # runs/tiny-shapes/bundle and its siblings
    tinyllava-demo --model runs/tiny-shapes/bundle-Q8_0 --device cpu
    tinyllava-demo --model runs/tiny-shapes          # every bundle / checkpoint in it

Serves on 127.0.0.1 unless --host says otherwise; a public gradio.live link only with --share.
"""

from __future__ import annotations

import argparse
import sys

from tinyllava_edge.cli.common import (
    USER_ERRORS,
    ArgumentParser,
    add_model_option,
    add_truncated_images_option,
    fail,
)


def build_parser() -> argparse.ArgumentParser:
    from tinyllava_edge.apps.demo import DEFAULT_CONCURRENCY, MAX_FILE_SIZE
    from tinyllava_edge.apps.variants import DEFAULT_BUNDLE
    from tinyllava_edge.runtime.devices import DEVICES

    parser = ArgumentParser(
        prog="tinyllava-demo",
        description="Chat with a model about an image in the browser, with live speed figures.",
    )
    add_model_option(parser, f"a bundle, a checkpoint, or a directory of them (default: {DEFAULT_BUNDLE} and the "
                             "bundles / checkpoints beside it)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run (%(default)s: detected)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (%(default)s)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="requests handled at once (%(default)s); answers on one model still run one at a time")
    parser.add_argument("--max-file-size", default=MAX_FILE_SIZE, help="largest upload (%(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads per model (default: physical cores)")
    add_truncated_images_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tinyllava_edge.apps.variants import discover

    try:
        variants = discover(args.model, revision=args.revision)
    except USER_ERRORS as err:
        return fail(err)
    return serve(variants, args)


def serve(variants, args: argparse.Namespace) -> int:
    """Build the page for `variants` and serve it until interrupted (also the main job's last step)."""
    try:
        from tinyllava_edge.apps.demo import build_app

        options = {"n_threads": args.threads} if args.threads else {}
        app = build_app(variants, args.device, concurrency=args.concurrency, load_options=options, preload=True,
                        allow_truncated_images=args.allow_truncated_images)
    except USER_ERRORS as err:
        return fail(err)
    print(f"serving {', '.join(v.name for v in variants)} on {args.device}: open http://{args.host}:{args.port} "
          "in a browser (Ctrl+C stops)", file=sys.stderr, flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
                   allowed_paths=[str(app.examples_dir)], show_error=True)
    except OSError as err:  # e.g. the port is taken
        return fail(err)
    finally:
        app.model_pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
