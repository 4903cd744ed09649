"""GGUF quantization of the LLM through llama.cpp's own quantizer, and reading back what was written.

    quantize_gguf("bundle/llm-F16.gguf", "out/llm-Q4_K_M.gguf", "Q4_K_M")   # -> report dict
    tensor_types("out/llm-Q4_K_M.gguf")                                      # {name: "Q6_K", ...}

The math is llama.cpp's (`llama_model_quantize`, the quantizer `llama-quantize` runs, vendored by
llama-cpp-python): K-quants need rows that are a multiple of 256 values, so llama.cpp writes
narrower tensors in a fallback type (Q5_0 / Q8_0 / F16), and the mixes (`_M`) put some tensors
(output, attn_v, ffn_down) in a wider type on purpose. The report therefore lists the per-tensor
types *actually written*, read back with gguf's own reader, never the type that was asked for.

The source must be an F32 or F16 file (requantizing an already-quantized file compounds the
rounding: refused here, as llama.cpp refuses it by default).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tinyllava_edge.atomic import atomic_file
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry


@dataclass(frozen=True)
class GgufType:
    """One GGUF file type: its llama.cpp ftype constant (`LLAMA_FTYPE_*` in llama_cpp) and the
    nominal bits per weight of its main type (what the docs of llama.cpp's quantize tool say)."""

    name: str
    ftype_const: str
    bits: float


GGUF_TYPES: Registry[GgufType] = Registry("GGUF quant type")
for _t in (
    GgufType("F32", "LLAMA_FTYPE_ALL_F32", 32),
    GgufType("F16", "LLAMA_FTYPE_MOSTLY_F16", 16),
    GgufType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", 8.5),
    GgufType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", 6.56),
    GgufType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.5),
    GgufType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.5),
    GgufType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", 4.5),
):
    GGUF_TYPES.add(_t.name, _t)

_SOURCE_TYPES = ("F32", "F16", "BF16")  # what may be requantized


def gguf_type(name: str) -> GgufType:
    """The registered type `name` (exact key; an unknown one names the known ones)."""
    return GGUF_TYPES.get(name)


def tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """{tensor name: ggml type name} of a GGUF file, in file order, read with gguf.GGUFReader."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise TinyLlavaError(f"{path} is not a readable GGUF file ({exc})") from None
    return {t.name: t.tensor_type.name for t in reader.tensors}


def type_summary(types: dict[str, str], wanted: str) -> dict:
    """Counts per type, and which matrices are not in the main type asked for (fallbacks/mix)."""
    main = main_ggml_type(wanted)
    # norms and biases stay F32 in every type (llama.cpp quantizes 2-D weights only)
    other = {n: t for n, t in types.items() if t != main and not (t == "F32" and not n.endswith(".weight"))
             and not n.endswith("norm.weight")}
    return {"main_type": main, "counts": dict(sorted(Counter(types.values()).items())), "not_main_type": other}


def main_ggml_type(quant: str) -> str:
    """The ggml type most matrices get: Q4_K_M -> Q4_K, Q6_K -> Q6_K, Q8_0 -> Q8_0."""
    gguf_type(quant)
    return quant[:-2] if quant.endswith(("_M", "_S")) else quant


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, quant: str, *, n_threads: int | None = None) -> dict:
    """Write `src` (an F32/F16 GGUF) as `dst` in type `quant`; returns what was written.

    The file appears at `dst` only when llama.cpp finished it (written beside it under a
    temporary name, then renamed). Returns {path, quant, size, seconds, tensor_types, summary}.
    """
    import llama_cpp

    from tinyllava_edge.llamacpp import _install_log, _log_reason

    kind = gguf_type(quant)
    source, final = Path(src), Path(dst)
    if not source.is_file():
        raise TinyLlavaError(f"GGUF file {source} does not exist")
    types = tensor_types(source)
    matrix_types = {t for n, t in types.items() if t != "F32"}
    if not matrix_types <= set(_SOURCE_TYPES):
        raise TinyLlavaError(f"{source.name} is already quantized ({', '.join(sorted(matrix_types))}); quantize "
                             "from the F16 or F32 file")
    if final.is_dir():
        raise TinyLlavaError(f"GGUF output path {final} is a directory; expected a file name")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, kind.ftype_const)
    params.nthread = n_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1))
    _install_log()  # llama.cpp's chatter goes to the module's log buffer, not the terminal
    started = time.perf_counter()
    with atomic_file(final) as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise TinyLlavaError(f"llama.cpp could not quantize {source.name} to {quant} ({_log_reason()})")
    written = tensor_types(final)
    return {"path": str(final), "quant": quant, "size": final.stat().st_size,
            "seconds": time.perf_counter() - started, "tensor_types": written,
            "summary": type_summary(written, quant)}
