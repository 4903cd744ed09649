"""The models the bench compares: a trained checkpoint, or `bench-scale` built on the fly, and the
bundles made from it (F16 export, then Q8_0 and Q4_K_M through the quant stage, each with an int8
vision graph beside the fp32 one).

`bench-scale` has the real dimensions of a small LMM, random weights: the Qwen2-0.5B LLM
(24 layers, hidden 896, vocab 151936, tied embeddings) and a SigLIP-so400m-384 tower (27 layers,
hidden 1152, 729 patches), the dims of benchmarks/train_gpu.py. Its tokenizer is the miniature
Qwen2 one (tinyllava_edge/testing/tokenizers.py); the embedding keeps Qwen2's 151936 rows (the
rows past the tokenizer become [PAD<id>] tokens in the GGUF), so every weight byte a decode step
reads is the real model's. Built once and cached (a few minutes on 2 cores, ~6 GB on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tinyllava_edge.errors import TinyLlavaError

BENCH_SCALE = "bench-scale"
QUANTS = ("Q8_0", "Q4_K_M")
_DONE = ".bench-ready"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def build_bench_scale(out: Path) -> Path:
    """Write the random-init bench-scale checkpoint to `out` (skipped when already complete)."""
    if (out / _DONE).is_file():
        return out
    import torch

    from tinyllava_edge.bench.dims import QWEN2_05B, SIGLIP_SO400M
    from tinyllava_edge.model import TinyLlavaConfig, TinyLlavaForConditionalGeneration, load_tokenizer
    from tinyllava_edge.testing.tokenizers import build_tokenizer

    _log(f"building {BENCH_SCALE} (Qwen2-0.5B + SigLIP-so400m-384 dims, random weights) in {out}")
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer("qwen2", out)
    tokenizer = load_tokenizer(out, model_type="qwen2")
    config = TinyLlavaConfig(text_config=dict(QWEN2_05B), vision_config=dict(SIGLIP_SO400M),
                             connector_type="mlp2x_gelu", tokenizer_model_max_length=2048,
                             llm_model_name_or_path="Qwen/Qwen2-0.5B",
                             vision_model_name_or_path="google/siglip-so400m-patch14-384",
                             pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = TinyLlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    (out / _DONE).write_text("ok\n")
    return out


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
    """(scale name, checkpoint dir, bundle cache dir) for `--model` (`bench-scale` or a checkpoint)."""
    if model == BENCH_SCALE:
        checkpoint = cache_root / BENCH_SCALE / "checkpoint"
        return BENCH_SCALE, build_bench_scale(checkpoint), cache_root / BENCH_SCALE
    path = Path(model)
    if not path.is_dir():
        raise TinyLlavaError(f"--model {model} is not a directory; expected a checkpoint directory (config.json) "
                             f"or {BENCH_SCALE!r}")
    if not (path / "config.json").is_file():
        raise TinyLlavaError(f"--model {model} has no config.json; expected a checkpoint directory written by "
                             f"tinyllava-train, or {BENCH_SCALE!r}")
    config = json.loads((path / "config.json").read_text())
    if "text_config" not in config:
        raise TinyLlavaError(f"{path / 'config.json'} has no text_config; expected a TinyLLaVA checkpoint")
    key = f"{path.resolve().name}-{hashlib.sha1(os.fsencode(path.resolve())).hexdigest()[:8]}"
    resolved = path.resolve()
    # a training run's checkpoint is usually RUN/model: the run's name says which model it is
    label = f"{resolved.parent.name}-{resolved.name}" if resolved.name in ("model", "checkpoint") else resolved.name
    return label, path, cache_root / key
