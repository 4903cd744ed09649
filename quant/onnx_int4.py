"""int4 (RTN) of a vision graph one MatMul weight at a time: what `quantize_onnx(..., "int4")` runs.

onnxruntime's MatMulNBitsQuantizer loads the whole float32 graph into a protobuf and keeps copies
while it works (bench-scale's SigLIP-so400m graph, 1.6 GB: 8.8 GiB peak, docs/bench.md "Memory").
Here the graph is read without its external data; each constant 2-D float32 weight of a MatMul is
read alone from `vision.onnx.data`, quantized by onnxruntime's own kernel
(`quantize_matmul_4bits`: blocks of `block_size` values along K, symmetric, the same numbers
its quantizer writes) and the MatMul becomes a com.microsoft MatMulNBits (inputs A, packed B
(N, K/block, block/2) uint8, scales (N * K/block); no zero points: symmetric means 8).

With ``conv_int8`` (what the ``int4`` scheme runs) each constant float32 convolution weight (the
patch embedding) is stored as int8, one symmetric scale per output channel, behind a
DequantizeLinear: weight-only, so the convolution still computes in float32. MatMulNBits has no
convolution form, and in a small tower the patch convolution is most of the graph (tiny-shapes:
1.5 of its 2.25 MiB, against 0.75 MiB of MatMul weights), so without this the int4 graph was
larger than int8's (1.61 against 0.56 MiB). At SigLIP-so400m dims it is 0.7 M of 400 M weights.

The remaining initializers (norms, biases, position embeddings: a few MB) are read in at the end.
Peak: the int4 graph plus one float32 matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def conv_weight_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale per output channel) of a (O, C, kH, kW) float32 weight,
    symmetric: weight ~= q * scale[:, None, None, None]."""
    peak = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale.reshape(-1, *([1] * (weight.ndim - 1)))), -127, 127).astype(np.int8)
    return q, scale


def quantize_int4_streaming(src: Path, dst: Path, block_size: int, conv_int8: bool = False) -> int:
    """Write `src` with its MatMul weights as MatMulNBits (and, with `conv_int8`, its convolution
    weights as int8 behind a DequantizeLinear) to `dst` (one file); returns how many MatMuls."""
    import onnx
    from onnx import TensorProto, external_data_helper, helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    model = onnx.load(str(src), load_external_data=False)
    graph, base = model.graph, str(Path(src).parent)
    # per-channel DequantizeLinear needs opset 13; an older graph keeps its convolutions in float32
    conv_int8 = conv_int8 and next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    initializers = {t.name: t for t in graph.initializer}
    used_elsewhere = {name for node in graph.node if node.op_type != "MatMul" for name in node.input}
    nodes, dropped, done = [], set(), 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT
                or weight.name in used_elsewhere):
            nodes.append(node)
            continue
        b = np.ascontiguousarray(numpy_helper.to_array(weight, base_dir=base))  # this matrix alone
        k, n = b.shape
        blocks = (k + block_size - 1) // block_size
        if blocks * block_size != k:
            b = np.pad(b, ((0, blocks * block_size - k), (0, 0)))
        packed = np.zeros((n, blocks, block_size // 2), dtype=np.uint8)
        scales = np.zeros((n, blocks), dtype=np.float32)
        zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)  # written, unused: symmetric
        quantize_matmul_4bits(packed, b, scales, zero_points, block_size, n, k, True)
        del b
        q_name, s_name = f"{weight.name}_Q4", f"{weight.name}_scales"
        graph.initializer.append(numpy_helper.from_array(packed, q_name))
        graph.initializer.append(numpy_helper.from_array(scales.reshape(-1), s_name))
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], list(node.output),
                                      name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block_size))
        dropped.add(weight.name)
        done += 1
    if conv_int8:
        nodes = _convs_int8(nodes, graph, initializers, base, dropped)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    for tensor in kept:
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, base)
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return done


def _convs_int8(nodes: list, graph, initializers: dict, base: str, dropped: set) -> list:
    """`nodes` with each Conv's constant 4-D float32 weight (used by that Conv alone) read from
    int8 + per-channel scales through a DequantizeLinear inserted before it."""
    from onnx import TensorProto, helper, numpy_helper

    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    out = []
    for node in nodes:
        weight = initializers.get(node.input[1]) if node.op_type == "Conv" and len(node.input) >= 2 else None
        if (weight is None or len(weight.dims) != 4 or weight.data_type != TensorProto.FLOAT
                or uses[weight.name] != 1 or weight.name in dropped):
            out.append(node)
            continue
        q, scale = conv_weight_int8(np.ascontiguousarray(numpy_helper.to_array(weight, base_dir=base)))
        q_name, s_name, w_name = f"{weight.name}_int8", f"{weight.name}_scale", f"{weight.name}_dequantized"
        graph.initializer.append(numpy_helper.from_array(q, q_name))
        graph.initializer.append(numpy_helper.from_array(scale, s_name))
        out.append(helper.make_node("DequantizeLinear", [q_name, s_name], [w_name], name=f"{node.name}_weight_dq",
                                    axis=0))
        node.input[1] = w_name
        out.append(node)
        dropped.add(weight.name)
    return out
