"""Stages and recipes as data, looked up by exact key; no torch here.

TinyLLaVA_Factory trains in two stages (scripts/train/pretrain.sh, finetune.sh) and the paper
names recipes by which parts each stage trains:

=========  ==========================================  ========================================
recipe     pretrain (captions, `pretrain` template)     finetune (instructions, family template)
=========  ==========================================  ========================================
base       connector only                              LLM + connector, vision tower frozen
share      connector + LLM + vision tower from layer   as base
           K on (scripts/train/share/*.sh; the
           TinyLLaVA paper's "share" recipe)
custom     every part's tune type given                 every part's tune type given
=========  ==========================================  ========================================

A part's tune type is one of :data:`TUNE_TYPE_KEYS` (``tune.py`` holds their registry, which
needs torch). The Factory called its recipes ``common`` / ``lora`` / ``qlora_int8`` by the
*mechanism*; here the mechanism is the tune type of each part and the recipe says which part
trains in which stage, as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry

PARTS = ("llm", "vision_tower", "connector")
# Each part's module attribute on TinyLlavaForConditionalGeneration.
PART_MODULES: Mapping[str, str] = MappingProxyType(
    {"llm": "language_model", "vision_tower": "vision_tower", "connector": "connector"}
)
TUNE_TYPE_KEYS = ("frozen", "full", "partial", "lora", "qlora")


@dataclass(frozen=True)
class Stage:
    name: str
    template: str | None  # chat template; None: the LLM family's (default_template_for_family)
    # Factory scripts: pretrain.sh --learning_rate 1e-3, finetune.sh 2e-5.
    learning_rate: float
    # finetune.sh passes --group_by_modality_length True, pretrain.sh does not.
    group_by_modality_length: bool


STAGES: Registry[Stage] = Registry("training stage")
STAGES.add("pretrain", Stage("pretrain", "pretrain", 1e-3, group_by_modality_length=False))
STAGES.add("finetune", Stage("finetune", None, 2e-5, group_by_modality_length=True))


@dataclass(frozen=True)
class TuneSpec:
    """What each part does in one run: a tune type per part, and K for a `partial` tower."""

    llm: str
    vision_tower: str
    connector: str
    # First trainable encoder layer of a `partial` vision tower; None: half the tower's layers
    # (the paper's share recipe trains CLIP-L/14 from layer 12 of 24).
    vision_from_layer: int | None = None

    def __post_init__(self) -> None:
        for part in PARTS:
            kind = getattr(self, part)
            if kind not in TUNE_TYPE_KEYS:
                raise TinyLlavaError(
                    f"unknown tune type {kind!r} for the {part}; known: {', '.join(TUNE_TYPE_KEYS)}"
                )
        for part in ("llm", "connector"):
            if getattr(self, part) == "partial":
                raise TinyLlavaError(
                    f"tune type 'partial' (encoder layers from K on) applies to the vision tower only, "
                    f"not the {part}"
                )
        if self.vision_from_layer is not None:
            if self.vision_tower != "partial":
                raise TinyLlavaError(
                    f"a first tuned vision layer ({self.vision_from_layer}) applies to a 'partial' "
                    f"vision tower only; this run's tower is {self.vision_tower!r}"
                )
            if self.vision_from_layer < 0:
                raise TinyLlavaError(f"the first tuned vision layer must be >= 0, got {self.vision_from_layer}")

    def of(self, part: str) -> str:
        return getattr(self, part)

    def as_dict(self) -> dict:
        return {"llm": self.llm, "vision_tower": self.vision_tower, "connector": self.connector,
                "vision_from_layer": self.vision_from_layer}


@dataclass(frozen=True)
class Recipe:
    name: str
    # stage -> (llm, vision_tower, connector) tune types; None: given by the user (custom)
    stages: Mapping[str, tuple[str, str, str]] | None
    description: str

    def spec(self, stage: str, given: Mapping[str, str | None], vision_from_layer: int | None) -> TuneSpec:
        """The tune spec of `stage`; `given` holds the user's per-part tune types (custom only)."""
        STAGES.get(stage)
        named = {part: kind for part, kind in given.items() if kind is not None}
        if self.stages is None:
            missing = [part for part in PARTS if part not in named]
            if missing:
                raise TinyLlavaError(
                    f"recipe 'custom' needs a tune type for every part; missing: {', '.join(missing)} "
                    f"(one of {', '.join(TUNE_TYPE_KEYS)})"
                )
            return TuneSpec(**named, vision_from_layer=vision_from_layer)
        if named:
            raise TinyLlavaError(
                f"recipe {self.name!r} fixes every part's tune type; per-part tune types "
                f"({', '.join(sorted(named))}) need --recipe custom"
            )
        llm, vision, connector = self.stages[stage]
        return TuneSpec(llm, vision, connector, vision_from_layer)


RECIPES: Registry[Recipe] = Registry("training recipe")
RECIPES.add("base", Recipe(
    "base",
    {"pretrain": ("frozen", "frozen", "full"), "finetune": ("full", "frozen", "full")},
    "pretrain the connector; finetune LLM + connector (vision tower frozen)",
))
RECIPES.add("share", Recipe(
    "share",
    {"pretrain": ("full", "partial", "full"), "finetune": ("full", "frozen", "full")},
    "pretrain connector + LLM + vision layers from K on; finetune as base",
))
RECIPES.add("custom", Recipe("custom", None, "every part's tune type given"))
