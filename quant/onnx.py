"""Quantized variants of the vision + connector ONNX graph (`pixel_values` -> `image_embeds`).

    quantize_onnx("bundle/vision.onnx", "out/vision-int8.onnx", "int8")
    quantize_onnx(src, dst, "int4-gptq", calibration=pixel_batches)   # (n, 3, H, W) float32 arrays
    compare_onnx("vision.onnx", "vision-int8.onnx", pixels)            # -> max diff, token cosine

Schemes (registry `ONNX_SCHEMES`, exact keys), each onnxruntime's own quantizer:

* ``int8``: `quantize_dynamic` (weights int8 per tensor, activations quantized at run time:
  MatMulInteger + DynamicQuantizeLinear);
* ``int4``: RTN (round to nearest, blocks of 32 along K, symmetric) by onnxruntime's own kernel,
  the numbers of its MatMulNBitsQuantizer's default algorithm, one weight at a time
  (quant/onnx_int4.py; the quantizer itself holds the whole graph): MatMul weights become
  MatMulNBits, and the patch Conv's weight is stored int8 per output channel (weight-only,
  computed in float32: in a small tower it is most of the graph);
* ``int4-gptq``: the same quantizer with its GPTQ algorithm config (onnxruntime vendors the
  neural-compressor GPTQ code, CPU only), calibrated on real images.

Only MatMuls with constant weights are quantized (norms and attention's activation-activation
MatMuls stay fp32, and so does the patch Conv except in ``int4``'s weight storage). The fp16
variant is not a quantization of this file: it is exported from the checkpoint
(`export_vision_onnx(dtype="fp16")`, `--onnx-fp16`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyllava_edge.atomic import staged_folder
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry

INT4_BLOCK_SIZE = 32  # values per scale along K; onnxruntime's default and llama.cpp's Q4_0 block
COMPARE_BATCH = 2  # images per onnxruntime run in compare_onnx
GPTQ_MIN_CALIBRATION = 8  # images; fewer gives a Hessian too poor to beat RTN


@dataclass(frozen=True)
class OnnxScheme:
    name: str
    bits: int
    needs_calibration: bool
    run: Callable[..., None]  # (src Path, dst Path, calibration list | None) -> None


def _int8(src: Path, dst: Path, calibration) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _nbits(algo: str) -> Callable[..., None]:
    def run(src: Path, dst: Path, calibration) -> None:
        if algo == "RTN":  # one weight at a time (quant/onnx_int4.py): the numbers onnxruntime's RTN writes
            from tinyllava_edge.quant.onnx_int4 import quantize_int4_streaming

            quantize_int4_streaming(src, dst, INT4_BLOCK_SIZE, conv_int8=True)
            return
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

        config = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calibration),
                                                  block_size=128, percdamp=0.01, actorder=False, mse=False,
                                                  perchannel=True)
        model = onnx.load(str(src))
        quantizer = mq.MatMulNBitsQuantizer(model, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                            algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)

    return run


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of (n, 3, H, W) batches."""

    def __init__(self, batches: Sequence[np.ndarray]):
        self.batches = [np.ascontiguousarray(b, np.float32) for b in batches]
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"pixel_values": self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):  # the GPTQ path iterates the reader (a deep copy of it) instead of get_next
        return iter({"pixel_values": b} for b in self.batches)


ONNX_SCHEMES: Registry[OnnxScheme] = Registry("ONNX quant scheme")
ONNX_SCHEMES.add("int8", OnnxScheme("int8", 8, False, _int8))
ONNX_SCHEMES.add("int4", OnnxScheme("int4", 4, False, _nbits("RTN")))
ONNX_SCHEMES.add("int4-gptq", OnnxScheme("int4-gptq", 4, True, _nbits("GPTQ")))


@contextmanager
def _quiet() -> Iterable[None]:
    """onnxruntime.quantization logs every node at INFO and advice at WARNING on the root logger; keep errors."""
    names = ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization", "root")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in zip(names, levels):
            logging.getLogger(n).setLevel(level)


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, scheme: str, *,
                  calibration: Sequence[np.ndarray] | None = None) -> dict:
    """Write `src` quantized with `scheme` to `dst` (atomically); returns {path, scheme, size, seconds, ops}."""
    import onnx

    spec = ONNX_SCHEMES.get(scheme)
    source, final = Path(src), Path(dst)
    if not source.is_file():
        raise TinyLlavaError(f"ONNX file {source} does not exist")
    if spec.needs_calibration and (calibration is None or sum(len(b) for b in calibration) < GPTQ_MIN_CALIBRATION):
        raise TinyLlavaError(f"ONNX scheme {scheme!r} needs at least {GPTQ_MIN_CALIBRATION} calibration images "
                             "(pass calibration images, e.g. the shapes training split)")
    started = time.perf_counter()
    with staged_folder(final) as tmp:
        staged = tmp / final.name
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # GPTQ prints a progress bar
            spec.run(source, staged, calibration)
        # onnx.checker knows no com.microsoft ops (MatMulNBits); onnxruntime loading it is the check
        try:
            session(staged)
        except _ort_errors() as err:
            raise TinyLlavaError(f"onnxruntime cannot load the {scheme} graph of {source.name} "
                                 f"({str(err).splitlines()[0]})") from None
        os.replace(staged, final)
    ops: dict[str, int] = {}
    for node in onnx.load(str(final), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    quantized = {k: v for k, v in ops.items() if k in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear")}
    if not quantized:
        raise TinyLlavaError(f"quantizing {source.name} with {scheme!r} changed no MatMul; the graph has no "
                             "constant-weight MatMul to quantize")
    return {"path": str(final), "scheme": scheme, "size": final.stat().st_size,
            "seconds": time.perf_counter() - started, "quantized_ops": quantized}


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types (pybind classes deriving from Exception) and builtin ones."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (RuntimeError, ValueError, OSError, *own)


def session(path: str | os.PathLike, n_threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = n_threads
    # the checks run a graph a few times: no pre-packed second copy of every matrix
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_onnx(reference: str | os.PathLike, candidate: str | os.PathLike, pixels: np.ndarray) -> dict:
    """Both graphs on `pixels` (n, 3, H, W): max abs diff (and relative to the largest reference
    value), per-token cosine min/mean."""
    from tinyllava_edge.export.onnx_vision import token_cosine

    pixels = np.ascontiguousarray(pixels, np.float32)
    # one graph at a time, COMPARE_BATCH images at a time: 16 images of 384 px in one batch held
    # 3.7 GiB of activations at SigLIP-so400m's size (bench-scale, docs/bench.md "Memory")
    outputs = []
    for path in (reference, candidate):
        graph = session(path)
        outputs.append(np.concatenate([graph.run(["image_embeds"], {"pixel_values": pixels[i:i + COMPARE_BATCH]})[0]
                                       for i in range(0, len(pixels), COMPARE_BATCH)]))
        del graph
    want, got = outputs
    diff = float(np.abs(got.astype(np.float64) - want).max())
    cosine = token_cosine(got, want)
    return {"images": int(len(pixels)), "max_abs_diff": diff, "max_rel_diff": diff / (float(np.abs(want).max()) or 1.0),
            "min_token_cosine": float(cosine.min()), "mean_token_cosine": float(cosine.mean())}
