"""``tinyllava-data``: write the synthetic shapes VQA dataset (and optionally its tokenizer).

A thin layer over :func:`tinyllava_edge.data.shapes.write_dataset` and
:func:`tinyllava_edge.data.shapes_tokenizer.train_shapes_tokenizer`; defaults come from
:class:`~tinyllava_edge.data.shapes.ShapesConfig` and the tokenizer module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyllava_edge.cli.common import USER_ERRORS, ArgumentParser, fail
from tinyllava_edge.sizes import human_size

TOKENIZER_SUBDIR = "tokenizer"


def build_parser() -> argparse.ArgumentParser:
    # Defaults come from the generator's config (numpy + PIL, no torch): one place for them.
    from tinyllava_edge.data.shapes import ShapesConfig
    from tinyllava_edge.data.shapes_tokenizer import DEFAULT_VOCAB_SIZE

    parser = ArgumentParser(
        prog="tinyllava-data",
        description=(
            "Write the synthetic shapes VQA dataset: images/*.png, train/val/test.json "
            "(LLaVA format, one question each), pretrain.json (captions) and meta.json."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    parser.add_argument(
        "--seed", type=int, default=ShapesConfig.seed, help="random seed (%(default)s)"
    )
    parser.add_argument(
        "--train", type=int, default=ShapesConfig.n_train, help="train images (%(default)s)"
    )
    parser.add_argument(
        "--val", type=int, default=ShapesConfig.n_val, help="val images (%(default)s)"
    )
    parser.add_argument(
        "--test", type=int, default=ShapesConfig.n_test, help="test images (%(default)s)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=ShapesConfig.image_size,
        help="image side in pixels, 32-1024 (%(default)s)",
    )
    parser.add_argument(
        "--max-objects",
        type=int,
        default=ShapesConfig.max_objects,
        help="most objects in one image, 1-9 (%(default)s)",
    )
    parser.add_argument(
        "--tokenizer",
        action="store_true",
        help=f"also train a byte-level BPE tokenizer into OUT/{TOKENIZER_SUBDIR}/",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="tokenizer vocabulary size (%(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it already holds a shapes dataset",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from tinyllava_edge.data.shapes import write_dataset
    from tinyllava_edge.data.shapes_tokenizer import check_vocab_size

    if args.tokenizer:
        check_vocab_size(args.vocab_size)  # before the images, not after
    total = args.train + args.val + args.test
    # delay: a run that fails at once (bad OUT, bad sizes) leaves only its one-line error
    bar = tqdm(total=max(total, 0), unit="img", desc="shapes", disable=args.quiet, delay=0.5)
    with bar:
        summary = write_dataset(
            args.out,
            seed=args.seed,
            n_train=args.train,
            n_val=args.val,
            n_test=args.test,
            image_size=args.image_size,
            max_objects=args.max_objects,
            overwrite=args.overwrite,
            progress=bar.update,
        )
    if args.tokenizer:
        from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer

        summary["tokenizer"] = str(
            train_shapes_tokenizer(args.out / TOKENIZER_SUBDIR, args.vocab_size, seed=args.seed)
        )
    return summary


def print_summary(summary: dict) -> None:
    counts = summary["counts"]
    print(f"shapes dataset written to {summary['out_dir']}")
    for split in ("train", "val", "test"):
        c = counts[split]
        kinds = ", ".join(f"{k} {n}" for k, n in c["by_kind"].items())
        held = c["images_with_held_out"] / c["images"] if c["images"] else 0.0
        print(
            f"  {split:5s} {c['images']:6d} images {c['records']:7d} records "
            f"({kinds}); {held:.0%} of images hold a held-out pair"
        )
    print(f"  pretrain {counts['pretrain']['records']} captions")
    pairs = ", ".join(f"{c} {s}" for c, s in summary["held_out_pairs"])
    print(f"  held out of train: {pairs}")
    files = ", ".join(f"{name} {human_size(n)}" for name, n in summary["files"].items())
    print(f"  files: images/ {human_size(summary['image_bytes'])}, {files}")
    if "tokenizer" in summary:
        print(f"  tokenizer: {summary['tokenizer']}")


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
