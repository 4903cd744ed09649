"""``tinyllava-chat``: talk to a bundle or a checkpoint, interactively or once.

    tinyllava-chat --model bundles/tiny-shapes                                  # interactive
    tinyllava-chat --model bundles/tiny-shapes --image cat.png --prompt "What is it?"

A thin layer over :func:`tinyllava_edge.runtime.load` and its chat session: answers stream as
they are decoded, a stats line (image encode, time to first token, prefill and decode speed,
context used, peak memory) follows each one on stderr. Interactive commands: ``/image PATH`` (the
image goes with the next question), ``/reset`` (forget the conversation), ``/quit``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from tinyllava_edge.cli.common import (
    USER_ERRORS,
    ArgumentParser,
    add_model_option,
    add_truncated_images_option,
    fail,
)
from tinyllava_edge.errors import TinyLlavaError

HELP = "commands: /image PATH (goes with the next question), /reset (forget the conversation), /quit"


def build_parser() -> argparse.ArgumentParser:
    # Defaults come from the runtime (one place); importing it does not import torch.
    from tinyllava_edge.runtime.chat import OVERFLOW_POLICIES
    from tinyllava_edge.runtime.devices import DEVICES
    from tinyllava_edge.runtime.vlm import DEFAULT_MAX_NEW_TOKENS

    parser = ArgumentParser(
        prog="tinyllava-chat",
        description="Chat with a model: a bundle (manifest.json; onnxruntime + llama.cpp, no torch) or a "
                    "checkpoint (config.json; transformers). With --prompt it answers once and exits; without, "
                    f"it reads questions from stdin ({HELP}).",
    )
    add_model_option(parser, "bundle or checkpoint directory", required=True)
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run (%(default)s: detected)")
    parser.add_argument("--image", type=Path, help="image for the (first) question")
    parser.add_argument("--prompt", help="answer this one question and exit")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="longest answer in tokens (%(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (%(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (%(default)s)")
    parser.add_argument("--seed", type=int, help="seed for sampling (reproducible answers)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    parser.add_argument("--n-ctx", type=int, help="context length (default: what fits the device memory, capped by "
                                                   "the model's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="checkpoints only: torch dtype (fp32)")
    parser.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="drop_oldest",
                        help="when the conversation outgrows the context (%(default)s)")
    add_truncated_images_option(parser)
    parser.add_argument("--no-stats", action="store_true", help="no stats line after each answer")
    return parser


def load_model(args: argparse.Namespace):
    from tinyllava_edge.runtime import load

    options = {"n_threads": args.threads, "n_ctx": args.n_ctx, "dtype": args.dtype}
    return load(args.model, device=args.device, revision=args.revision,
                allow_truncated_images=args.allow_truncated_images, **{k: v for k, v in options.items() if v is not None})


def _answer(session, image, question: str, out: TextIO, err: TextIO, stats: bool) -> None:
    """Stream one answer to `out`; Ctrl-C stops it (the partial answer stays in the conversation)."""
    stream = session.ask_stream(image, question)
    try:
        for piece in stream:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        out.write(" [interrupted]")
    out.write("\n")
    out.flush()
    if stats and session.vlm.last_stats is not None:
        print(session.vlm.last_stats.line(), file=err, flush=True)


def interactive(session, first_image: Path | None, stdin: TextIO, out: TextIO, err: TextIO, stats: bool) -> int:
    vlm = session.vlm
    info = vlm.info()
    print(f"{vlm.model_id}: {info['backend']} backend on {vlm.device}, context {vlm.n_ctx}. {HELP}", file=err)
    for note in info.get("notes", []):
        print(f"note: {note}", file=err)
    image = first_image
    prompt = "> " if stdin.isatty() else ""
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                session.reset()
                image = None
                print("(conversation cleared)", file=err)
            elif command == "/image":
                path = Path(rest.strip()) if rest.strip() else None
                if path is None or not path.is_file():
                    fail(TinyLlavaError(f"image file {rest.strip() or '(none given)'} does not exist; usage: "
                                        "/image PATH"))
                else:
                    image = path
                    print(f"(image {path} goes with the next question)", file=err)
            elif command == "/help":
                print(HELP, file=err)
            else:
                fail(TinyLlavaError(f"unknown command {command}; {HELP}"))
            continue
        try:
            _answer(session, image, line, out, err, stats)
            image = None
        except USER_ERRORS as error:  # a bad image or question: say so and go on
            fail(error)
    return 0


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin = stdin if stdin is not None else sys.stdin
    if args.image is not None and not args.image.is_file():
        return fail(TinyLlavaError(f"image file {args.image} does not exist"))
    if args.prompt is not None and not args.prompt.strip():
        return fail(TinyLlavaError("--prompt is empty; ask a question"))
    try:
        vlm = load_model(args)
    except USER_ERRORS as err:
        return fail(err)
    try:
        session = vlm.chat(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, overflow=args.overflow)
        if args.prompt is not None:
            _answer(session, args.image, args.prompt, sys.stdout, sys.stderr, not args.no_stats)
            return 0
        return interactive(session, args.image, stdin, sys.stdout, sys.stderr, not args.no_stats)
    except USER_ERRORS as err:
        return fail(err)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        vlm.close()


if __name__ == "__main__":
    sys.exit(main())
