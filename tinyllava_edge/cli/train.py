"""``tinyllava-train``: one training stage (pretrain | finetune) of one recipe (base | share | custom).

A thin layer over :func:`tinyllava_edge.train.train`; every default comes from
:class:`tinyllava_edge.train.TrainConfig`. Runs as is in one process, or under
``torchrun --nproc_per_node N`` (DDP; gloo on CPU), ``--fsdp`` or ``--deepspeed zero2|zero3|FILE``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from typing import Any

from tinyllava_edge.cli.common import USER_ERRORS, ArgumentParser, fail, set_training_openmp_wait
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.sizes import human_size

EXAMPLES = """\
examples:
  # the default model from nothing: shapes data and tokenizer generated, both stages, evaluation
  tinyllava-train --preset tiny-shapes --output runs/tiny-shapes-train
  # stage 1 from scratch: a fresh tiny-shapes model, every part trained on the captions
  tinyllava-train --preset tiny-shapes --tokenizer data/tokenizer --data data/pretrain.json \\
      --stage pretrain --recipe custom --tune-llm full --tune-vision full --tune-connector full \\
      --output runs/pretrain
  # stage 2 from stage 1's output, the paper's base recipe
  tinyllava-train --model runs/pretrain --data data/train.json --stage finetune --output runs/finetune
  # LoRA on the LLM, merged into a plain checkpoint at the end; two processes
  torchrun --nproc_per_node 2 -m tinyllava_edge.cli.train --model runs/pretrain --data data/train.json \\
      --recipe custom --tune-llm lora --tune-vision frozen --tune-connector full --merge-lora --output runs/lora
