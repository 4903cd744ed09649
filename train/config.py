"""`TrainConfig`: every training option and its default, in one place.

The CLI (`tinyllava-train`) builds its flags and defaults from this dataclass; the library
function :func:`tinyllava_edge.train.train` takes it. Constructing one checks what can be checked
without touching the disk or torch (exactly one model source, known stage/recipe/tune types,
ranges); paths are checked when the run starts. A copy is written beside every run's output
(`train_config.json`) and compared on `resume`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.train.recipes import RECIPES, STAGES, TuneSpec

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Options that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "quiet", "num_workers", "save_steps", "save_total_limit",
                               "logging_steps"})


@dataclass(frozen=True)
class TrainConfig:
    # -- what to start from (exactly one of model / preset) ------------------------------------
    model: str | None = None  # checkpoint directory (any layout from_pretrained reads)
    preset: str | None = None  # fresh random-init model from tinyllava_edge.model.presets
    tokenizer: str | None = None  # tokenizer directory, for a preset
    # -- data ---------------------------------------------------------------------------------------
    data: str = ""  # LLaVA-format .json (a list of records) or .jsonl (one record a line)
    image_folder: str | None = None  # where records' "image" paths are relative to (default: data's folder)
    output: str = ""
    # -- what trains ------------------------------------------------------------------------------
    stage: str = "finetune"  # pretrain | finetune
    recipe: str = "base"  # base | share | custom
    template: str | None = None  # default: `pretrain` for the pretrain stage, else the LLM family's
    tune_llm: str | None = None  # custom recipe: frozen | full | lora | qlora
    tune_vision: str | None = None  # custom recipe: frozen | full | partial | lora | qlora
    tune_connector: str | None = None  # custom recipe: frozen | full | lora | qlora
    tune_vision_from_layer: int | None = None  # partial tower: first trained encoder layer (default: half)
    # LoRA: TinyLLaVA_Factory's TrainingArguments defaults (r 64, alpha 16, dropout 0.05, bias none);
    # its lora/qlora scripts pass r 128, alpha 256.
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    merge_lora: bool = False  # write LoRA merged into a plain checkpoint (else base + adapter files)
    # -- optimisation (AdamW, cosine with warmup, no weight decay: Factory's scripts) --------------
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float | None = None  # default: the stage's (pretrain 1e-3, finetune 2e-5)
    # Per-part learning rates (Factory's mm_projector_lr / vision_tower_lr); default: lr
    connector_lr: float | None = None
    vision_tower_lr: float | None = None
    batch_size: int = 8  # per device
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    group_by_length: bool | None = None  # Factory's group_by_modality_length; default: the stage's
    truncate: bool = False  # cut over-long samples at tokenizer_model_max_length (Factory) instead of refusing them
    skip_bad: bool = False  # skip (and count) bad records instead of stopping at the first
    # -- running --------------------------------------------------------------------------------
    resume: bool = False  # continue from the last checkpoint-N in `output`
    overwrite: bool = False  # start again in a non-empty `output` (its checkpoint-N folders are removed)
    save_steps: int = 500  # checkpoint every N optimizer steps (Factory keeps 1)
    save_total_limit: int = 1
    logging_steps: int = 1
    precision: str = "auto"  # auto: bf16 mixed precision on a bf16 GPU or a native-bf16 CPU, else fp32
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a DeepSpeed JSON, or `zero2` / `zero3` for the shipped ones
    fsdp: bool = False  # PyTorch FSDP with `fsdp_config` (default: the shipped configs/fsdp.json)
    fsdp_config: str | None = None
    num_workers: int = 0  # DataLoader worker processes
    quiet: bool = False  # no progress bar

    def __post_init__(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise TinyLlavaError("give exactly one of a checkpoint to start from (model) or a preset")
        if self.preset is not None and self.tokenizer is None:
            raise TinyLlavaError(f"preset {self.preset!r} builds a fresh model and needs a tokenizer directory")
        if self.model is not None and self.tokenizer is not None:
            raise TinyLlavaError("a checkpoint brings its own tokenizer; give a tokenizer only with a preset")
        if not self.data:
            raise TinyLlavaError("no training data given (a LLaVA-format .json or .jsonl file)")
        if not self.output:
            raise TinyLlavaError("no output directory given")
        STAGES.get(self.stage)
        spec = self.tune_spec()  # unknown recipe, missing/extra/unknown tune types
        if (spec.llm, spec.vision_tower, spec.connector) == ("frozen", "frozen", "frozen"):
            raise TinyLlavaError("nothing to train: every part is frozen")
        if self.precision not in PRECISIONS:
            raise TinyLlavaError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        if self.deepspeed is not None and self.fsdp:
            raise TinyLlavaError("choose DeepSpeed or FSDP, not both")
        if self.fsdp_config is not None and not self.fsdp:
            raise TinyLlavaError("an FSDP config only applies with fsdp")
        if self.resume and self.overwrite:
            raise TinyLlavaError("resume continues the run in the output directory and overwrite starts it again; choose one")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "lora_r": self.lora_r,
                    "save_steps": self.save_steps, "save_total_limit": self.save_total_limit,
                    "logging_steps": self.logging_steps}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise TinyLlavaError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise TinyLlavaError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise TinyLlavaError(f"epochs must be positive, got {self.epochs!r}")
        for name in ("lr", "connector_lr", "vision_tower_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise TinyLlavaError(f"{name} must be positive, got {value!r}")
        checks = {"warmup_ratio": (self.warmup_ratio, 0.0, 1.0), "lora_dropout": (self.lora_dropout, 0.0, 1.0)}
        for name, (value, low, high) in checks.items():
            if not (low <= value < high):
                raise TinyLlavaError(f"{name} must be in [{low}, {high}), got {value!r}")
        for name in ("weight_decay", "max_grad_norm", "lora_alpha"):
            if getattr(self, name) < 0:
                raise TinyLlavaError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise TinyLlavaError(f"num_workers must not be negative, got {self.num_workers!r}")

    # -- derived values ----------------------------------------------------------------------------
    def tune_spec(self) -> TuneSpec:
        given = {"llm": self.tune_llm, "vision_tower": self.tune_vision, "connector": self.tune_connector}
        return RECIPES.get(self.recipe).spec(self.stage, given, self.tune_vision_from_layer)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else STAGES.get(self.stage).learning_rate

    @property
    def part_learning_rates(self) -> dict[str, float]:
        """Learning rates of the parts that do not use `learning_rate` (PARTS keys)."""
        rates = {"connector": self.connector_lr, "vision_tower": self.vision_tower_lr}
        return {part: lr for part, lr in rates.items() if lr is not None}

    @property
    def grouped(self) -> bool:
        if self.group_by_length is not None:
            return self.group_by_length
        return STAGES.get(self.stage).group_by_modality_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TinyLlavaError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def differences(self, other: "TrainConfig") -> list[str]:
        """Options (beyond those a resumption may change) on which two configs differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]
