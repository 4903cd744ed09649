"""Training: recipes (base | share | custom) x stages (pretrain | finetune) on transformers' Trainer.

    from tinyllava_edge.train import TrainConfig, train

    result = train(TrainConfig(preset="tiny-shapes", tokenizer="tok", data="data/pretrain.json",
                               stage="pretrain", recipe="custom", tune_llm="full", tune_vision="full",
                               tune_connector="full", output="runs/pretrain"))
    result.output, result.summary["final_loss"]

`tinyllava-train` (tinyllava_edge.cli.train) is a thin layer over :func:`train`. Importing this
package is light; torch, transformers and peft are imported when a run starts.
"""

from tinyllava_edge.train.config import TrainConfig
from tinyllava_edge.train.recipes import PARTS, RECIPES, STAGES, TUNE_TYPE_KEYS, Recipe, Stage, TuneSpec

__all__ = [
    "PARTS",
    "RECIPES",
    "STAGES",
    "TUNE_TYPE_KEYS",
    "Recipe",
    "Stage",
    "TrainConfig",
    "TrainResult",
    "TuneSpec",
    "merge_lora_checkpoint",
    "train",
]


def __getattr__(name: str):
    # The torch-side API, imported on first use so that `--help` and config checks stay light.
    if name in ("train", "TrainResult"):
        from tinyllava_edge.train import run

        return getattr(run, name)
    if name == "merge_lora_checkpoint":
        from tinyllava_edge.train.lora import merge_lora_checkpoint

        return merge_lora_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
