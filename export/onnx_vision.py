"""Vision tower + feature selection + connector -> one ONNX graph (`pixel_values` -> `image_embeds`).

The graph is exported with `torch.onnx.export(..., dynamo=True)` (optimum has no LLaVA export
and pins transformers < 4.58, docs/architecture.md) from exactly what `encode_images` runs: the tower, the
checkpoint's feature layer and select strategy (so the Factory's 728-token SigLIP quirk and the
legacy layout's all-tokens SigLIP are kept), and the connector. The batch axis is dynamic.

Both variants take and return float32: the `fp16` graph casts on entry and exit, so a caller
(the edge runtime) feeds the same `preprocess` output to either file.

The file is written under a temporary directory beside the destination, checked with
`onnx.checker`, validated against PyTorch there (on by default), and only then moved into
place, so a failed export or validation leaves nothing behind.
"""

from __future__ import annotations

import copy
import gc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from tinyllava_edge.atomic import staged_folder
from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
from tinyllava_edge.errors import TinyLlavaError

DTYPES: Mapping[str, torch.dtype] = MappingProxyType({"fp32": torch.float32, "fp16": torch.float16})
# A protobuf cannot exceed 2 GiB (onnx's own limit); stay clear of it and put weights beside it.
_EXTERNAL_DATA_ABOVE = 64 * 2**20
# Validation bounds. fp32: the dynamo export matches torch to ~2e-7 (docs/architecture.md), so a relative
# 1e-3 only trips on a real mismatch. fp16: rounding grows with depth; every token keeping a
# cosine of 0.995 with the fp32 reference is what "still the same features" means here.
_FP32_REL_TOL = 1e-3
_FP16_MIN_COSINE = 0.995
_VALIDATION_BATCH = 2


@dataclass(frozen=True)
class OnnxPartSpec:
    """One exported part: its I/O names, the named dynamic axes and a dummy-input generator."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    dummy_inputs: Callable[[Any, int, int], tuple[np.ndarray, ...]]  # (model, batch, seed)


def pixel_size(model) -> tuple[int, int]:
    """(H, W) of the `pixel_values` the model's tower takes, from its preprocessing config."""
    return preprocess_config(model).size


def preprocess_config(model) -> PreprocessConfig:
    config = model.config
    return PreprocessConfig.for_tower(
        config.vision_config.model_type, config.vision_config.image_size, config.image_aspect_ratio
    )


def _random_pixels(model, batch: int, seed: int) -> tuple[np.ndarray]:
    """Random RGB images through the tower's own preprocessing: realistic value ranges."""
    height, width = pixel_size(model)
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(batch)]
    return (preprocess(images, preprocess_config(model)),)


