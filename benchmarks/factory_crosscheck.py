"""Cross-check with TinyLLaVA_Factory's own model code, both ways, every LLM family x vision tower.

    .venv/bin/python benchmarks/factory_crosscheck.py --factory PATH_TO_FACTORY_CHECKOUT \
        [--work /tmp/crosscheck] [--cases llama-siglip,tiny-shapes] [--json out.json]

The Factory is not on PyPI and is never copied into this repository: PATH is a checkout of its
public repository. Its side runs in .venv-tf440 (transformers 4.40.1, its pinned version;
`bash scripts/setup-tf440.sh`), as a subprocess of this script; ours in the environment that runs
this script. Cases: tinyllava_edge/testing/interop.py (15 family x tower miniatures and the
default model), on the same fixed inputs (tokens with the image placeholder, one image).

1. ours: each case is written by our `save_pretrained`, with our logits. The Factory resolves
   `llm_model_name_or_path`, `tokenizer_name_or_path` and `vision_model_name_or_path` through the
   hub before it reads a checkpoint (AutoConfig for the part's class, the tokenizer, the image
   processor); offline, a directory per name stands in for the hub, with the part's config in
   the 4.x form a hub repository has (flat RoPE keys, no `rope_parameters`), a tokenizer of the
   family's kind and the tower's image-processor settings.
2. Factory: its `TinyLlavaForConditionalGeneration.from_pretrained` loads each of our checkpoints
   (its loading report must be empty) and computes logits -> compared with ours. Then a Factory
   model is configured the way its training script does it (`TinyLlavaConfig().load_from_config`
   with the case's part names and feature selection: the part configs come from the hub
   directories), given random weights, and saved the way its training recipe saves a finetuned
   model (`BaseTrainingRecipe.save`: tokenizer, config, `Trainer.save_model`), with its logits.
3. ours: our `from_pretrained` loads each checkpoint the Factory wrote -> logits compared with the
   Factory's.

Two things stand in for what the Factory's imports need but this check never runs: DeepSpeed (its
train_utils imports `deepspeed.zero` to gather ZeRO-3 shards; an empty module is registered when
it is not installed) and its LLaVATrainer (importing `tinyllava.train` pulls in its data templates,
whose dataclasses Python 3.11 rejects; LLaVATrainer changes only sampling and the optimizer, so
the stock 4.40 `Trainer` it subclasses does the saving).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinyllava_edge.testing.interop import CASES, reference_path  # noqa: E402  (light: names only)

TOL = 1e-5
TF440_PYTHON = ROOT / ".venv-tf440" / "bin" / "python"
WEIGHT_STD, BIAS_STD = 0.08, 0.02  # as tinyllava_edge.testing.checkpoints.random_model: logits far from 0


# -- 1 and 3: our side ----------------------------------------------------------------------------

def stage_hub(case_dir: Path, hub: Path) -> None:
    """Local directories named as the checkpoint's part names, standing in for the hub."""
    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer
    from tinyllava_edge.model import load_tokenizer, save_tokenizer
    from tinyllava_edge.testing.checkpoints import TOKENIZER_OF_FAMILY
    from tinyllava_edge.testing.interop import DEFAULT_CASE
    from tinyllava_edge.testing.tokenizers import build_tokenizer

    raw = json.loads((case_dir / "config.json").read_text())
    llm, vision = hub / raw["llm_model_name_or_path"], hub / raw["vision_model_name_or_path"]
    tokenizer = hub / raw["tokenizer_name_or_path"]
    if case_dir.name == DEFAULT_CASE:
        # the files a trained default model holds: the shapes tokenizer as tinyllava-train saves it
        train_shapes_tokenizer(hub / ".shapes-tokenizer")
        save_tokenizer(load_tokenizer(hub / ".shapes-tokenizer", model_type="llama"), tokenizer)
    else:
        build_tokenizer(TOKENIZER_OF_FAMILY[raw["text_config"]["model_type"]], tokenizer)
    llm.mkdir(parents=True, exist_ok=True)
    (llm / "config.json").write_text(json.dumps(_as_4x(raw["text_config"]), indent=2))
    vision.mkdir(parents=True, exist_ok=True)
    tower = raw["vision_config"]
    (vision / "config.json").write_text(json.dumps(_as_4x(tower), indent=2))
    pre = PreprocessConfig.for_tower(tower["model_type"], tower["image_size"])
    processor = {"siglip_vision_model": "SiglipImageProcessor", "clip_vision_model": "CLIPImageProcessor",
                 "dinov2": "BitImageProcessor"}[tower["model_type"]]
    size = tower["image_size"]
    settings = {"image_processor_type": processor, "image_mean": list(pre.image_mean), "image_std": list(pre.image_std),
                "do_resize": True, "do_rescale": True, "do_normalize": True, "resample": pre.resample}
    if pre.resize_mode == "shortest_edge_crop":
        settings.update(size={"shortest_edge": size}, do_center_crop=True, crop_size={"height": size, "width": size})
    else:
        settings.update(size={"height": size, "width": size})
    (vision / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))


