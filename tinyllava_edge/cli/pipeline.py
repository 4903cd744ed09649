"""`tinyllava-edge`: the main job on the built-in default, from nothing to the demo page.

1. the default `tiny-shapes` model trained from nothing (`train_preset`: shapes data, tokenizer,
   both stages, evaluation on the held-out test split);
2. exported to the 16-bit edge bundle (`export_bundle`: vision ONNX + LLM GGUF + mmproj, checked
   against PyTorch);
3. that bundle quantized to 4 bits (`quantize_to_bits`: the preset `tinyllava-export --bits 4`
   writes, checked against the 16-bit bundle);
4. both bundles loaded through the edge runtime (`tinyllava_edge.load`, no torch on that path)
   and asked the same held-out test questions: size, accuracy and speed side by side;
5. the demo page, with both bundles and the checkpoint as its variants.

A stage whose output exists is kept (a second run is quick), unless an earlier stage was redone
or the model there was trained by an earlier recipe (its recipe_summary.json records the data
generator's version and the stages' options). The model is trained here rather than shipped:
about nine and a half minutes on two cores, deterministic
with the seed, and it is the training path users run for their own variants.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from tinyllava_edge.bundle import MANIFEST_NAME
from tinyllava_edge.cli.common import USER_ERRORS, ArgumentParser, fail, set_training_openmp_wait
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.sizes import human_size

DEFAULT_WORKDIR = Path("runs") / "tiny-shapes"
BUNDLE = "bundle"  # the 16-bit edge bundle, under the workdir
QUANT_BITS = 4
BUNDLE_QUANT = f"bundle-{QUANT_BITS}bit"  # the same bundle quantized: what `tinyllava-export --bits 4` writes
SAMPLES_SHOWN = 5
MAX_NEW_TOKENS = 8  # the shapes benchmark's answer length


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="tinyllava-edge",
        description="Run the tinyllava-edge pipeline on the built-in tiny-shapes default: train, export the 16-bit "
                    f"bundle, quantize it to {QUANT_BITS} bits, compare both on held-out questions, serve the demo.",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where every stage writes its output (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights (default: 0)")
    parser.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    parser.add_argument("--questions", type=int,
                        help="held-out test questions both bundles answer (default: the whole test split)")
    parser.add_argument("--no-demo", action="store_true",
                        help="end after the summary instead of serving the demo page")
    parser.add_argument("--port", type=int, default=7860, help="the demo's port on 127.0.0.1 (default: 7860)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: a few images and 2 steps per stage (the model stays untrained)")
    return parser


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _trained_by_an_earlier_recipe(summary_file: Path) -> bool:
    from tinyllava_edge.train.preset_recipes import is_current_run

    if not summary_file.is_file():
        return False
    try:
        return not is_current_run(json.loads(summary_file.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return True  # unreadable: train again rather than trust it


QUICK = {"dataset_overrides": {"n_train": 24, "n_val": 4, "n_test": 12}, "max_steps": 2, "batch_size": 4}


def run(args: argparse.Namespace) -> dict:
    from tinyllava_edge.train.preset_recipes import SUMMARY_FILE, train_preset

    work: Path = args.workdir
    if work.exists() and not work.is_dir():
        raise TinyLlavaError(f"--workdir {work} is a file; expected a directory")
    if args.questions is not None and args.questions < 1:
        raise TinyLlavaError(f"--questions must be at least 1, got {args.questions}")
    summary: dict = {"workdir": str(work), "stages": []}
    data_dir, model_dir = work / "data", work / "model"
    bundle_dir, quant_dir = work / BUNDLE, work / BUNDLE_QUANT
    stages = (
        ("train", work / SUMMARY_FILE,
         "[1/4] train the default tiny-shapes model from nothing (data, tokenizer, two stages, evaluation) ...",
         "trained", lambda: train_preset("tiny-shapes", work, seed=args.seed, overwrite=True,
                                         log=lambda line: print("  " + line, flush=True),
                                         **(QUICK if args.quick else {}))),
        ("export", bundle_dir / MANIFEST_NAME,
         "[2/4] export the model to a 16-bit edge bundle (vision ONNX + LLM GGUF + mmproj), checked against "
         "PyTorch ...",
         "exported", lambda: _export(model_dir, bundle_dir)),
        ("quantize", quant_dir / MANIFEST_NAME,
         f"[3/4] quantize the 16-bit bundle to {QUANT_BITS} bits (what tinyllava-export --bits {QUANT_BITS} writes), "
         "checked against it ...",
         "quantized", lambda: _quantize(bundle_dir, quant_dir)),
    )
    redo = args.force
    if not redo and _trained_by_an_earlier_recipe(work / SUMMARY_FILE):
        print(f"{work / SUMMARY_FILE}: trained by an earlier recipe of the default model (another data generator "
              "or other stage options); training it again", flush=True)
        redo = True
    for name, marker, message, built, build in stages:
        t = time.perf_counter()
        state = "kept"  # a stage whose output exists is not redone unless --force or an earlier stage was
        if redo or not marker.is_file():
            print(message, flush=True)
            build()
            state, redo = built, True
        summary["stages"].append((name, state, marker.parent, time.perf_counter() - t))
    summary["recipe"] = json.loads((work / SUMMARY_FILE).read_text(encoding="utf-8"))

    t = time.perf_counter()
    summary["questions"] = questions = _questions(data_dir, args.questions)
    print(f"[4/4] load both bundles through the edge runtime and ask the same {len(questions)} held-out test "
          "questions ...", flush=True)
    summary["runs"] = {name: _ask(path, questions) for name, path in (("16-bit", bundle_dir),
                                                                       (f"{QUANT_BITS}-bit", quant_dir))}
    summary["stages"].append(("runtime answers", "ran", None, time.perf_counter() - t))
    return summary


def _export(model_dir: Path, bundle_dir: Path) -> None:
    from tinyllava_edge.export import export_bundle

    export_bundle(model_dir, bundle_dir, fmt="gguf", bits=16, overwrite=True, progress=False)


def _quantize(bundle_dir: Path, quant_dir: Path) -> None:
    from tinyllava_edge.quant.bundle import quantize_to_bits

    quantize_to_bits(bundle_dir, quant_dir, QUANT_BITS, overwrite=True, progress=False)


def _questions(data_dir: Path, n: int | None) -> list[dict]:
    """The first `n` records (all: None) of the held-out test split: (image, question, expected answer)."""
    records = json.loads((data_dir / "test.json").read_text(encoding="utf-8"))[:n]
    return [{"image": data_dir / r["image"], "question": r["conversations"][0]["value"].replace("<image>\n", ""),
             "expected": r["conversations"][1]["value"]} for r in records]


def _ask(bundle_dir: Path, questions: list[dict]) -> dict:
    """One bundle through the edge runtime: its answers, accuracy, speed and the sizes of what it runs."""
    from tinyllava_edge import load
    from tinyllava_edge.bundle import files_by_role, read_manifest
    from tinyllava_edge.eval.metrics import exact_match_text

    manifest = read_manifest(bundle_dir)
    started = time.perf_counter()
    vlm = load(bundle_dir, device="cpu")
    load_ms = (time.perf_counter() - started) * 1e3
    answers, stats = [], []
    try:
        for q in questions:
            text, s = vlm.generate(q["image"], q["question"], max_new_tokens=MAX_NEW_TOKENS, return_stats=True)
            answers.append(text.strip())
            stats.append(s)
        threads = vlm.info().get("n_threads")
    finally:
        vlm.close()
    llm = files_by_role(manifest, "llm")[0]
    vision = next(f for f in files_by_role(manifest, "vision") if f["quant"] == manifest.get("vision_default", "fp32"))
    right = sum(exact_match_text(a) == exact_match_text(q["expected"]) for a, q in zip(answers, questions))
    decode_tokens = sum(max(0, s.decode_tokens - 1) for s in stats)
    decode_ms = sum(s.decode_ms for s in stats)
    return {
        "path": str(bundle_dir), "llm": llm["name"], "vision": vision["name"], "answers": answers,
        "runs_bytes": llm["size"] + vision["size"], "disk_bytes": _disk_bytes(bundle_dir),
        "correct": right, "exact_match": 100.0 * right / len(questions), "load_ms": load_ms,
        # a question about an image asked before skips its encoding and most of the prefill
        "ttft_new_ms": _median([s.ttft_ms for s in stats if not s.image_cache_hits]),
        "ttft_seen_ms": _median([s.ttft_ms for s in stats if s.image_cache_hits]),
        "answer_ms": statistics.median(s.total_ms for s in stats),
        "decode_tokens_per_s": decode_tokens / (decode_ms / 1e3) if decode_ms > 0 else None,
        "threads": threads,
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def comparison_lines(runs: dict[str, dict], questions: list[dict]) -> list[str]:
    """The bundles side by side: what runs and its size, accuracy, agreement and speed."""
    names = list(runs)
    first = runs[names[0]]

    def row(label: str, cells: list[str]) -> str:
        return (f"    {label:<24}" + "".join(f"{c:<36}" for c in cells)).rstrip()

    def each(fn) -> list[str]:
        return [fn(runs[n]) for n in names]

    n = len(questions)
    lines = [row("", names),
             row("LLM + vision graph", each(lambda r: f"{r['llm']} + {r['vision']}")),
             row("size they take", each(lambda r: human_size(r["runs_bytes"]))),
             row("bundle on disk", each(lambda r: human_size(r["disk_bytes"]))),
             row("exact match", each(lambda r: f"{r['exact_match']:.1f} % ({r['correct']}/{n})")),
             row(f"same answer as {names[0]}",
                 each(lambda r: f"{sum(a == b for a, b in zip(r['answers'], first['answers']))}/{n}")),
             row("first token, new image", each(lambda r: _ms(r["ttft_new_ms"]))),
             row("first token, same image", each(lambda r: _ms(r["ttft_seen_ms"]))),
             row("whole answer", each(lambda r: _ms(r["answer_ms"])))]
    if any(r["decode_tokens_per_s"] for r in runs.values()):  # one-token answers have no decode phase
        lines.append(row("decode", each(lambda r: f"{r['decode_tokens_per_s']:.0f} tok/s"
                                        if r["decode_tokens_per_s"] else "-")))
    lines.append(row("load", each(lambda r: f"{r['load_ms']:.0f} ms")))
    lines.append(f"  {min(SAMPLES_SHOWN, n)} of the questions:")
    for i, q in enumerate(questions[:SAMPLES_SHOWN]):
        got = ", ".join(f"{name} {runs[name]['answers'][i]!r}" for name in names)
        lines.append(f"    Q: {q['question']}  expected {q['expected']!r}; {got}")
    return lines


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms (median)" if value is not None else "-"


def print_summary(summary: dict) -> None:
    from tinyllava_edge.train.preset_recipes import reference_verdict

    print("\ntinyllava-edge pipeline summary")
    for name, state, path, seconds in summary["stages"]:
        where = f"  {path}  ({human_size(_disk_bytes(Path(path)))})" if path is not None else ""
        print(f"  {name:<16} {state:<18} {seconds:6.1f} s{where}")
    runs = summary["runs"]
    first = next(iter(summary["recipe"]["stages"].values()))
    print(f"  model: {first['parameters']['total'] / 1e6:.2f} M parameters, trained in "
          f"{summary['recipe']['train_wall_seconds']:.0f} s wall time")
    ev = summary["recipe"].get("eval")
    if ev:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in ev["per_kind"].items())
        print(f"  checkpoint (PyTorch) on the held-out test split ({ev['n']} questions): exact match "
              f"{ev['exact_match']:.1f} % ({kinds})")
        verdict = reference_verdict(summary["recipe"])
        if verdict:
            print(f"  {verdict}")
    questions = summary["questions"]
    threads = next(iter(runs.values()))["threads"]
    print(f"  the bundles on the same {len(questions)} held-out test questions, edge runtime on the CPU"
          f"{f' ({threads} threads)' if threads else ''}, image cache on:")
    print("\n".join(comparison_lines(runs, questions)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before torch loads OpenMP: a short spin at barriers, which keeps most of spinning's speed
    # on an idle machine without its cost on a busy one (cli/common.py has the figures).
    set_training_openmp_wait()
    try:
        summary = run(args)
    except USER_ERRORS as err:
        return fail(err)
    print_summary(summary)
    if args.no_demo:
        print(f"\n  next: tinyllava-demo --model {summary['workdir']}  (the demo page, every bundle and checkpoint "
              "in it as a variant)")
        print(server_hint(Path(summary["workdir"])))
        return 0
    return _serve_demo(Path(summary["workdir"]), args.port)


def server_hint(work: Path) -> str:
    """How to serve the bundle to OpenAI clients: printed next to the demo's URL."""
    from tinyllava_edge.apps.serve.settings import DEFAULT_HOST, DEFAULT_PORT

    return (f"  next: tinyllava-serve --model {work / BUNDLE}  (OpenAI's Chat Completions API on "
            f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/v1 for any OpenAI client; docs/serve.md)")


def _serve_demo(work: Path, port: int) -> int:
    """The last step: the Gradio demo over both bundles and the checkpoint they came from."""
    from tinyllava_edge.apps.variants import discover
    from tinyllava_edge.cli.demo import build_parser as demo_parser
    from tinyllava_edge.cli.demo import serve

    try:
        variants = [*discover(work / BUNDLE), *discover(work / BUNDLE_QUANT), *discover(work / "model")]
    except USER_ERRORS as err:
        return fail(err)
    print(f"\n[demo] serving the demo page; the 16-bit bundle, the {QUANT_BITS}-bit bundle and the torch checkpoint "
          "are its variants", flush=True)
    print(server_hint(work), flush=True)
    return serve(variants, demo_parser().parse_args(["--port", str(port)]))


if __name__ == "__main__":
    sys.exit(main())
