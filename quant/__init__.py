"""Quantization to 4/8-bit for every backend.

* GGUF (the LLM): llama.cpp's own quantizer, `quant.gguf` (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, F16,
  F32), per-tensor types read back; the mmproj to Q8_0 in `quant.mmproj`;
* ONNX (vision + connector): int8 dynamic, int4 MatMulNBits RTN / GPTQ, `quant.onnx`;
* torch: bitsandbytes nf4 / fp4 / int8 loading, `quant.torch_bnb`; GPTQ 4-bit checkpoints through
  GPTQModel, `quant.torch_gptq` (its own environment, .venv-gptq);
* bundles: `quant.bundle.quantize_bundle` (what `tinyllava-quantize` runs).

Importing this package registers the 8- and 4-bit precisions with `export.bundle`, so
`export_bundle(..., bits=8)` / `tinyllava-export --bits 4` work. Nothing heavy at import.
"""

from tinyllava_edge.quant.precisions import register_precisions

register_precisions()

__all__ = ["register_precisions"]
