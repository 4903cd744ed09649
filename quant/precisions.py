"""The 8- and 4-bit bundle precisions `export_bundle` offers once the quant stage is imported.

    --bits 8: llm-Q8_0.gguf,   mmproj-Q8_0.gguf, vision-int8.onnx
    --bits 4: llm-Q4_K_M.gguf, mmproj-Q8_0.gguf, vision-int8.onnx + vision-int4.onnx

beside vision.onnx (fp32); the manifest's `vision_default` names the smallest graph that passes
the proxy of quant/vision.py (tiny-shapes: fp32 for 8 bits, int4 for 4 bits, docs/quality.md).

The mmproj stays at Q8_0 for 4 bits too: gguf-py has no K-quants, and stock mtmd measured
cosine 0.9999 at Q8_0 (docs/quality.md). The LLM check tolerances are the measured prompt-logit
differences against PyTorch with a margin (tiny-shapes model, docs/quality.md); greedy tokens are
recorded, not required identical (a 4-bit model may break near-ties differently).
"""

from __future__ import annotations

from pathlib import Path

from tinyllava_edge.export.bundle import PRECISIONS, Precision, register_precision
from tinyllava_edge.quant.gguf import BITS_TO_TYPE

# relative prompt-logit difference against PyTorch allowed at export (tiny-shapes measured: Q8_0 6e-3 vs torch, Q4_K_M 3e-2 vs F16)
LOGITS_TOL = {8: 0.05, 4: 0.25}
VISION_CANDIDATES = {8: ("int8",), 4: ("int4", "int8")}  # smallest first


def _finish_llm(quant: str):
    def finish(written: Path, final: Path) -> dict:
        from tinyllava_edge.quant.gguf import quantize_gguf

        return quantize_gguf(written, final, quant)

    return finish


def _finish_mmproj(written: Path, final: Path) -> dict:
    from tinyllava_edge.quant.mmproj import quantize_mmproj

    return quantize_mmproj(written, final, "Q8_0")


def _vision_variants(bits: int):
    def variants(folder: Path, fp32_record: dict, model) -> dict:
        from tinyllava_edge.quant.vision import vision_variants

        return vision_variants(folder, fp32_record, model, VISION_CANDIDATES[bits])

    return variants


def register_precisions() -> None:
    """Register 8 and 4 bits (once per process)."""
    for bits, quant in BITS_TO_TYPE.items():
        if str(bits) in PRECISIONS:
            continue
        register_precision(Precision(bits, quant, "f16", "f16", logits_tol=LOGITS_TOL[bits], exact_greedy=False,
                                     finish=_finish_llm(quant), mmproj_type="Q8_0", mmproj_finish=_finish_mmproj,
                                     vision_variants=_vision_variants(bits)))
