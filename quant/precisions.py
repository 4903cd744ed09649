"""What `--bits 8` and `--bits 4` mean for a bundle: one preset per width, used by
`tinyllava-export --bits N` and `tinyllava-quantize --bits N` alike.

    --bits 8: llm-Q8_0.gguf,   mmproj-Q8_0.gguf, vision-int8.onnx
    --bits 4: llm-Q4_K_M.gguf, mmproj-Q8_0.gguf, vision-int4.onnx

beside vision.onnx (fp32); the manifest's `vision_default` names the smallest graph that passes
the proxy of quant/vision.py (tiny-shapes: fp32 for 8 bits, int4 for 4 bits, docs/quality.md).
4 bits makes no int8 graph: int4 is the smaller, and where it fails the proxy the bundle falls
back to fp32, the reference every variant is measured against and which the bundle keeps anyway;
an int8 graph would be the default only when int4 fails and int8 passes, and at 3B dims it cost
half of the vision quantization's minutes to make (docs/export-and-quantization.md, "Memory and
time"). `tinyllava-quantize --onnx int8` still writes it on request.

The mmproj stays at Q8_0 for 4 bits too: gguf-py has no K-quants, and stock mtmd measured
cosine 0.9999 at Q8_0 (docs/quality.md). `logits_tol` bounds the quantized LLM's prompt-logit
difference from the 16-bit file it was made from, relative to the largest logit (tiny-shapes
measured: Q8_0 6e-3 against PyTorch, Q4_K_M 3e-2 against F16; the margin covers other models);
greedy tokens are recorded, not required identical (a 4-bit model may break near-ties
differently).
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry


@dataclass(frozen=True)
class BitsPreset:
    """The quantized bundle one bit width stands for."""

    bits: int
    llm: str  # GGUF type of the LLM (quant/gguf.py GGUF_TYPES)
    mmproj: str  # GGUF type of the stock-llama.cpp mmproj (quant/mmproj.py MMPROJ_TYPES)
    vision: tuple[str, ...]  # ONNX schemes written beside vision.onnx, smallest first (quant/onnx.py)
    logits_tol: float


BIT_PRESETS: Registry[BitsPreset] = Registry("quantized bit width")
BIT_PRESETS.add("8", BitsPreset(8, "Q8_0", "Q8_0", ("int8",), logits_tol=0.05))
BIT_PRESETS.add("4", BitsPreset(4, "Q4_K_M", "Q8_0", ("int4",), logits_tol=0.25))
BITS = tuple(int(key) for key in BIT_PRESETS.keys())


def preset_for(bits: int) -> BitsPreset:
    """The preset of `bits`; one sentence naming the offered widths for any other."""
    if str(bits) not in BIT_PRESETS:
        raise TinyLlavaError(f"--bits {bits} is not offered; expected one of {', '.join(str(b) for b in BITS)}")
    return BIT_PRESETS.get(str(bits))
