"""``tinyllava-bench speed``: speed, memory, size (and accuracy, on a trained shapes model) of every
way to run one model, side by side, against the machine's memory roofline.

A thin layer over :func:`tinyllava_edge.bench.speed.run_speed` (defaults live there) and
:func:`tinyllava_edge.bench.report.write_outputs`.

    tinyllava-bench speed --model runs/tiny-shapes/model --data runs/tiny-shapes/data --model bench-scale
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tinyllava_edge.cli.common import USER_ERRORS, ArgumentParser, fail

DEFAULT_DOCS = Path("docs")
DEFAULT_JSON = Path("docs") / "results" / "bench.json"


def build_parser() -> argparse.ArgumentParser:
    # No heavy imports here: --help stays fast (the defaults module imports numpy only).
    from tinyllava_edge.bench import speed
    from tinyllava_edge.bench.contenders import DEFAULT_CONTENDERS

    parser = ArgumentParser(prog="tinyllava-bench",
                                     description="Benchmarks of tinyllava-edge against the alternatives.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "speed", help="load time, image encode, TTFT, prefill/decode tok/s, peak RSS, size, accuracy per contender",
        description="Every contender (torch fp32, torch nf4, our edge runtime on F16/Q8_0/Q4_K_M bundles, raw "
                    "llama.cpp, stock llama.cpp mtmd) on the same model and prompts, each in its own process, "
                    "interleaved rounds, medians; writes a markdown table, JSON and plots.",
        epilog="contenders: " + "; ".join(DEFAULT_CONTENDERS))
    p.add_argument("--model", action="append", required=True,
                   help="a checkpoint directory, 'bench-scale' (Qwen2-0.5B + SigLIP-so400m dims) or 'phi2-scale' "
                        "(Phi-2 + SigLIP-so400m dims, bf16), random weights, built and cached under --cache; "
                        "repeatable")
    p.add_argument("--data", action="append", default=[],
                   help="a shapes dataset dir (tinyllava-data) for the N-th --model: real images and the accuracy "
                        "subset; 'none' for a model without one (repeatable, in --model order)")
    p.add_argument("--contender", action="append", help="run only these (repeatable; default: all)")
    p.add_argument("--rounds", type=int, default=speed.DEFAULT_ROUNDS, help="interleaved rounds (%(default)s)")
    p.add_argument("--prompts", type=int, default=speed.DEFAULT_PROMPTS, help="timed prompts per round (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=speed.DEFAULT_MAX_NEW_TOKENS,
                   help="tokens decoded per timed prompt (%(default)s)")
    p.add_argument("--accuracy", type=int, default=speed.DEFAULT_ACCURACY,
                   help="shapes test questions for accuracy, with --data (%(default)s; 0: none)")
    p.add_argument("--threads", type=int, help="threads for every contender (default: all cores)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="GEMV matrix size for the bandwidth (%(default)s)")
    p.add_argument("--timeout", type=float, default=speed.DEFAULT_TIMEOUT_S,
                   help="seconds one contender's round may take (%(default)s)")
    p.add_argument("--cache", type=Path, default=Path("runs"), help="where bench-scale and bundles go (%(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_DOCS, help="markdown + plots directory (%(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="JSON results file (%(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    m = commands.add_parser(
        "memory", help="peak resident memory and wall time of export (--bits 16, --bits 4), quantize, load and one "
                       "answer, against the checkpoint's size",
        description="Each stage in its own process (the tinyllava-export / tinyllava-quantize commands, then "
                    "tinyllava_edge.load and one answer on the 4-bit bundle): wall time, peak RSS (os.wait4), the "
                    "ratio to the checkpoint's bytes on disk, and each export's own per-stage figures. Run one "
                    "scale at a time on a shared machine: phi2-scale peaks near 8 GB.")
    m.add_argument("--model", action="append", required=True,
                   help="'bench-scale' (Qwen2-0.5B + SigLIP-so400m dims, fp32), 'phi2-scale' (Phi-2 + "
                        "SigLIP-so400m dims, bf16, TinyLLaVA-Phi-2-SigLIP-3.1B's size) or a checkpoint; repeatable")
    m.add_argument("--cache", type=Path, default=Path("runs"), help="where scales and bundles go (%(default)s)")
    m.add_argument("--answer-tokens", type=int, default=16, help="tokens the one answer decodes (%(default)s)")
    m.add_argument("--keep", action="store_true", help="keep the bundles made (default: removed after measuring)")
    m.add_argument("--json", type=Path, default=Path("docs") / "results" / "bench-memory.json",
                   help="JSON results file (%(default)s; one entry per scale, replaced when measured again)")
    return parser


def run_memory_command(args: argparse.Namespace) -> list[Path]:
    import json

    from tinyllava_edge.atomic import write_text
    from tinyllava_edge.bench.memory import markdown_table, run_memory

    previous = json.loads(args.json.read_text(encoding="utf-8")) if args.json.is_file() else {}
    for model in args.model:
        result = run_memory(model, args.cache, answer_tokens=args.answer_tokens, keep=args.keep)
        previous[result["scale"]] = result
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(previous, indent=1) + "\n")  # each scale as soon as it is measured
        print(f"\n{markdown_table(result)}")
    return [args.json]


def run(args: argparse.Namespace, command: str) -> list[Path]:
    from tinyllava_edge.bench.contenders import DEFAULT_CONTENDERS
    from tinyllava_edge.bench.report import write_outputs
    from tinyllava_edge.bench.speed import run_speed
    from tinyllava_edge.errors import TinyLlavaError

    if len(args.data) > len(args.model):
        raise TinyLlavaError(f"{len(args.data)} --data for {len(args.model)} --model; give at most one per model")
    datas = [None if d.lower() == "none" else d for d in args.data] + [None] * (len(args.model) - len(args.data))
    results = []
    for model, data in zip(args.model, datas):
        result = run_speed(model, data=data, cache_root=args.cache, contenders=args.contender or DEFAULT_CONTENDERS,
                           rounds=args.rounds, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                           accuracy=args.accuracy, n_threads=args.threads, bandwidth_gib=args.bandwidth_gib,
                           timeout_s=args.timeout)
        results.append(result)
    written = write_outputs(results, args.out, args.json, command, plots=not args.no_plots)
    from tinyllava_edge.bench.report import floors_table, markdown_table

    for result in results:
        print(f"\n{result['scale']}\n{markdown_table(result)}\n\n{floors_table(result)}")
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "memory":
            written = run_memory_command(args)
        else:
            written = run(args, "tinyllava-bench " + shlex.join(argv))
    except USER_ERRORS as err:
        return fail(err)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
