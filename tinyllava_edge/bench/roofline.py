"""The decode roofline: how fast a memory-bound decoder could go on this machine.

Decoding one token reads every LLM weight once (the KV cache is small next to it at these
contexts), so tokens/s can be no higher than bandwidth / bytes read per token. The bandwidth
is measured the way decode uses memory: a large fp32 matrix-vector product (docs/architecture.md: ~30 GB/s
here for 1 GiB, drifting +-20 % over minutes, hence measured in the same run as what it divides).

    bw = measure_bandwidth()                      # bytes/s
    roofline_fraction(60.0, 400e6, bw)            # 60 tok/s x 400 MB / bw
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from tinyllava_edge.errors import TinyLlavaError

GIB = 1 << 30


def measure_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Median bytes/s of `repeats` fp32 GEMVs over a (n, n) matrix of `gib` GiB (first run excluded)."""
    n = int((gib * GIB / 4) ** 0.5)
    matrix = np.ones((n, n), dtype=np.float32)  # touched: every page is resident before timing
    vector = np.ones(n, dtype=np.float32)
    matrix @ vector  # warm-up (BLAS threads, page faults)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - t)
    nbytes = matrix.nbytes + vector.nbytes
    del matrix
    return {"bytes_per_s": nbytes / statistics.median(times), "matrix_bytes": nbytes, "repeats": repeats,
            "best_bytes_per_s": nbytes / min(times)}


def roofline_fraction(tokens_per_s: float | None, bytes_per_token: float | None, bytes_per_s: float) -> float | None:
    """decode tok/s x bytes read per token / bandwidth (1.0: memory-bound at the measured bandwidth)."""
    if tokens_per_s is None or bytes_per_token is None:
        return None
    if bytes_per_s <= 0:
        raise TinyLlavaError(f"bandwidth must be positive, got {bytes_per_s}")
    return tokens_per_s * bytes_per_token / bytes_per_s


def roofline_tokens_per_s(bytes_per_token: float, bytes_per_s: float) -> float:
    return bytes_per_s / bytes_per_token


def gguf_bytes_per_token(path: str | os.PathLike) -> int:
    """Bytes of weights one decode step reads from an LLM GGUF: every tensor, except that the
    token-embedding table is only looked up (one row) when a separate `output.weight` exists; with
    tied embeddings (Qwen2-0.5B) the table is the output matrix and is read whole."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(Path(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        total -= tensors["token_embd.weight"]
    return total


def checkpoint_llm_bytes_per_token(checkpoint: str | os.PathLike, bytes_per_param: float = 4.0) -> int:
    """The same count for a checkpoint's LLM in torch (fp32 by default), from config.json alone."""
    import json

    text = json.loads((Path(checkpoint) / "config.json").read_text())["text_config"]
    h, f, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    head_dim = text.get("head_dim") or h // heads
    vocab = text["vocab_size"]
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o and k, v
    per_layer = attn + 3 * h * f + 2 * h  # gate, up, down; two norms
    params = layers * per_layer + vocab * h + h  # output matrix (tied or not, read once) + final norm
    return int(params * bytes_per_param)
