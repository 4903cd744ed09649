"""The models the bench compares: a trained checkpoint, or a scale built on the fly, and the
bundles made from it (F16 export, then Q8_0 and Q4_K_M through the quant stage, each with an int8
vision graph beside the fp32 one).

Two scales have the real dimensions of released LMMs, random weights:

* `bench-scale`: the Qwen2-0.5B LLM (24 layers, hidden 896, vocab 151936, tied embeddings) and a
  SigLIP-so400m-384 tower (27 layers, hidden 1152, 729 patches), the dims of
  benchmarks/train_gpu.py; 0.9 B parameters saved in float32 (3.7 GB).
* `phi2-scale`: TinyLLaVA-Phi-2-SigLIP-3.1B's dims: Phi-2 (32 layers, hidden 2560, 32 heads, FFN
  10240, vocab 51200, partial rotary 0.4) + SigLIP-so400m-384 + mlp2x_gelu; 3.2 B parameters
  saved in bf16 in the Factory layout, as the released checkpoint is (6.4 GB). Built in bf16
  (torch's default dtype set while the modules are made) and saved one tensor at a time
  (model/weights.py write_safetensors), so the build holds one copy of the weights.

Their tokenizers are the miniature ones of the family (tinyllava_edge/testing/tokenizers.py); the
embedding keeps the real vocabulary's rows (the rows past the tokenizer become [PAD<id>] tokens in
the GGUF), so every weight byte a decode step reads is the real model's. Built once and cached
under `<cache>/<scale>/checkpoint` (a few minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry

BENCH_SCALE = "bench-scale"
PHI2_SCALE = "phi2-scale"
QUANTS = ("Q8_0", "Q4_K_M")
_DONE = ".bench-ready"


@dataclass(frozen=True)
class Scale:
    """A random-init model with a released model's dims."""

    name: str
    text: str  # attribute of bench/dims.py: the LLM's config
    tokenizer: str  # miniature tokenizer kind (testing/tokenizers.py)
    llm_name: str
    max_length: int
    dtype: str  # what the checkpoint is saved in

    def build(self, out: Path) -> Path:
        """Write the checkpoint to `out` (skipped when already complete)."""
        if (out / _DONE).is_file():
            return out
        import torch

        from tinyllava_edge.bench import dims
        from tinyllava_edge.model import TinyLlavaConfig, TinyLlavaForConditionalGeneration, load_tokenizer
        from tinyllava_edge.testing.tokenizers import build_tokenizer

        text = dict(getattr(dims, self.text))
        _log(f"building {self.name} ({self.llm_name} + SigLIP-so400m-384 dims, random weights, {self.dtype}) in {out}")
        out.mkdir(parents=True, exist_ok=True)
        build_tokenizer(self.tokenizer, out)
        tokenizer = load_tokenizer(out, model_type=text["model_type"])
        config = TinyLlavaConfig(text_config=text, vision_config=dict(dims.SIGLIP_SO400M),
                                 connector_type="mlp2x_gelu", tokenizer_model_max_length=self.max_length,
                                 llm_model_name_or_path=self.llm_name,
                                 vision_model_name_or_path="google/siglip-so400m-patch14-384",
                                 pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        before = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, self.dtype))  # parameters made (and initialised) in it
        try:
            model = TinyLlavaForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(before)
        model.save_pretrained(out)
        (out / _DONE).write_text("ok\n")
        return out


SCALES: Registry[Scale] = Registry("bench scale")
SCALES.add(BENCH_SCALE, Scale(BENCH_SCALE, "QWEN2_05B", "qwen2", "Qwen/Qwen2-0.5B", 2048, "float32"))
SCALES.add(PHI2_SCALE, Scale(PHI2_SCALE, "PHI2", "phi2", "microsoft/phi-2", 3072, "bfloat16"))


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def build_bench_scale(out: Path) -> Path:
    """Write the random-init bench-scale checkpoint to `out` (skipped when already complete)."""
    return SCALES.get(BENCH_SCALE).build(out)


def bundles_for(checkpoint: Path, cache: Path, *, verify: bool) -> dict[str, Path]:
    """{"F16": bundle, "Q8_0": bundle, "Q4_K_M": bundle} for `checkpoint`, exported into `cache`
    once (a bundle whose manifest exists is reused)."""
    from tinyllava_edge.export.bundle import export_bundle
    from tinyllava_edge.quant.bundle import quantize_bundle

    cache.mkdir(parents=True, exist_ok=True)
    bundles = {"F16": cache / "bundle-F16"}
    if not (bundles["F16"] / "manifest.json").is_file():
        _log(f"exporting {checkpoint} -> {bundles['F16']} (F16)")
        export_bundle(checkpoint, bundles["F16"], fmt="gguf", bits=16, verify=verify, progress=True,
                      overwrite=True, check_images=1, check_tokens=4)
    for quant in QUANTS:
        bundles[quant] = cache / f"bundle-{quant}"
        if not (bundles[quant] / "manifest.json").is_file():
            _log(f"quantizing {bundles['F16']} -> {bundles[quant]} ({quant}, vision int8 added)")
            quantize_bundle(bundles["F16"], bundles[quant], quant=quant, onnx=("int8",), vision_default="fp32",
                            verify=verify, overwrite=True, progress=True)
    return bundles


def resolve_model(model: str, cache_root: Path) -> tuple[str, Path, Path]:
    """(scale name, checkpoint dir, bundle cache dir) for `--model` (a scale's name or a checkpoint)."""
    if model in SCALES:
        checkpoint = cache_root / model / "checkpoint"
        return model, SCALES.get(model).build(checkpoint), cache_root / model
    names = " or ".join(repr(k) for k in SCALES.keys())
    path = Path(model)
    if not path.is_dir():
        raise TinyLlavaError(f"--model {model} is not a directory; expected a checkpoint directory (config.json) "
                             f"or {names}")
    if not (path / "config.json").is_file():
        raise TinyLlavaError(f"--model {model} has no config.json; expected a checkpoint directory written by "
                             f"tinyllava-train, or {names}")
    config = json.loads((path / "config.json").read_text())
    if "text_config" not in config:
        raise TinyLlavaError(f"{path / 'config.json'} has no text_config; expected a TinyLLaVA checkpoint")
    key = f"{path.resolve().name}-{hashlib.sha1(os.fsencode(path.resolve())).hexdigest()[:8]}"
    resolved = path.resolve()
    # a training run's checkpoint is usually RUN/model: the run's name says which model it is
    label = f"{resolved.parent.name}-{resolved.name}" if resolved.name in ("model", "checkpoint") else resolved.name
    return label, path, cache_root / key
