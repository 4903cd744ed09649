"""int4 (RTN) of a vision graph one MatMul weight at a time: what `quantize_onnx(..., "int4")` runs.

onnxruntime's MatMulNBitsQuantizer loads the whole float32 graph into a protobuf and keeps copies
while it works (bench-scale's SigLIP-so400m graph, 1.6 GB: 8.8 GiB peak, docs/bench.md "Memory").
Here the graph is read without its external data; each constant 2-D float32 weight of a MatMul is
read alone from `vision.onnx.data`, quantized by onnxruntime's own kernel
(`quantize_matmul_4bits`: blocks of `block_size` values along K, symmetric, the same numbers
its quantizer writes) and the MatMul becomes a com.microsoft MatMulNBits (inputs A, packed B
(N, K/block, block/2) uint8, scales (N * K/block); no zero points: symmetric means 8). The
remaining initializers (patch convolution, norms, biases: a few MB) are read in at the end.
Peak: the int4 graph plus one float32 matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def quantize_int4_streaming(src: Path, dst: Path, block_size: int) -> int:
    """Write `src` with its MatMul weights as MatMulNBits to `dst` (one file); returns how many."""
    import onnx
    from onnx import TensorProto, external_data_helper, helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    model = onnx.load(str(src), load_external_data=False)
    graph, base = model.graph, str(Path(src).parent)
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
