"""`tinyllava-edge`: the main job on the built-in default, as far as the pipeline goes.

Today: shapes data -> shapes tokenizer -> the `tiny-shapes` model in the Factory checkpoint
layout -> reloaded from disk and asked about held-out test images. Training, export,
quantization and the demo join this command as they land (README.md says which exist).
Each stage is skipped when its output already exists, so a second run is quick.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import TinyLlavaError
from .common import USER_ERRORS, fail, human_size

DEFAULT_WORKDIR = Path("runs") / "tiny-shapes"


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
    return parser


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run(args: argparse.Namespace) -> dict:
    from ..data.shapes import write_dataset
    from ..data.shapes_tokenizer import train_shapes_tokenizer

    work: Path = args.workdir
    if work.exists() and not work.is_dir():
        raise TinyLlavaError(f"--workdir {work} is a file; expected a directory")
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"workdir": str(work), "stages": []}

    data_dir, tok_dir, model_dir = work / "data", work / "tokenizer", work / "model"
    stages = (
        ("shapes data", data_dir / "meta.json", "[1/4] shapes data: generating ...", "built",
         lambda: write_dataset(data_dir, seed=args.seed, overwrite=True)),
        ("tokenizer", tok_dir / "tokenizer.json", "[2/4] tokenizer: training byte-level BPE on the shapes text ...",
         "built", lambda: train_shapes_tokenizer(tok_dir, seed=args.seed)),
        ("model", model_dir / "config.json",
         "[3/4] model: building the tiny-shapes architecture (training arrives with the training stage; "
         "weights are random until then) ...", "built (untrained)",
         lambda: _build_model(tok_dir, model_dir, args.seed)),
    )
    for name, marker, message, built, build in stages:
        t = time.perf_counter()
        state = "kept"  # a stage whose output exists is not redone unless --force
        if args.force or not marker.is_file():
            print(message, flush=True)
            build()
            state = built
        summary["stages"].append((name, state, marker.parent, time.perf_counter() - t))

    t = time.perf_counter()
    print("[4/4] reload from disk and ask held-out test questions ...", flush=True)
    summary["answers"], summary["model_info"] = _ask(model_dir, data_dir, args.questions)
    summary["stages"].append(("reload + answer", "ran", model_dir, time.perf_counter() - t))
    return summary


def _build_model(tok_dir: Path, model_dir: Path, seed: int) -> None:
    import torch

    from ..model import TinyLlavaForConditionalGeneration, load_tokenizer
    from ..model.presets import get_preset

    tokenizer = load_tokenizer(tok_dir, model_type="llama", pad_token="<pad>")
    config = get_preset("tiny-shapes").config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = TinyLlavaForConditionalGeneration(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def _ask(model_dir: Path, data_dir: Path, n: int) -> tuple[list[dict], dict]:
    import json

    import torch

    from ..data.preprocess import PreprocessConfig, load_image, preprocess
    from ..data.template import default_template_for_family, get_template
    from ..model import TinyLlavaForConditionalGeneration, load_tokenizer

    model = TinyLlavaForConditionalGeneration.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    template = get_template(default_template_for_family(model.config.llm_family))
    size = model.config.vision_config.image_size
    pre = PreprocessConfig.for_tower(model.config.vision_config.model_type, size, model.config.image_aspect_ratio)
    records = json.loads((data_dir / "test.json").read_text(encoding="utf-8"))[:n]
    answers = []
    for rec in records:
        question = rec["conversations"][0]["value"]
        ids = template.encode([{"from": "human", "value": question}], tokenizer, mode="eval")["input_ids"]
        pixels = torch.from_numpy(preprocess(load_image(data_dir / rec["image"]), pre))
        out = model.generate(torch.tensor([ids]), images=pixels, max_new_tokens=8, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append({
            "question": question.replace("<image>\n", ""),
            "expected": rec["conversations"][1]["value"],
            "answer": tokenizer.decode(out[0], skip_special_tokens=True).strip(),
        })
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_tokens": model.encode_images(torch.zeros(1, 3, size, size)).shape[1],
        "layout": model.checkpoint_layout,
    }
    return answers, info


def print_summary(summary: dict) -> None:
    print("\ntinyllava-edge pipeline summary")
    for name, state, path, seconds in summary["stages"]:
        print(f"  {name:<16} {state:<18} {seconds:6.1f} s  {path}  ({human_size(_disk_bytes(Path(path)))})")
    info = summary["model_info"]
    print(f"  model: {info['parameters'] / 1e6:.2f} M parameters, {info['image_tokens']} image tokens, "
          f"{info['layout']} checkpoint layout")
    right = sum(a["answer"] == a["expected"] for a in summary["answers"])
    print(f"  test questions answered correctly: {right}/{len(summary['answers'])}")
    for a in summary["answers"]:
        print(f"    Q: {a['question']}  expected: {a['expected']!r}  got: {a['answer']!r}")
    print("  not built yet: training, export (ONNX/GGUF), quantization, runtime, demo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except USER_ERRORS as err:
        return fail(err)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
