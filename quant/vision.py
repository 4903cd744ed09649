"""Quantized vision graphs inside a bundle, and which one the runtime runs by default.

The default variant for a quantized bundle is the smallest candidate whose image embeddings stay
close to the fp32 graph's on a fixed set of images: mean per-token cosine >= VISION_MIN_COSINE.
That is a cheap proxy for the rule the report applies with the real benchmark (shapes accuracy
within 0.5 point of fp32, docs/quality.md); on the tiny-shapes model both pick fp32 for 8 bits
(int8 dynamic quantization loses 1.5 points) and int4 (RTN) for 4 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyllava_edge.bundle import file_record
from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
from tinyllava_edge.quant.onnx import compare_onnx, quantize_onnx

VISION_MIN_COSINE = 0.99
PROXY_IMAGES = 16  # scenes drawn by the shapes generator (seed 7, val split, up to 3 objects)
# A tower with many tokens per image needs fewer scenes for the same number of token cosines:
# scenes until PROXY_TOKENS tokens, at least PROXY_MIN_IMAGES. The tiny-shapes tower (9 tokens)
# keeps all 16; SigLIP-so400m-384 (729) takes 4, a quarter of the graphs' runs (phi2-scale: each
# image ~2.3 s through each graph on 2 cores, 16 of them were 75 of the stage's 108 s).
PROXY_TOKENS = 2048
PROXY_MIN_IMAGES = 4
_FACTS = ("inputs", "outputs", "io_dtype", "opset", "image_size", "n_tokens", "hidden")


def proxy_pixels(pre: PreprocessConfig, n: int = PROXY_IMAGES) -> np.ndarray:
    """(n, 3, H, W) pixels of drawn scenes. Measured on tiny-shapes (docs/quality.md): on noise
    images (export.checks.synthetic_images) int8 scored a *higher* cosine than int4 (0.999 vs
    0.994) while losing 1.5 points of accuracy against int4's 0.3; on drawn scenes the cosine
    ranks them as the accuracy does (int8 0.984, int4 0.994, int4-gptq 0.976)."""
    from tinyllava_edge.data import shapes

    images = [shapes._render(shapes._make_scene(shapes._image_rng(7, "val", i), "val", 3), 64) for i in range(n)]
    return preprocess(images, pre)


def proxy_images(n_tokens: int | None) -> int:
    """How many proxy scenes a tower of `n_tokens` image tokens is measured on."""
    if not n_tokens:
        return PROXY_IMAGES
    return max(PROXY_MIN_IMAGES, min(PROXY_IMAGES, -(-PROXY_TOKENS // int(n_tokens))))


def vision_variants(folder: Path, fp32_record: dict, pre: PreprocessConfig, candidates: Sequence[str], *,
                    calibration: Sequence[np.ndarray] | None = None) -> dict:
    """Write vision-<scheme>.onnx for each candidate scheme beside the fp32 graph; returns
    {"files": records, "vision_default": scheme or "fp32", "validation": {scheme: figures}}."""
    source = folder / fp32_record["name"]
    n_images = proxy_images(fp32_record.get("n_tokens"))
    pixels = proxy_pixels(pre, n_images)
    files, figures = [], {}
    for scheme in candidates:
        path = folder / f"vision-{scheme}.onnx"
        report = quantize_onnx(source, path, scheme, calibration=calibration)
        figures[scheme] = {**compare_onnx(source, path, pixels), "quantized_ops": report["quantized_ops"],
                           "proxy": f"mean token cosine >= {VISION_MIN_COSINE} on {n_images} drawn shapes scenes"}
        files.append(file_record(path, "vision", "onnx", scheme, **{k: fp32_record.get(k) for k in _FACTS},
                                 external_data=[]))
    passing = [f for f in files if figures[f["quant"]]["mean_token_cosine"] >= VISION_MIN_COSINE]
    default = min(passing, key=lambda f: f["size"])["quant"] if passing else "fp32"
    return {"files": files, "vision_default": default, "validation": figures}
