"""``tinyllava-eval``: answer a benchmark with a checkpoint and score it, or score an answers file.

A thin layer over :func:`tinyllava_edge.eval.run_benchmark` and
:func:`tinyllava_edge.eval.score_answers`; each benchmark's files are described by
``tinyllava-eval --help`` (from the benchmark registry) and its generation length default is
the benchmark's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyllava_edge.cli.common import (
    USER_ERRORS,
    ArgumentParser,
    add_model_option,
    add_truncated_images_option,
    fail,
)
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.sizes import human_size

DEFAULT_OUT = Path("runs") / "eval"


def build_parser() -> argparse.ArgumentParser:
    # The eval package imports no torch: building the parser stays fast.
    from tinyllava_edge.eval import BENCHMARKS, get_benchmark
    from tinyllava_edge.eval.predictor import DEFAULT_BATCH_SIZE

    files = "\n".join(f"  {name:10s} {get_benchmark(name).files_help}" for name in BENCHMARKS)
    parser = ArgumentParser(
        prog="tinyllava-eval",
        description="Answer a benchmark's questions with a checkpoint (greedy, batched) and score them; "
                    "writes answers.jsonl (LLaVA format), results.json and results.md.",
        epilog=f"files each benchmark reads:\n{files}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--benchmark", required=True, choices=list(BENCHMARKS), help="which benchmark")
    add_model_option(parser, "checkpoint directory, or a bundle written by tinyllava-export (run by the edge "
                             "runtime; not needed with --score-only)")
    parser.add_argument("--questions", type=Path, help="the benchmark's question file")
    parser.add_argument("--image-folder", type=Path, help="directory the question files' image names are relative to")
    parser.add_argument("--annotations", type=Path, help="ground truth: a file or directory, per benchmark")
    parser.add_argument("--data", type=Path, help="shapes: a dataset directory written by tinyllava-data")
    parser.add_argument("--split", default="test", help="shapes and scienceqa: which split (%(default)s)")
    parser.add_argument("--out", type=Path, help=f"output directory (default: {DEFAULT_OUT}/BENCHMARK, "
                                                 "or the answers file's directory with --score-only)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="questions per batch (%(default)s)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: the benchmark's)")
    parser.add_argument("--limit", type=int, help="ask only the first N questions")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad records (broken lines, missing images, unknown ids) and count them "
                             "in results.json instead of stopping")
    parser.add_argument("--device", default="cpu", help="a checkpoint's torch device (cpu, cuda, cuda:1), or a "
                                                        "bundle's runtime device (auto, cpu, cuda, jetson) (%(default)s)")
    parser.add_argument("--template", help="chat template name (default: the LLM family's)")
    add_truncated_images_option(parser)
    parser.add_argument("--score-only", action="store_true", help="score --answers without running a model")
    parser.add_argument("--answers", type=Path, help="with --score-only: a LLaVA answers .jsonl to score")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def sources_from_args(args: argparse.Namespace):
    from tinyllava_edge.eval import Sources

    if args.data is not None:
        if args.benchmark != "shapes":
            raise TinyLlavaError(f"--data is for the shapes benchmark; {args.benchmark} reads --questions "
                                 "and --image-folder")
        if args.questions is not None:
            raise TinyLlavaError("give --data (with --split) or --questions, not both")
        split_file = args.data / f"{args.split}.json"
        if not split_file.is_file():
            raise TinyLlavaError(f"{split_file} does not exist; expected a dataset directory written by "
                                 "tinyllava-data and a split it holds (train, val, test)")
        return Sources(questions=split_file, image_folder=args.data, split=args.split)
    return Sources(questions=args.questions, image_folder=args.image_folder, annotations=args.annotations,
                   split=args.split)


def run(args: argparse.Namespace) -> dict:
    from tinyllava_edge.eval import get_benchmark, run_benchmark, score_answers

    bench = get_benchmark(args.benchmark)
    sources = sources_from_args(args)
    if args.score_only:
        if args.answers is None:
            raise TinyLlavaError("--score-only needs --answers: the answers .jsonl to score")
        out = args.out or args.answers.parent
        return score_answers(bench, args.answers, sources, out, skip_bad=args.skip_bad)
    if args.answers is not None:
        raise TinyLlavaError("--answers is read with --score-only; without it the model writes the answers")
    if args.model is None:
        raise TinyLlavaError("--model is needed (a checkpoint or bundle directory), or --score-only with --answers")
    from tinyllava_edge.eval import RuntimePredictor, TorchPredictor
    from tinyllava_edge.hub import resolve_model
    from tinyllava_edge.runtime.loader import backend_kind

    max_new_tokens = args.max_new_tokens or bench.max_new_tokens
    settings = {"batch_size": args.batch_size, "max_new_tokens": max_new_tokens, "device": args.device,
                "template": args.template or "the LLM family's", "checkpoint": str(args.model),
                "revision": args.revision,
                "allow_truncated_images": args.allow_truncated_images}

    def load_predictor() -> TorchPredictor | RuntimePredictor:  # called after the benchmark files are checked
        model = resolve_model(args.model, args.revision)
        kind = backend_kind(model)  # "edge" for a bundle, "torch" for a checkpoint
        settings["backend"] = "edge runtime (onnxruntime + llama.cpp)" if kind == "edge" else "torch"
        predictor_class = RuntimePredictor if kind == "edge" else TorchPredictor
        predictor = predictor_class(model, batch_size=args.batch_size, device=args.device,
                                    max_new_tokens=max_new_tokens, template=args.template,
                                    allow_truncated_images=args.allow_truncated_images)
        settings["template"] = predictor.template.name
        return predictor

    return run_benchmark(bench, load_predictor, sources, args.out or DEFAULT_OUT / bench.name, limit=args.limit,
                         skip_bad=args.skip_bad, progress=not args.quiet, settings=settings)


def print_summary(results: dict) -> None:
    from tinyllava_edge.eval import get_benchmark
    from tinyllava_edge.eval.report import headline

    bench = get_benchmark(results["benchmark"])
    counts = results["counts"]
    seconds = results["seconds"]
    timing = f" in {seconds['predict']:.1f} s ({seconds['per_question']:.3f} s/question)" if "predict" in seconds else ""
    print(f"{bench.title}: {counts['answers']} answers, {counts['scored']} scored{timing}")
    scored_as = f" (scored as {results['scorer']})" if results["metrics"] else ""
    print(f"  {headline(bench, results['metrics'])}{scored_as}")
    if results.get("note"):
        print(f"  {results['note']}")
    if (results.get("submission") or {}).get("note"):
        print(f"  {results['submission']['note']}")
    if results["skipped"]["count"]:
        print(f"  skipped {results['skipped']['count']} bad records (listed in results.json)")
    for name, path in results["files"].items():
        p = Path(path)
        size = human_size(p.stat().st_size) if p.is_file() else "missing"
        print(f"  {name:11s} {p} ({size})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tinyllava_edge.eval import BadRecordError

    try:
        results = run(args)
    except BadRecordError as err:
        return fail(err, hint="(--skip-bad skips such records and counts them)")
    except USER_ERRORS as err:
        return fail(err)
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