def _as_4x(config: dict) -> dict:
    """A part config as a 4.x-era hub repository holds it: the 4.x keys only."""
    return {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}


def write_ours(work: Path, cases: list[str]) -> None:
    from tinyllava_edge.testing.interop import write_cases

    write_cases(work / "ours", tuple(cases))
    for case in cases:
        stage_hub(work / "ours" / case, work / "hub" / case)


def read_factorys(work: Path, cases: list[str]) -> dict[str, dict]:
    """Our reader on each checkpoint the Factory wrote: logits against the Factory's."""
    import torch
    from safetensors.torch import load_file

    from tinyllava_edge.model import TinyLlavaForConditionalGeneration
    from tinyllava_edge.model.checkpoint import read_checkpoint

    results = {}
    for case in cases:
        saved = work / "factory" / f"finetune-{case}"
        ref = load_file(str(reference_path(work / "ours", case)))
        theirs = load_file(str(work / "factory" / f"{case}.logits.safetensors"))["mm_logits"]
        model = TinyLlavaForConditionalGeneration.from_pretrained(saved).eval()
        with torch.no_grad():
            logits = model(input_ids=ref["mm_input_ids"], images=ref["pixel_values"]).logits
        results[case] = {"layout": read_checkpoint(saved).layout,
                         "max_abs_diff": (logits - theirs).abs().max().item(),
                         "max_abs_logit": theirs.abs().max().item()}
    return results


# -- 2: the Factory's side (.venv-tf440) ----------------------------------------------------------------

def _import_factory(factory: Path):
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("deepspeed") is None:
        # Imported by the Factory's train_utils for ZeRO-3 gathering only, never reached here;
        # the specs make transformers see it as absent rather than broken.
        def stand_in(name: str, **attrs) -> None:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            module.__dict__.update(attrs)
            sys.modules[name] = module

        stand_in("deepspeed", zero=types.SimpleNamespace())
        for name in ("deepspeed.runtime", "deepspeed.runtime.zero"):
            stand_in(name)
        stand_in("deepspeed.runtime.zero.partition_parameters", ZeroParamStatus=object)
    sys.path.insert(0, str(factory))
    import tinyllava.model as factory_model
    from tinyllava.training_recipe.base import BaseTrainingRecipe
    from tinyllava.utils import arguments

    return factory_model, BaseTrainingRecipe, arguments


def _randomise(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * WEIGHT_STD)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * BIAS_STD)


def factory_side(factory: Path, work: Path, cases: list[str]) -> dict[str, dict]:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Trainer

    factory_model, BaseTrainingRecipe, arguments = _import_factory(factory)
    Model, Config = factory_model.TinyLlavaForConditionalGeneration, factory_model.TinyLlavaConfig
    results = {}
    for case in cases:
        ours, out = work / "ours" / case, work / "factory" / f"finetune-{case}"
        ref = load_file(str(reference_path(work / "ours", case)))
        os.chdir(work / "hub" / case)  # the part names resolve here (relative paths), as on the hub
        model, report = Model.from_pretrained(str(ours), output_loading_info=True)
        with torch.no_grad():
            logits = model.eval()(input_ids=ref["mm_input_ids"], images=ref["pixel_values"]).logits
        row = {"factory_classes": [type(model.language_model).__name__, type(model.vision_tower).__name__,
                                   type(model.connector).__name__],
               "loading_report": {k: v for k, v in report.items() if v},
               "max_abs_diff": (logits - ref["mm_logits"]).abs().max().item(),
               "max_abs_logit": ref["mm_logits"].abs().max().item()}

        raw = json.loads((ours / "config.json").read_text())
        config = Config()
        config.load_from_config(arguments.ModelArguments(
            model_name_or_path=raw["llm_model_name_or_path"], tokenizer_name_or_path=raw["tokenizer_name_or_path"],
            vision_tower=raw["vision_model_name_or_path"], connector_type=raw["connector_type"],
            mm_vision_select_layer=raw["vision_feature_layer"],
            mm_vision_select_feature=raw["vision_feature_select_strategy"],
            model_max_length=raw["tokenizer_model_max_length"]))
        built = Model(config).eval()
        _randomise(built, seed=1)
        with torch.no_grad():
            theirs = built(input_ids=ref["mm_input_ids"], images=ref["pixel_values"]).logits
        save_file({"mm_logits": theirs.contiguous()}, str(work / "factory" / f"{case}.logits.safetensors"))
        # The finetune branch of the recipe's save: tokenizer, config, then Trainer.save_model
        args = arguments.TrainingArguments(output_dir=str(out), pretrained_model_path=str(ours), report_to=[],
                                           use_cpu=True)
        BaseTrainingRecipe(args).save(built, Trainer(model=built, tokenizer=built.tokenizer, args=args))
        results[case] = row
    return results


