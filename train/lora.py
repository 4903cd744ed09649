"""LoRA results as plain checkpoints: merge adapters, unload them, save and read adapter files.

A LoRA run's output is either *merged* (one plain Factory checkpoint, the adapters added into
the weights) or *base + adapter*: the plain checkpoint of the base weights beside peft's
`adapter_config.json` + `adapter_model.safetensors`, as the Factory's lora recipe leaves it.
Starting a later stage from such a directory merges the adapter on load, as the Factory's
`BaseTrainingRecipe.load` does (`PeftModel.from_pretrained(...).merge_and_unload()`).

A qlora base is 4-bit; its plain form is the NF4 weights dequantized, which is exactly what the
adapters were trained against, so a merged qlora checkpoint computes what the trained model did
(up to float rounding) rather than adding the adapters to weights they never saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from tinyllava_edge.errors import CheckpointError
from tinyllava_edge.train.tune import ADAPTER_NAME

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _plain_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a base layer as a float tensor (a 4-bit one dequantized)."""
    weight = layer.weight
    if type(weight).__name__ != "Params4bit":
        return weight.data
    import bitsandbytes as bnb

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU kernel the first time a layer runs in
        # eval mode without grad (nn/modules.py Linear4bit.forward); undo it as its own
        # state_dict writer does before reading the NF4 values.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        weight.data, weight.quant_state = data, state
    return bnb.functional.dequantize_4bit(data, state).float()


def _replace_lora_layers(peft_model, merge: bool) -> nn.Module:
    """The inner model with every LoRA layer replaced by a plain `nn.Linear` (adapters added if `merge`)."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    for name, module in list(inner.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = _plain_weight(base)
        if merge:
            if module.merged:
                raise CheckpointError(f"LoRA layer {name} is already merged into its base weight")
            delta = module.get_delta_weight(ADAPTER_NAME).to(weight.dtype)  # (out, in)
            weight = weight + delta
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.data)
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name), child, linear)
    if getattr(inner, "is_loaded_in_4bit", False):
        inner.is_loaded_in_4bit = False
    return inner


def merge_lora(peft_model) -> nn.Module:
    """The trained model as a plain TinyLlavaForConditionalGeneration, adapters merged in."""
    return _replace_lora_layers(peft_model, merge=True)


def unload_lora(peft_model) -> nn.Module:
    """The plain base model (4-bit weights dequantized), adapters dropped."""
    return _replace_lora_layers(peft_model, merge=False)


def save_adapter(peft_model, out_dir: str | os.PathLike) -> None:
    """Write peft's adapter_config.json + adapter_model.safetensors (no model card, no base)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    peft_model.peft_config[ADAPTER_NAME].save_pretrained(str(out))


def has_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_merged(path: str | os.PathLike):
    """A checkpoint directory as a plain model; an adapter saved beside it is merged in."""
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration

    model = TinyLlavaForConditionalGeneration.from_pretrained(path)
    if not has_adapter(path):
        return model
    from peft import PeftModel

    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    try:
        json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=ADAPTER_NAME)
    return merge_lora(peft_model).eval()


def merge_lora_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge the adapter saved in `path` into its base and write a plain checkpoint to `out_dir`."""
    from tinyllava_edge.model import load_tokenizer, save_tokenizer

    if not has_adapter(path):
        raise CheckpointError(f"{path} has no {ADAPTER_CONFIG}; nothing to merge")
    model = load_merged(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(load_tokenizer(path), out)
    model.save_pretrained(out)
    return out
