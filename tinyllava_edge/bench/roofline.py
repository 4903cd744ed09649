"""The decode roofline: how fast a memory-bound decoder could go on this machine.

Decoding one token reads every LLM weight once (the KV cache is small next to it at these
contexts), so tokens/s can be no higher than bandwidth / bytes read per token. The bandwidth is
the best of two probes over a 1 GiB buffer, each the median of its repeats: a multi-threaded
streaming read (each of `threads` threads takes a contiguous slice and reads it once with a BLAS
dot product, as llama.cpp's threads split a weight matrix) and an fp32 matrix-vector product.
The GEMV alone underestimated: on an AMD EPYC 2-core machine it read 28.6 GB/s while F16 decode
implied >= 33 GB/s (fraction 1.21-1.24). The bench then takes the larger of that and the highest
bytes/s any contender's decode shows (`bandwidth_ceiling`), so no fraction exceeds 1, and says
which set it. Drifting +-20 % over minutes, it is measured in the same run as what it divides.

    bw = measure_bandwidth(threads=2)             # {"bytes_per_s": ..., "probe": "stream read" | "gemv"}
    roofline_fraction(60.0, 400e6, bw["bytes_per_s"])   # 60 tok/s x 400 MB / bw
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tinyllava_edge.errors import TinyLlavaError

GIB = 1 << 30


def _gemv_times(gib: float, repeats: int) -> tuple[int, list[float]]:
    n = int((gib * GIB / 4) ** 0.5)
    matrix = np.ones((n, n), dtype=np.float32)  # touched: every page is resident before timing
    vector = np.ones(n, dtype=np.float32)
    matrix @ vector  # warm-up (BLAS threads, page faults)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - t)
    return matrix.nbytes + vector.nbytes, times


def _stream_times(gib: float, repeats: int, threads: int) -> tuple[int, list[float]]:
    """Each of `threads` threads reads its slice of one buffer once per repeat (a dot product of the
    slice with itself: one pass, no write; numpy lets go of the GIL inside BLAS)."""
    buffer = np.ones(int(gib * GIB / 4), dtype=np.float32)
    slices = np.array_split(buffer, max(1, threads))
    start = threading.Barrier(len(slices) + 1)
    done = threading.Barrier(len(slices) + 1)
    stop = False

    def reader(part: np.ndarray) -> None:
        while True:
            start.wait()
            if stop:
                return
            part @ part
            done.wait()

    workers = [threading.Thread(target=reader, args=(part,), daemon=True) for part in slices]
    for worker in workers:
        worker.start()
    times = []
    for i in range(repeats + 1):  # the first pass is a warm-up
        t = time.perf_counter()
        start.wait()
        done.wait()
        if i:
            times.append(time.perf_counter() - t)
    stop = True
    start.wait()
    for worker in workers:
        worker.join()
    return buffer.nbytes, times


def measure_bandwidth(gib: float = 1.0, repeats: int = 7, threads: int | None = None) -> dict:
    """Bytes/s: the better of a `threads`-thread streaming read and an fp32 GEMV over `gib` GiB
    (medians of `repeats`, a warm-up excluded); both probes' figures are in the result."""
    threads = threads or os.cpu_count() or 1
    probes = {}
    for name, (nbytes, times) in (("stream read", _stream_times(gib, repeats, threads)),
                                  ("gemv", _gemv_times(gib, repeats))):
        probes[name] = {"bytes_per_s": nbytes / statistics.median(times), "best_bytes_per_s": nbytes / min(times),
                        "bytes": nbytes}
    best = max(probes, key=lambda k: probes[k]["bytes_per_s"])
    return {"bytes_per_s": probes[best]["bytes_per_s"], "probe": best, "threads": threads, "repeats": repeats,
            "probes": probes}


def bandwidth_ceiling(measured: float, contenders: Iterable[tuple[float | None, float | None]]) -> tuple[float, str]:
    """(bytes/s, what set it): the measured bandwidth, or the highest bytes/s a contender's decode
    shows (tok/s x bytes per token) when that is higher: a decoder cannot read faster than the
    memory, so a probe below it underestimated."""
    best, source = measured, "probe"
    for tokens_per_s, bytes_per_token in contenders:
        if tokens_per_s is not None and bytes_per_token is not None and tokens_per_s * bytes_per_token > best:
            best, source = tokens_per_s * bytes_per_token, "contender"
    return best, source


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
