"""Tune types per part (frozen | full | partial | lora | qlora): a registry, and applying them.

Three layers, kept apart: :func:`quantize_linears` is module surgery (bitsandbytes nf4 layers in
place of `nn.Linear`), :func:`add_lora` wraps layers with peft adapters, :func:`apply_tuning`
decides from a :class:`~.recipes.TuneSpec` which layers get what and which parameters train.

Semantics follow TinyLLaVA_Factory (training_recipe/base.py, lora_recipe.py, qlora_recipe.py):

* adapters go on every `Linear` of the parts tuned with lora/qlora except output heads
  (`find_all_linear_names` in utils/train_utils.py skips `lm_head` and the SigLIP `head`);
  peft then freezes every other parameter, and the parts tuned `full` are unfrozen after it;
* `partial` trains the vision encoder layers from K on and nothing else of the tower (the
  Factory's `partially-tune`: embeddings, post-layernorm and head stay frozen);
* qlora puts the part's base `Linear` layers in 4-bit NF4 with double quantization (Factory's
  BitsAndBytesConfig: `bnb_4bit_quant_type="nf4"`, `bnb_4bit_use_double_quant=True`, compute
  dtype = the training dtype) under LoRA adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry
from tinyllava_edge.train.recipes import PART_MODULES, PARTS, TuneSpec

ADAPTER_NAME = "default"  # peft's adapter name; one adapter per run


@dataclass(frozen=True)
class LoraSettings:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05


@dataclass(frozen=True)
class TuneType:
    key: str
    factory_name: str  # the value TinyLLaVA_Factory writes in config.json (tune_type_*)
    parts: tuple[str, ...]  # parts it may be applied to
    # Sets requires_grad on one part's parameters, after any adapters were added; gets the
    # part's module and, for `partial`, the first trained layer.
    set_trainable: Callable[[nn.Module, int | None], None]
    lora: bool = False  # LoRA adapters on the part's Linear layers
    quantized: bool = False  # the part's base Linear layers in 4-bit


def _frozen(module: nn.Module, _k: int | None) -> None:
    module.requires_grad_(False)


def _full(module: nn.Module, _k: int | None) -> None:
    module.requires_grad_(True)


def _partial(tower: nn.Module, k: int | None) -> None:
    tower.requires_grad_(False)
    for i, layer in enumerate(tower.encoder_layers):
        layer.requires_grad_(i >= k)


def _adapters_only(_module: nn.Module, _k: int | None) -> None:
    # peft already froze the base weights and made the adapters trainable.
    return None


TUNE_TYPES: Registry[TuneType] = Registry("tune type")
TUNE_TYPES.add("frozen", TuneType("frozen", "frozen", PARTS, _frozen))
TUNE_TYPES.add("full", TuneType("full", "full", PARTS, _full))
TUNE_TYPES.add("partial", TuneType("partial", "partially-tune", ("vision_tower",), _partial))
TUNE_TYPES.add("lora", TuneType("lora", "lora", PARTS, _adapters_only, lora=True))
TUNE_TYPES.add("qlora", TuneType("qlora", "qlora", PARTS, _adapters_only, lora=True, quantized=True))


def part_module(model: nn.Module, part: str) -> nn.Module:
    return getattr(model, PART_MODULES[part])


def resolve_vision_layer(spec: TuneSpec, model: nn.Module) -> TuneSpec:
    """`spec` with K filled in for a partial tower: half its encoder layers unless given."""
    if spec.vision_tower != "partial":
        return spec
    n = len(model.vision_tower.encoder_layers)
    k = n // 2 if spec.vision_from_layer is None else spec.vision_from_layer
    if k >= n:
        raise TinyLlavaError(
            f"the vision tower has {n} encoder layers (0..{n - 1}); cannot tune it from layer {k} on"
        )
    return TuneSpec(spec.llm, spec.vision_tower, spec.connector, k)


def adapter_targets(model: nn.Module, parts: list[str]) -> list[str]:
    """Full names of the Linear layers of `parts` that get adapters (output heads skipped).

    bitsandbytes' `Linear4bit` is an `nn.Linear` too, so quantized layers are found as well.
    """
    names = []
    for part in parts:
        prefix = PART_MODULES[part]
        for name, module in part_module(model, part).named_modules():
            pieces = name.split(".")
            if "lm_head" in pieces or "head" in pieces:
                continue
            if isinstance(module, nn.Linear):
                names.append(f"{prefix}.{name}" if name else prefix)
    return names


# -- module surgery: nn.Linear -> bitsandbytes Linear4bit --------------------------------------------

def quantize_linears(model: nn.Module, names: list[str], device: torch.device, compute_dtype: torch.dtype) -> int:
    """Replace the `nn.Linear` layers named `names` by NF4 `Linear4bit` layers on `device`.

    The weights are quantized when moved to `device` (bitsandbytes quantizes on `.to()`; 0.48+
    does it on CPU too). Returns the number of layers replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if type(linear) is not nn.Linear:  # already 4-bit (Linear4bit subclasses nn.Linear)
            continue
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(linear.weight.data.float(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        setattr(parent, child, q.to(device))
        replaced += 1
    # peft picks its 4-bit LoRA layer (lora.bnb.Linear4bit) only for models flagged like this,
    # as transformers flags a model loaded with a 4-bit BitsAndBytesConfig.
    model.is_loaded_in_4bit = True
    return replaced


def add_lora(model: nn.Module, targets: list[str], lora: LoraSettings):
    """Wrap `targets` with LoRA adapters (peft); every other parameter is frozen by peft."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=targets)
    return get_peft_model(model, config, adapter_name=ADAPTER_NAME)


def apply_tuning(model: nn.Module, spec: TuneSpec, lora: LoraSettings, device: torch.device,
                 compute_dtype: torch.dtype = torch.float32):
    """Set up `model` for training by `spec`; returns the model to train (a peft model with LoRA).

    Also records the tune types in the model's config, as the Factory does.
    """
    types = {part: TUNE_TYPES.get(spec.of(part)) for part in PARTS}
    for part, kind in types.items():
        if part not in kind.parts:
            raise TinyLlavaError(f"tune type {kind.key!r} does not apply to the {part}")
    quantized = [p for p in PARTS if types[p].quantized]
    if quantized:
        quantize_linears(model, adapter_targets(model, quantized), device, compute_dtype)
    adapted = [p for p in PARTS if types[p].lora]
    trained = model
    if adapted:
        targets = adapter_targets(model, adapted)
        if not targets:
            raise TinyLlavaError(f"the {', '.join(adapted)} has no Linear layers to put LoRA adapters on")
        trained = add_lora(model, targets, lora)
    for part, kind in types.items():
        kind.set_trainable(part_module(model, part), spec.vision_from_layer)
    config = model.config
    config.tune_type_llm = types["llm"].factory_name
    config.tune_type_vision_tower = types["vision_tower"].factory_name
    config.tune_type_connector = types["connector"].factory_name
    config.tune_vision_tower_from_layer = spec.vision_from_layer if spec.vision_from_layer is not None else -1
    return trained


def _numel(p: torch.Tensor) -> int:
    # A 4-bit weight is stored packed (two values a byte); count the values it holds.
    state = getattr(p, "quant_state", None)
    return int(state.shape.numel()) if state is not None else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked values."""
    trainable = total = 0
    for p in _unique_parameters(model):
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p
