"""Training a preset from nothing: `tinyllava-train --preset tiny-shapes --output DIR`.

A preset recipe is data: the shapes dataset to generate, then the stages to run, each one a
:class:`~.config.TrainConfig` for :func:`~.run.train`, then the evaluation. Output layout::

    DIR/data/        the generated shapes dataset (LLaVA JSON + PNGs)
    DIR/tokenizer/   the shapes BPE tokenizer
    DIR/pretrain/    stage 1 checkpoint (captions, `pretrain` template)
    DIR/model/       stage 2 checkpoint: the trained model (multi-turn QA, `llama` template)
    DIR/eval/        the shapes benchmark on the held-out test split (results.json / .md)
    DIR/recipe_summary.json   wall time per step, accuracy, parameter count

Why the tiny-shapes recipe looks the way it does (docs/tiny-shapes-training.md has the runs):

* The LLM starts from random weights, so both stages train it with the connector (the paper's
  ``base`` recipe freezes the LLM in pretraining because its LLM is already trained).
* The SigLIP-style tower stays frozen at its seeded random initialisation. Its patch grid is the
  data's 3x3 grid (48 px images, 16 px patches), so each image token sees one cell; random
  features of one cell separate the colours and shapes well enough for the trained connector,
  while training the tower at the LLM's learning rate washed the image signal out.
* Stage 1 is where the model learns to find an object in the image by its colour and shape:
  the captions name the objects in random order with each cell right after its shape ("red circle
  top left, ..."), so every cell word is one such lookup. At lr 1e-3 (Adam, batch 16) that lookup
  never formed, at 3e-4 it does; 1,600 steps instead of 800 took relative position from 69 to
  90-94 % at every seed (seventh look).
* A quarter of the stage-1 captions name the objects shape first without cells ("circle red,
  square blue."): the lookup by shape that colour questions need, which one seed in three never
  formed from stage 2 alone (64.6 % colour, every wrong answer another object's colour). The two
  lookups compete early in stage 1 (half the captions in that form lost the cell lookup at seed
  0), so stage 1 is longer instead: 2,000 steps of 32 captions, and stage 2 gives up 200 steps
  to pay for it (tenth and eleventh looks).
* Stage 2 trains on one multi-turn conversation per image (every question plus the caption
  request), which feeds four to six supervised answers through one sequence.
* Neither stage names a precision: `auto` trains with bf16 autocast on a CPU with native bf16
  (0.28 against 0.46 s a stage-2 step on an AMD EPYC), which pays for the longer stages within
  the 10-minute budget; fp32 elsewhere.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from tinyllava_edge.atomic import write_text
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry
from tinyllava_edge.train.config import TrainConfig

SUMMARY_FILE = "recipe_summary.json"


@dataclass(frozen=True)
class StagePlan:
    """One training stage of a recipe: its data file (in the generated dataset) and options."""

    name: str  # output folder under the recipe's output
    data_file: str
    options: Mapping[str, Any]  # TrainConfig fields


@dataclass(frozen=True)
class Reference:
    """Where the recipe lands: `benchmarks/tiny_shapes.py --seeds ...` on an idle machine.

    A run is one draw from a spread (seed, CPU, package versions); the main job and
    `tinyllava-train --preset` print a run's accuracy beside these figures.
    """

    seeds: tuple[int, ...]
    accuracies: tuple[float, ...]  # test-split exact match of each seed, same order
    cpu: str  # the CPU model the figures come from

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def worst(self) -> float:
        return min(self.accuracies)

    def verdict(self, accuracy: float) -> str:
        """One sentence placing a run's test accuracy against the reference runs."""
        seeds = ", ".join(map(str, self.seeds))
        ref = f"the recipe's reference runs (seeds {seeds}, {self.cpu}): worst {self.worst:.1f} %, mean {self.mean:.1f} %"
        if accuracy < self.worst - 0.05:
            return (f"this run scored {accuracy:.1f} %, BELOW every one of {ref}; "
                    "a run this low is not what the recipe should give (docs/training.md says what to check)")
        where = "at or above the mean of" if accuracy >= self.mean - 0.05 else "within the spread of"
        return f"this run scored {accuracy:.1f} %, {where} {ref}"