VISION_SPEC = OnnxPartSpec(
    name="vision",
    inputs=("pixel_values",),  # (batch, 3, H, W) float32
    outputs=("image_embeds",),  # (batch, N, hidden) float32
    dynamic_axes=MappingProxyType({"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
    dummy_inputs=_random_pixels,
)


class _ImageEncoder(nn.Module):
    """`encode_images` without the LLM: only the tower and connector weights enter the graph."""

    def __init__(self, vision_tower: nn.Module, connector: nn.Module, layer, strategy: str, dtype: torch.dtype):
        super().__init__()
        self.vision_tower = vision_tower
        self.connector = connector
        self.layer = layer
        self.strategy = strategy
        self.compute_dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, C)
        features = self.vision_tower(pixel_values.to(self.compute_dtype), layer=self.layer, strategy=self.strategy)
        return self.connector(features).to(torch.float32)


def export_vision_onnx(
    model,
    out_path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    validate: bool = True,
    progress: bool = False,
    release_weights: bool = False,
) -> dict:
    """Write `model`'s vision tower + connector as an ONNX file; returns what was written and measured.

    `dtype` is the weight/compute type inside the graph (`fp32` or `fp16`); input and output are
    float32 either way. `opset` None takes torch's default. With `validate`, onnxruntime runs a
    batch of random preprocessed images and the result is compared with `model.encode_images`;
    the export fails (and writes nothing) when it disagrees beyond the stated tolerance.
    `release_weights`: once the graph is saved and PyTorch's side of the check computed, the
    tower and connector move to the meta device, so onnxruntime's copy of the weights is the only
    one in memory while it runs (the caller is done with them: export_bundle makes this graph last).
    """
    if dtype not in DTYPES:
        raise TinyLlavaError(f"ONNX vision dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    for part in ("vision_tower", "connector", "config"):
        if not hasattr(model, part):
            raise TinyLlavaError(f"export_vision_onnx needs a TinyLLaVA model; {type(model).__name__} has no {part}")
    import onnx
    from tqdm.auto import tqdm

    final = Path(out_path)
    if final.is_dir():
        raise TinyLlavaError(f"ONNX output path {final} is a directory; expected a file name such as vision.onnx")
    final.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4 if validate else 3, desc=f"vision ONNX ({dtype})", disable=not progress)

    encoder = _encoder(model, DTYPES[dtype])
    (dummy,) = VISION_SPEC.dummy_inputs(model, _VALIDATION_BATCH, 0)
    device = next(encoder.parameters()).device
    batch = torch.export.Dim(VISION_SPEC.dynamic_axes["pixel_values"][0], min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            encoder,
            (torch.from_numpy(dummy).to(device),),
            dynamo=True,
            input_names=list(VISION_SPEC.inputs),
            output_names=list(VISION_SPEC.outputs),
            opset_version=opset,
            dynamic_shapes={"pixel_values": {0: batch}},
            verbose=False,
        )
    steps.update()

    weight_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    external = weight_bytes > _EXTERNAL_DATA_ABOVE
    try:
        with staged_folder(final) as tmp_dir:
            staged = tmp_dir / final.name
            program.save(staged, external_data=external)
            del program  # it references every weight; nothing below needs it
            gc.collect()
            steps.update()
            # A path (not a proto) lets the checker follow external data past 2 GiB.
            onnx.checker.check_model(str(staged), full_check=True)
            steps.update()
            release = _releaser(model, encoder) if release_weights else None
            validation = _validate(model, staged, dtype, release) if validate else None
            if release is not None and not validate:
                release()
            if validate:
                steps.update()
            # Weights first, the graph last: the graph never points at missing data.
            extra = sorted(p for p in tmp_dir.iterdir() if p != staged)
            for path in extra:
                os.replace(path, final.parent / path.name)
            os.replace(staged, final)
    finally:
        steps.close()

    opset_used = next((o.version for o in onnx.load(str(final), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None)
    sizes = {final.name: final.stat().st_size, **{p.name: (final.parent / p.name).stat().st_size for p in extra}}
    embeds = validation["shape"] if validation else None
    n_tokens, hidden = _output_shape(model, embeds)
    return {
        "path": str(final),
        "external_data": [str(final.parent / p.name) for p in extra],
        "dtype": dtype,
        "io_dtype": "float32",
        "opset": opset_used,
        "inputs": list(VISION_SPEC.inputs),
        "outputs": list(VISION_SPEC.outputs),
        "dynamic_axes": {k: dict(v) for k, v in VISION_SPEC.dynamic_axes.items()},
        "image_size": list(pixel_size(model)),
        "n_tokens": n_tokens,
        "hidden": hidden,
        "size_bytes": sum(sizes.values()),
        "validation": validation,
    }


def _encoder(model, dtype: torch.dtype) -> _ImageEncoder:
    tower, connector = model.vision_tower, model.connector
    current = next(tower.parameters()).dtype
    if current != dtype:  # export a converted copy; the caller's model stays as it is
        tower, connector = copy.deepcopy(tower).to(dtype), copy.deepcopy(connector).to(dtype)
    config = model.config
    return _ImageEncoder(tower, connector, config.vision_feature_layer, config.vision_feature_select_strategy,
                         dtype).eval()


def _output_shape(model, validated: list[int] | None) -> tuple[int, int]:
    if validated is not None:
        return validated[1], validated[2]
    (one,) = VISION_SPEC.dummy_inputs(model, 1, 0)
    with torch.no_grad():
        out = model.encode_images(torch.from_numpy(one))
    return int(out.shape[1]), int(out.shape[2])


def _releaser(model, encoder: _ImageEncoder) -> Callable[[], None]:
    def release() -> None:
        for module in (model.vision_tower, model.connector, encoder):
            module.to("meta")
        gc.collect()
    return release


def _validate(model, path: Path, dtype: str, release: Callable[[], None] | None = None) -> dict:
    """onnxruntime on a random batch vs `model.encode_images`; raises past the tolerance. PyTorch
    runs first; `release` (if given) then frees its weights before onnxruntime loads the graph."""
    import onnxruntime as ort

    (pixels,) = VISION_SPEC.dummy_inputs(model, _VALIDATION_BATCH, 1)
    with torch.no_grad():
        want = model.encode_images(torch.from_numpy(pixels)).float().cpu().numpy()
    if release is not None:
        release()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # no pre-packed second copy of every matrix: the check runs the graph once
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(list(VISION_SPEC.outputs), {VISION_SPEC.inputs[0]: pixels})
    del session
    if got.shape != want.shape:
        raise TinyLlavaError(f"the ONNX vision graph returns shape {got.shape}; PyTorch gives {want.shape}")
    diff = np.abs(got.astype(np.float64) - want)
    scale = float(np.abs(want).max()) or 1.0
    report = {
        "batch": _VALIDATION_BATCH,
        "shape": list(got.shape),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / scale),  # relative to the largest reference value
        "min_token_cosine": float(token_cosine(got, want).min()),
    }
    if dtype == "fp32":
        report["tolerance"] = f"max_abs_diff <= {_FP32_REL_TOL:g} * max(1, max |reference|)"
        ok = report["max_abs_diff"] <= _FP32_REL_TOL * max(1.0, scale)
    else:
        report["tolerance"] = f"min_token_cosine >= {_FP16_MIN_COSINE}"
        ok = report["min_token_cosine"] >= _FP16_MIN_COSINE
    if not ok:
        raise TinyLlavaError(
            f"the {dtype} ONNX vision graph disagrees with PyTorch (max abs diff {report['max_abs_diff']:.3g}, "
            f"min token cosine {report['min_token_cosine']:.4f}); expected {report['tolerance']}"
        )
    return report


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows along the last axis (..., C) -> (...)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-30)
