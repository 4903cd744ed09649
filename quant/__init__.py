"""Quantization: a bundle (or a checkpoint) in, a quantized one out.

* bundles: `quant.bundle` — `quantize_bundle` (what `tinyllava-quantize` runs), `quantize_to_bits`
  (the `--bits 8|4` presets of `quant.precisions`) and `export_quantized` (`tinyllava-export
  --bits 8|4`: the 16-bit bundle exported, then quantized);
* GGUF (the LLM): llama.cpp's own quantizer, `quant.gguf` (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, F16,
  F32), per-tensor types read back; the mmproj to Q8_0 in `quant.mmproj`;
* ONNX (vision + connector): int8 dynamic, int4 MatMulNBits RTN / GPTQ, `quant.onnx`, and which
  graph a bundle runs by default, `quant.vision`;
* torch: GPTQ 4-bit checkpoints through GPTQModel, `quant.torch_gptq` (its own environment,
  .venv-gptq). What happens at load time (bitsandbytes nf4 / fp4 / int8, loading a GPTQ
  checkpoint) belongs to the model: `tinyllava_edge.model.bnb`, `tinyllava_edge.model.gptq`.

Nothing heavy is imported with this package.
"""
