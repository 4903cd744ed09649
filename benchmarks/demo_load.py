"""Load test of the Gradio demo: concurrent sessions asking shapes questions through gradio_client.

    python benchmarks/demo_load.py                          # runs/tiny-shapes/bundle, 8 x 5
    python benchmarks/demo_load.py --model runs/tiny-shapes/bundle --sessions 16 --questions 10

Serves the demo in this process (so its peak RSS is this process's), drives `/ask` from
`--sessions` threads (each its own gradio_client session), and prints latency percentiles,
errors and peak RSS. Exit status 1 when any call failed.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    from tinyllava_edge.apps.demo import DEFAULT_CONCURRENCY, build_app, example_images
    from tinyllava_edge.apps.loadtest import run_load
    from tinyllava_edge.apps.variants import discover
    from tinyllava_edge.cli.common import USER_ERRORS, fail
    from tinyllava_edge.runtime.stats import peak_rss_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle / checkpoint (default: runs/tiny-shapes/bundle)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per model")
    args = parser.parse_args(argv)
    try:
        variants = discover(args.model)
        options = {"n_threads": args.threads} if args.threads else {}
        app = build_app(variants[:1], args.device, concurrency=args.concurrency, load_options=options, preload=True)
    except USER_ERRORS as err:
        return fail(err)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(app.examples_dir)])
    try:
        examples = example_images(app.examples_dir)
        rss_before = peak_rss_bytes() / 2**20
        result = run_load(f"http://127.0.0.1:{port}/", examples, variants[0].name, sessions=args.sessions,
                          questions=args.questions, device=args.device, max_new_tokens=args.max_new_tokens)
    finally:
        app.close()
        app.model_pool.close()
    print(f"{variants[0].name} on {args.device}: {result.line()}")
    print(f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB (after loading, before the load: {rss_before:.0f} MiB)")
    for error in result.errors[:10]:
        print(f"error: {error}", file=sys.stderr)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