# -- orchestration --------------------------------------------------------------------------------

def run(factory: Path, work: Path, cases: list[str]) -> dict:
    import torch

    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    started = time.perf_counter()
    write_ours(work, cases)
    (work / "factory").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([str(TF440_PYTHON), __file__, "--phase", "factory", "--factory", str(factory), "--work", str(work),
                    "--cases", ",".join(cases)], check=True, env=env)
    factory_run = json.loads((work / "factory" / "results.json").read_text())
    to_factory = factory_run["cases"]
    from_factory = read_factorys(work, cases)
    import transformers

    return {
        "tolerance": TOL,
        "factory_commit": _factory_commit(factory),
        "transformers": {"ours": transformers.__version__, "factory": factory_run["transformers"]},
        "torch": torch.__version__, "python": platform.python_version(),
        "seconds": round(time.perf_counter() - started, 1),
        "cases": {c: {"ours_in_factory": to_factory[c], "factorys_in_ours": from_factory[c]} for c in cases},
    }


def _factory_commit(factory: Path) -> str | None:
    found = subprocess.run(["git", "-C", str(factory), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or None if found.returncode == 0 else None


def table(result: dict) -> str:
    lines = ["| case | Factory's classes | ours -> Factory: max abs diff | Factory -> ours: max abs diff |",
             "|---|---|---|---|"]
    for case, row in result["cases"].items():
        there, back = row["ours_in_factory"], row["factorys_in_ours"]
        report = "" if not there["loading_report"] else f" (report: {there['loading_report']})"
        lines.append(f"| {case} | {', '.join(there['factory_classes'])} | {there['max_abs_diff']:.1e}{report} "
                     f"| {back['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def passed(result: dict) -> bool:
    return all(r["ours_in_factory"]["max_abs_diff"] <= TOL and not r["ours_in_factory"]["loading_report"]
               and r["factorys_in_ours"]["max_abs_diff"] <= TOL for r in result["cases"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factory", type=Path, required=True, help="a checkout of TinyLLaVA_Factory's repository")
    parser.add_argument("--work", type=Path, default=Path("/tmp/factory-crosscheck"), help="scratch directory")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--phase", choices=("all", "factory"), default="all", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := sorted(set(cases) - set(CASES)):
        parser.error(f"unknown cases {', '.join(unknown)}; known: {', '.join(CASES)}")
    if not (args.factory / "tinyllava" / "model" / "modeling_tinyllava.py").is_file():
        parser.error(f"{args.factory} is not a TinyLLaVA_Factory checkout (no tinyllava/model/modeling_tinyllava.py)")
    work = args.work.resolve()
    if args.phase == "factory":
        import torch

        torch.set_num_threads(1)
        import transformers

        results = {"transformers": transformers.__version__, "cases": factory_side(args.factory.resolve(), work, cases)}
        (work / "factory" / "results.json").write_text(json.dumps(results, indent=2))
        return 0
    if not TF440_PYTHON.is_file():
        parser.error(f"{TF440_PYTHON} is missing: run bash scripts/setup-tf440.sh first")
    result = run(args.factory.resolve(), work, cases)
    print(table(result))
    print(f"{'all within' if passed(result) else 'NOT all within'} {TOL:g}; {result['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