"""


def _defaults() -> dict[str, Any]:
    from tinyllava_edge.train.config import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def build_parser() -> argparse.ArgumentParser:
    from tinyllava_edge.data.template import TEMPLATES
    from tinyllava_edge.train.recipes import RECIPES, STAGES, TUNE_TYPE_KEYS

    d = _defaults()
    p = ArgumentParser(
        prog="tinyllava-train",
        description="Train one stage of a TinyLLaVA model on LLaVA-format data, as TinyLLaVA_Factory does "
                    "(recipes base | share | custom; tune types frozen | full | partial | lora | qlora). "
                    "Writes a Factory checkpoint, loss.png and train_summary.json to --output.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start = p.add_argument_group("what to start from (one of)")
    source = start.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="CKPT", help="checkpoint directory (e.g. the previous stage's --output)")
    source.add_argument("--preset", metavar="NAME", help="a fresh random-init model from a preset, e.g. tiny-shapes")
    start.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory for --preset")

    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="JSON",
                      help="LLaVA-format .json list or .jsonl (leave out, with --preset alone, to run the "
                           "preset's own recipe: generated data, every stage, evaluation)")
    data.add_argument("--image-folder", metavar="DIR", help="where the records' image paths start (default: the data file's folder)")
    data.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
    data.add_argument("--truncate", action="store_true",
                      help="cut samples over tokenizer_model_max_length (as the Factory does) instead of refusing them")
    data.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=d["group_by_length"],
                      help="Factory's length/modality-grouped batches (default: on for finetune, off for pretrain)")

    what = p.add_argument_group("what trains")
    what.add_argument("--stage", choices=STAGES.keys(), default=d["stage"], help="(default: %(default)s)")
    what.add_argument("--recipe", choices=RECIPES.keys(), default=d["recipe"],
                      help="base: pretrain the connector, finetune LLM + connector; share: pretrain also the LLM "
                           "and the vision layers from K on; custom: give every --tune-* (default: %(default)s)")
    what.add_argument("--template", choices=TEMPLATES.keys(), default=d["template"],
                      help="chat template (default: pretrain for the pretrain stage, else the LLM family's)")
    for part, flag, kinds in (("LLM", "--tune-llm", ("frozen", "full", "lora", "qlora")),
                              ("vision tower", "--tune-vision", TUNE_TYPE_KEYS),
                              ("connector", "--tune-connector", ("frozen", "full", "lora", "qlora"))):
        what.add_argument(flag, choices=kinds, help=f"the {part}'s tune type (custom recipe)")
    what.add_argument("--tune-vision-from-layer", type=int, metavar="K", default=d["tune_vision_from_layer"],
                      help="first trained encoder layer of a partial vision tower (default: half its layers)")
    what.add_argument("--lora-r", type=int, default=d["lora_r"], help="LoRA rank (default: %(default)s)")
    what.add_argument("--lora-alpha", type=int, default=d["lora_alpha"], help="LoRA alpha (default: %(default)s)")
    what.add_argument("--lora-dropout", type=float, default=d["lora_dropout"], help="(default: %(default)s)")
    what.add_argument("--merge-lora", action="store_true",
                      help="merge LoRA into a plain checkpoint (default: base checkpoint + adapter files)")

    opt = p.add_argument_group("optimisation (AdamW, cosine schedule with warmup)")
    opt.add_argument("--epochs", type=float, default=d["epochs"], help="(default: %(default)s)")
    opt.add_argument("--max-steps", type=int, default=d["max_steps"], help="optimizer steps; overrides --epochs")
    opt.add_argument("--lr", type=float, default=d["lr"], help="learning rate (default: pretrain 1e-3, finetune 2e-5)")
    opt.add_argument("--connector-lr", type=float, default=d["connector_lr"],
                     help="the connector's own learning rate (Factory's mm_projector_lr; default: --lr)")
    opt.add_argument("--vision-tower-lr", type=float, default=d["vision_tower_lr"],
                     help="the vision tower's own learning rate (default: --lr)")
    opt.add_argument("--batch-size", type=int, default=d["batch_size"], help="per device (default: %(default)s)")
    opt.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="(default: %(default)s)")
    opt.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"], help="(default: %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="(default: %(default)s)")
    opt.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"], help="(default: %(default)s)")
    opt.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")

    run = p.add_argument_group("running")
    run.add_argument("--output", required=True, metavar="DIR", help="where the checkpoint and reports go")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N in --output")
    run.add_argument("--overwrite", action="store_true", help="start again in a non-empty --output")
    run.add_argument("--save-steps", type=int, default=d["save_steps"], help="checkpoint every N steps (default: %(default)s)")
    run.add_argument("--save-total-limit", type=int, default=d["save_total_limit"], help="(default: %(default)s)")
    run.add_argument("--logging-steps", type=int, default=d["logging_steps"], help="(default: %(default)s)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=d["precision"],
                     help="auto: bf16 mixed precision on a bf16 GPU or a CPU with native bf16 "
                          "(AVX512-BF16, AMX), else fp32 (default: %(default)s)")
    run.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    run.add_argument("--deepspeed", metavar="CONFIG", help="zero2, zero3 (shipped) or a DeepSpeed JSON file")
    run.add_argument("--fsdp", action="store_true", help="PyTorch FSDP (shipped configs/fsdp.json unless --fsdp-config)")
    run.add_argument("--fsdp-config", metavar="JSON", help="FSDP config file for --fsdp")
    run.add_argument("--num-workers", type=int, default=d["num_workers"], help="data loader workers (default: %(default)s)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace):
    from tinyllava_edge.train.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


# Options that say what a preset recipe starts from and writes; every other option given on the
# command line applies to each of its stages.
_RECIPE_OWN = frozenset({"model", "preset", "tokenizer", "data", "image_folder", "output", "stage", "seed",
                         "overwrite", "quiet"})


def run_preset_recipe(args: argparse.Namespace) -> dict:
    from tinyllava_edge.train.preset_recipes import train_preset

    defaults = build_parser().parse_args(["--preset", args.preset, "--output", args.output])
    overrides = {k: v for k, v in vars(args).items()
                 if k not in _RECIPE_OWN and k in _defaults() and v != getattr(defaults, k)}
    if args.stage != defaults.stage:
        raise TinyLlavaError(f"--stage does not apply to preset {args.preset!r}'s recipe, which runs every stage")
    return train_preset(args.preset, args.output, seed=args.seed, overwrite=args.overwrite, quiet=args.quiet,
                        **overrides)


def print_recipe_summary(summary: dict) -> None:
    from tinyllava_edge.train.preset_recipes import reference_verdict

    print(f"\ntrained preset {summary['preset']!r} (seed {summary['seed']}) in {summary['train_wall_seconds']:.0f} s "
          f"wall time on {summary['threads']} thread(s); model: {summary['model']}")
    for step in summary["steps"]:
        print(f"  {step['step']:<10} {step['seconds']:8.1f} s")
    first = next(iter(summary["stages"].values()))
    print(f"  parameters: {first['parameters']['total']:,}")
    if "eval" in summary:
        ev = summary["eval"]
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in ev["per_kind"].items())
        print(f"  {ev['split']} split, {ev['n']} questions: exact match {ev['exact_match']:.1f} % ({kinds})")
        verdict = reference_verdict(summary)
        if verdict:
            print(f"  {verdict}")


def print_summary(summary: dict) -> None:
    tune = summary["tune_types"]
    parts = f"llm {tune['llm']}, vision {tune['vision_tower']}" + (
        f" from layer {tune['vision_from_layer']}" if tune["vision_from_layer"] is not None else "") + \
        f", connector {tune['connector']}"
    params = summary["parameters"]
    print(f"trained {summary['stage']} / {summary['recipe']} ({parts}) on {summary['device']} "
          f"({summary['precision']}, {summary['world_size']} process(es))")
    loss = summary["final_loss"]
    print(f"  {summary['steps_this_run']} steps in {summary['train_seconds']:.1f} s "
          f"({summary['steps_per_second']} steps/s, {summary['samples_per_second']} samples/s), "
          f"final loss {loss:.4f}" if loss is not None else "  no loss logged")
    print(f"  trainable {params['trainable']:,} of {params['total']:,} parameters "
          f"({100 * params['trainable_fraction']:.2f} %)")
    data = summary["data"]
    print(f"  data: {data['kept']} of {data['records']} records used ({data['text_only']} text-only, "
          f"{data['truncated']} truncated, {data['skipped_total']} skipped{': ' if data['skipped'] else ''}"
          + ", ".join(f"{k} {n}" for k, n in data["skipped"].items()) + ")")
    print(f"  wrote {summary['output']}: " + ", ".join(f"{k} {human_size(n)}" for k, n in summary["files"].items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before torch loads OpenMP: a short spin at barriers, which keeps most of spinning's speed
    # on an idle machine without its cost on a busy one (cli/common.py has the figures).
    set_training_openmp_wait()
    try:
        if args.preset is not None and args.data is None and args.tokenizer is None:
            print_recipe_summary(run_preset_recipe(args))
            return 0
        from tinyllava_edge.train import train

        result = train(config_from_args(args))
    except USER_ERRORS as err:
        return fail(err)
    if result.summary:
        print_summary(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
