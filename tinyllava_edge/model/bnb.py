"""Quantized PyTorch loading of our checkpoints: bitsandbytes nf4 / fp4 / int8 (GPTQ: model/gptq.py).

    model = load_quantized("runs/model", "nf4")                    # LLM linears -> bnb Linear4bit
    model = load_quantized("runs/model", "int8", vision=True)       # tower + connector as well
    quantized_layers(model)                                         # {"Linear4bit": 28, ...}

Three layers, kept apart: the math is bitsandbytes' (`Params4bit` / `Int8Params` quantize a
weight when the parameter is moved to its device: blockwise 64-value absmax for nf4/fp4,
row-wise absmax for int8); the module surgery is :func:`replace_linears` (each `nn.Linear` ->
the scheme's layer, same weights, same bias); no file is written (the quantized model lives in
memory; :func:`serialized_size` measures what it would take on disk).

`lm_head` stays in full precision, as transformers' BitsAndBytesConfig leaves it by default
(`llm_int8_skip_modules`): the logits' last projection is where 4-bit rounding costs most.
bitsandbytes 0.50 runs all three schemes on CPU (measured, docs/quality.md) and on CUDA.

GPTQ is registered here too, but it is not applied at load time: it needs calibration data and
GPTQModel, which lives in its own environment (scripts/setup-gptq.sh). `tinyllava-quantize --torch
gptq` writes a checkpoint with the LLM GPTQ-quantized (quant/torch_gptq.py), and loading that
checkpoint gives the GPTQ model (model/gptq.py). Asking to apply it here raises one sentence
saying so.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry

LLM_SKIP = ("lm_head",)  # kept in full precision (transformers' bnb default)
GPTQ_REASON = ("GPTQ is not applied at load time: it needs calibration data and GPTQModel (its own environment, "
               "bash scripts/setup-gptq.sh); make a GPTQ checkpoint once with .venv-gptq/bin/tinyllava-quantize "
               "--torch gptq --checkpoint CKPT --data DATA --out OUT and load OUT")


@dataclass(frozen=True)
class TorchScheme:
    name: str
    bits: int
    layer_type: str  # the bitsandbytes module class a quantized linear becomes
    make: Callable | None  # (nn.Linear, compute dtype) -> module; None: not available here (why: `reason`)
    reason: str = ""


def _linear4bit(quant_type: str) -> Callable:
    def make(linear, compute_dtype):
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.to(torch.float32).cpu(), requires_grad=False,
                                         quant_type=quant_type)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype).cpu(), requires_grad=False)
        return layer

    return make


def _linear8bit(linear, compute_dtype):
    import bitsandbytes as bnb
    import torch

    # threshold 0: no fp16 outlier path (LLM.int8()'s mixed decomposition needs CUDA fp16)
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0, device="meta")
    layer.weight = bnb.nn.Int8Params(linear.weight.data.to(torch.float32).cpu(), requires_grad=False,
                                     has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype).cpu(), requires_grad=False)
    return layer


TORCH_SCHEMES: Registry[TorchScheme] = Registry("torch quantization")
TORCH_SCHEMES.add("nf4", TorchScheme("nf4", 4, "Linear4bit", _linear4bit("nf4")))
TORCH_SCHEMES.add("fp4", TorchScheme("fp4", 4, "Linear4bit", _linear4bit("fp4")))
TORCH_SCHEMES.add("int8", TorchScheme("int8", 8, "Linear8bitLt", _linear8bit))
# GPTQ checkpoints load with GPTQModel's TorchFusedLinear layers (model/gptq.py)
TORCH_SCHEMES.add("gptq", TorchScheme("gptq", 4, "TorchFusedLinear", None, GPTQ_REASON))


def torch_scheme(name: str) -> TorchScheme:
    scheme = TORCH_SCHEMES.get(name)
    if scheme.make is None:
        raise TinyLlavaError(scheme.reason)
    return scheme


def replace_linears(module, make: Callable, *, skip: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Replace every `nn.Linear` under `module` (names in `skip` excepted) with `make(linear)`, in
    place; returns the dotted names replaced."""
    from torch import nn

    done: list[str] = []
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if name in skip:
            continue
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
            done.append(path)
        else:
            done += replace_linears(child, make, skip=skip, prefix=f"{path}.")
    return done


def quantize_model(model, scheme: str, *, vision: bool = False, device: str = "cpu") -> dict:
    """Quantize a loaded TinyLLaVA model in place (its LLM; with `vision`, tower and connector
    too) and move it to `device`; returns {scheme, replaced: {part: n}, layers: {type: n}}."""
    spec = torch_scheme(scheme)
    dtype = next(model.language_model.parameters()).dtype
    replaced = {"language_model": len(replace_linears(model.language_model, lambda l: spec.make(l, dtype),
                                                       skip=LLM_SKIP, prefix="language_model."))}
    if vision:
        for part in ("vision_tower", "connector"):
            replaced[part] = len(replace_linears(getattr(model, part), lambda l: spec.make(l, dtype),
                                                 prefix=f"{part}."))
    model.to(device)  # bitsandbytes quantizes each weight here
    layers = quantized_layers(model)
    if layers.get(spec.layer_type, 0) != sum(replaced.values()) or not replaced["language_model"]:
        raise TinyLlavaError(f"{scheme} quantization replaced {sum(replaced.values())} linear layers but the model "
                             f"holds {layers.get(spec.layer_type, 0)} {spec.layer_type} layers")
    return {"scheme": scheme, "replaced": replaced, "layers": layers}


def load_quantized(checkpoint_dir: str | os.PathLike, scheme: str, *, vision: bool = False, device: str = "cpu",
                   dtype=None):
    """A checkpoint (any layout the model reads) loaded and quantized with `scheme` (nf4 | fp4 |
    int8); `dtype` the compute dtype of the non-quantized parts (default float32)."""
    torch_scheme(scheme)  # gptq / unknown: fail before reading the weights
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration
    from tinyllava_edge.model.gptq import gptq_llm_dir

    if gptq_llm_dir(checkpoint_dir) is not None:
        raise TinyLlavaError(f"{checkpoint_dir} holds a GPTQ-quantized LLM already; load it as it is "
                             f"(without quantization, or with quantization='gptq'), not with {scheme}")

    model = TinyLlavaForConditionalGeneration.from_pretrained(checkpoint_dir, dtype=dtype, device="cpu").eval()
    model.quantization = quantize_model(model, scheme, vision=vision, device=device)
    return model


def quantized_layers(model) -> dict[str, int]:
    """{bitsandbytes layer class name: count} of the quantized layers in `model`."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return dict(Counter(type(m).__name__ for m in model.modules() if isinstance(m, kinds)))


def serialized_size(model) -> int:
    """Bytes of `torch.save(model.state_dict())`: the size the quantized weights take on disk
    (bitsandbytes saves packed 4-bit weights with their absmax/quant-state tensors)."""
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