@dataclass(frozen=True)
class PresetRecipe:
    preset: str
    dataset: Mapping[str, Any]  # write_dataset keyword arguments
    stages: tuple[StagePlan, ...]
    eval_split: str = "test"
    eval_batch_size: int = 64
    reference: Reference | None = None


_SHAPES_TUNE = {"recipe": "custom", "tune_llm": "full", "tune_vision": "frozen", "tune_connector": "full"}

PRESET_RECIPES: Registry[PresetRecipe] = Registry("preset recipe")
PRESET_RECIPES.add("tiny-shapes", PresetRecipe(
    preset="tiny-shapes",
    dataset=MappingProxyType({"n_train": 10000, "n_val": 200, "n_test": 1000, "image_size": 48,
                              "max_objects": 4}),
    stages=(
        StagePlan("pretrain", "pretrain.json", MappingProxyType({
            "stage": "pretrain", **_SHAPES_TUNE, "lr": 3e-4, "connector_lr": 3e-4, "batch_size": 32, "max_steps": 2000,
            "warmup_ratio": 0.03})),
        StagePlan("model", "instruct.json", MappingProxyType({
            "stage": "finetune", **_SHAPES_TUNE, "lr": 3e-4, "connector_lr": 1e-3, "batch_size": 16, "max_steps": 1400,
            "warmup_ratio": 0.03})),
    ),
    # benchmarks/tiny_shapes.py --seeds 0 1 2, 2026-12-05, idle (bf16 autocast, 2 threads; 558, 570
    # and 562 s): the same seed on the same machine gives the same model, so shared-machine runs
    # give these figures too.
    reference=Reference(seeds=(0, 1, 2), accuracies=(94.58, 96.25, 95.25), cpu="AMD EPYC"),
))


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TinyLlavaError(f"output {out} is a file; expected a directory (new or empty)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TinyLlavaError(f"output {out} is not empty; pick a new directory or start again with --overwrite")
        if not (out / SUMMARY_FILE).is_file() and not (out / "data" / "meta.json").is_file():
            raise TinyLlavaError(f"refusing to overwrite {out}: it holds no preset run (no {SUMMARY_FILE})")
        import shutil

        shutil.rmtree(out)


def train_preset(name: str, output: str | os.PathLike, *, seed: int = 0, overwrite: bool = False,
                 quiet: bool = False, evaluate: bool = True, log: Callable[[str], None] = print,
                 dataset_overrides: Mapping[str, Any] | None = None, **stage_overrides: Any) -> dict:
    """Generate the data, train every stage of preset `name`'s recipe and evaluate; returns the summary.

    ``stage_overrides`` (TrainConfig fields, e.g. ``max_steps``) apply to every stage and
    ``dataset_overrides`` (write_dataset arguments) to the data; tests use them to run the recipe
    small.
    """
    from tinyllava_edge.data.shapes import write_dataset
    from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer
    from tinyllava_edge.train.run import train

    recipe = PRESET_RECIPES.get(name)
    out = Path(output)
    _check_output(out, overwrite)
    started = time.perf_counter()
    steps: list[dict] = []

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        result = fn()
        steps.append({"step": label, "seconds": round(time.perf_counter() - t, 2)})
        return result

    n_steps = 2 + len(recipe.stages) + int(evaluate)
    dataset = {**recipe.dataset, **(dataset_overrides or {})}
    log(f"[1/{n_steps}] shapes data: generating {dataset['n_train']} train images ...")
    timed("data", lambda: write_dataset(out / "data", seed=seed, **dataset))
    log(f"[2/{n_steps}] tokenizer: training the shapes BPE ...")
    tokenizer = timed("tokenizer", lambda: train_shapes_tokenizer(out / "tokenizer", seed=seed))

    previous: Path | None = None
    stage_summaries = {}
    for i, plan in enumerate(recipe.stages, start=3):
        options = {**plan.options, **stage_overrides}
        source = {"model": str(previous)} if previous is not None else \
            {"preset": recipe.preset, "tokenizer": str(tokenizer)}
        config = TrainConfig(**source, data=str(out / "data" / plan.data_file), output=str(out / plan.name),
                             seed=seed, quiet=quiet, **options)
        log(f"[{i}/{n_steps}] {plan.name}: {config.stage} on {plan.data_file}, {config.max_steps} steps ...")
        result = timed(plan.name, lambda config=config: train(config))
        stage_summaries[plan.name] = {k: result.summary.get(k) for k in
                                      ("final_loss", "train_seconds", "steps_this_run", "samples_per_second",
                                       "parameters", "precision", "device")}
        previous = out / plan.name

    summary: dict[str, Any] = {
        "preset": name, "seed": seed, "output": str(out), "model": str(previous),
        "dataset": dataset, "stages": stage_summaries, "overrides": stage_overrides,
        "recipe_version": recipe_fingerprint(name),
        "threads": _threads(),
        "openmp_wait": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ},
    }
    if evaluate:
        log(f"[{n_steps}/{n_steps}] evaluation: shapes benchmark on the {recipe.eval_split} split ...")
        summary["eval"] = timed("eval", lambda: evaluate_shapes(previous, out / "data", out / "eval",
                                                                recipe.eval_split, recipe.eval_batch_size, quiet))
    summary["steps"] = steps
    summary["train_wall_seconds"] = round(sum(s["seconds"] for s in steps if s["step"] != "eval"), 2)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_shapes(model_dir: Path, data_dir: Path, out_dir: Path, split: str = "test", batch_size: int = 64,
                    quiet: bool = True) -> dict:
    """Exact match overall and per kind of a checkpoint on a shapes split (greedy decoding)."""
    from tinyllava_edge.eval import Sources, TorchPredictor, run_benchmark

    sources = Sources(questions=data_dir / f"{split}.json", image_folder=data_dir, split=split)
    results = run_benchmark("shapes", lambda: TorchPredictor(model_dir, batch_size=batch_size), sources, out_dir,
                            progress=not quiet)
    metrics = results["metrics"]
    return {"split": split, "n": metrics["n"], "exact_match": metrics["exact_match"],
            "per_kind": {k: g["accuracy"] for k, g in metrics["per_kind"].items()},
            "results": str(out_dir / "results.json")}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def recipe_description(name: str) -> dict:
    recipe = PRESET_RECIPES.get(name)
    return {"preset": recipe.preset, "dataset": dict(recipe.dataset),
            "stages": [{"name": s.name, "data": s.data_file, **dict(s.options)} for s in recipe.stages]}


