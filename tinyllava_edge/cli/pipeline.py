"""`tinyllava-edge`: the main job on the built-in default, as far as the pipeline goes.

Today: the default `tiny-shapes` model trained from nothing (`train_preset`: shapes data,
tokenizer, both stages, evaluation on the held-out test split) -> exported to a 16-bit edge
bundle (`export_bundle`: vision ONNX + LLM GGUF + mmproj, checked against PyTorch) -> the bundle
loaded through the edge runtime (`tinyllava_edge.load`, no torch on that path) and asked about
held-out test images. Quantization and the demo join this command as they land (README.md says
which exist). A stage whose output exists is kept, so a second run is quick.

The model is trained here rather than shipped: about eight minutes on two cores, deterministic
with the seed, and it is the training path users run for their own variants.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tinyllava_edge.cli.common import USER_ERRORS, fail
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.sizes import human_size

DEFAULT_WORKDIR = Path("runs") / "tiny-shapes"
BUNDLE = "bundle"  # the 16-bit edge bundle, under the workdir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllava-edge",
        description="Run the tinyllava-edge pipeline on the built-in tiny-shapes default.",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where every stage writes its output (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights (default: 0)")
    parser.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    parser.add_argument("--questions", type=int, default=5, help="test questions to ask at the end (default: 5)")
    parser.add_argument("--no-demo", action="store_true",
                        help="end after the summary instead of serving the demo page")
    parser.add_argument("--port", type=int, default=7860, help="the demo's port on 127.0.0.1 (default: 7860)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: a few images and 2 steps per stage (the model stays untrained)")
    return parser


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


QUICK = {"dataset_overrides": {"n_train": 24, "n_val": 4, "n_test": 12}, "max_steps": 2, "batch_size": 4}


def run(args: argparse.Namespace) -> dict:
    from tinyllava_edge.train.preset_recipes import SUMMARY_FILE, train_preset

    work: Path = args.workdir
    if work.exists() and not work.is_dir():
        raise TinyLlavaError(f"--workdir {work} is a file; expected a directory")
    summary: dict = {"workdir": str(work), "stages": []}
    data_dir, model_dir = work / "data", work / "model"
    bundle_dir = work / BUNDLE
    stages = (
        ("train", work / SUMMARY_FILE,
         "[1/3] train the default tiny-shapes model from nothing (data, tokenizer, two stages, evaluation) ...",
         "trained", lambda: train_preset("tiny-shapes", work, seed=args.seed, overwrite=True,
                                         log=lambda line: print("  " + line, flush=True),
                                         **(QUICK if args.quick else {}))),
        ("export", bundle_dir / "manifest.json",
         "[2/3] export the model to a 16-bit edge bundle (vision ONNX + LLM GGUF + mmproj), checked against PyTorch ...",
         "exported", lambda: _export(model_dir, bundle_dir)),
    )
    for name, marker, message, built, build in stages:
        t = time.perf_counter()
        state = "kept"  # a stage whose output exists is not redone unless --force
        if args.force or not marker.is_file():
            print(message, flush=True)
            build()
            state = built
        summary["stages"].append((name, state, marker.parent, time.perf_counter() - t))
    summary["recipe"] = json.loads((work / SUMMARY_FILE).read_text(encoding="utf-8"))

    t = time.perf_counter()
    print("[3/3] load the bundle through the edge runtime and ask held-out test questions ...", flush=True)
    summary["answers"], summary["model_info"] = _ask(bundle_dir, data_dir, args.questions)
    summary["stages"].append(("runtime answers", "ran", bundle_dir, time.perf_counter() - t))
    return summary


def _export(model_dir: Path, bundle_dir: Path) -> None:
    from tinyllava_edge.export import export_bundle

    export_bundle(model_dir, bundle_dir, fmt="gguf", bits=16, overwrite=True, progress=False)


def _ask(bundle_dir: Path, data_dir: Path, n: int) -> tuple[list[dict], dict]:
    from tinyllava_edge import load
    from tinyllava_edge.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    vlm = load(bundle_dir, device="cpu")
    records = json.loads((data_dir / "test.json").read_text(encoding="utf-8"))[:n]
    answers = []
    for rec in records:
        question = rec["conversations"][0]["value"].replace("<image>\n", "")
        text, stats = vlm.generate(data_dir / rec["image"], question, max_new_tokens=8, return_stats=True)
        answers.append({"question": question, "expected": rec["conversations"][1]["value"], "answer": text.strip(),
                        "ttft_ms": stats.ttft_ms})
    model = manifest["model"]
    llm = next(f for f in manifest["files"] if f["role"] == "llm")
    info = {"image_tokens": model["image_tokens"], "llm": f"{llm['name']} ({human_size(llm['size'])})",
            "validation": manifest.get("validation", {})}
    return answers, info


def print_summary(summary: dict) -> None:
    print("\ntinyllava-edge pipeline summary")
    for name, state, path, seconds in summary["stages"]:
        print(f"  {name:<16} {state:<18} {seconds:6.1f} s  {path}  ({human_size(_disk_bytes(Path(path)))})")
    info = summary["model_info"]
    first = next(iter(summary["recipe"]["stages"].values()))
    print(f"  model: {first['parameters']['total'] / 1e6:.2f} M parameters, {info['image_tokens']} image tokens; "
          f"edge bundle LLM {info['llm']}")
    ev = summary["recipe"].get("eval")
    if ev:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in ev["per_kind"].items())
        print(f"  held-out test split ({ev['n']} questions): exact match {ev['exact_match']:.1f} % ({kinds})")
    print(f"  trained in {summary['recipe']['train_wall_seconds']:.0f} s wall time")
    right = sum(a["answer"] == a["expected"] for a in summary["answers"])
    print(f"  sample questions answered correctly: {right}/{len(summary['answers'])}")
    for a in summary["answers"]:
        print(f"    Q: {a['question']}  expected: {a['expected']!r}  got: {a['answer']!r}  "
              f"(TTFT {a['ttft_ms']:.0f} ms)")
    print("  not built yet in this command: quantization")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before torch loads OpenMP, as tinyllava-train does: spinning threads are many times slower
    # on a busy machine (cli/train.py has the figures).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        summary = run(args)
    except USER_ERRORS as err:
        return fail(err)
    print_summary(summary)
    if args.no_demo:
        return 0
    return _serve_demo(Path(summary["workdir"]), args.port)


def _serve_demo(work: Path, port: int) -> int:
    """The last step: the Gradio demo over the edge bundle and the checkpoint it came from."""
    from tinyllava_edge.apps.variants import discover
    from tinyllava_edge.cli.demo import build_parser as demo_parser
    from tinyllava_edge.cli.demo import serve

    try:
        variants = [*discover(work / BUNDLE), *discover(work / "model")]
    except USER_ERRORS as err:
        return fail(err)
    print("\n[demo] serving the demo page; the bundle and the torch checkpoint are its two variants", flush=True)
    return serve(variants, demo_parser().parse_args(["--port", str(port)]))


if __name__ == "__main__":
    sys.exit(main())
