"""Exporters: vision+connector to ONNX, LLM to GGUF, mmproj, and the 16/32-bit edge bundle that ties
them together.

Importing this package is light (no torch): the names below load their module on first use. The
bundle format itself (manifest, reading it back, staging) is `tinyllava_edge.bundle`, which every
stage shares; quantized bundles come from `tinyllava_edge.quant`.
"""

from importlib import import_module

_LAZY = {
    "export_bundle": "tinyllava_edge.export.bundle",
    "precision_for": "tinyllava_edge.export.bundle",
    "Precision": "tinyllava_edge.export.bundle",
    "PRECISIONS": "tinyllava_edge.export.bundle",
    "export_vision_onnx": "tinyllava_edge.export.onnx_vision",
    "write_llm_gguf": "tinyllava_edge.export.gguf_llm",
    "llm_logits_diff": "tinyllava_edge.export.gguf_llm",
    "write_mmproj_gguf": "tinyllava_edge.export.mmproj",
    "measure_mmproj": "tinyllava_edge.export.validate",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