def reference_verdict(summary: Mapping[str, Any]) -> str | None:
    """The sentence placing a finished preset run (its summary) against its recipe's reference runs;
    None when the run was not evaluated on the reference's split or the recipe has no reference."""
    recipe = PRESET_RECIPES.get(summary["preset"]) if summary.get("preset") in PRESET_RECIPES else None
    ev = summary.get("eval")
    if recipe is None or recipe.reference is None or not ev or ev.get("split") != recipe.eval_split:
        return None
    if summary.get("dataset") != dict(recipe.dataset) or summary.get("overrides"):
        return None  # a run made small or changed is not comparable with the reference
    if not is_current_run(summary):
        return None  # an earlier recipe's run: the reference figures are this recipe's
    return recipe.reference.verdict(ev["exact_match"])


def recipe_fingerprint(name: str) -> dict:
    """What a run of preset `name` follows from besides its seed: the shapes generator's version and
    the recipe (data sizes, every stage's options). A summary holding another is an earlier recipe's."""
    from tinyllava_edge.data.shapes import GENERATOR_VERSION

    return {"generator_version": GENERATOR_VERSION, **recipe_description(name)}


def is_current_run(summary: Mapping[str, Any]) -> bool:
    """Whether a preset run's summary (recipe_summary.json) was made by the recipe this code holds."""
    name = summary.get("preset")
    if name not in PRESET_RECIPES:
        return False
    # through JSON, as the summary was: tuples become lists, mapping proxies dicts
    return summary.get("recipe_version") == json.loads(json.dumps(recipe_fingerprint(name)))
