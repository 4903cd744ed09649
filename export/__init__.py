"""Exporters: vision+connector to ONNX, LLM to GGUF, mmproj, and the edge bundle that ties them together.

Importing this package is light (no torch): the names below load their module on first use.
`read_manifest` needs nothing beyond the standard library, so the edge runtime can use it.
"""

from importlib import import_module

_LAZY = {
    "export_bundle": ".bundle",
    "register_precision": ".bundle",
    "precision_for": ".bundle",
    "Precision": ".bundle",
    "PRECISIONS": ".bundle",
    "read_manifest": ".manifest",
    "check_parts": ".manifest",
    "files_by_role": ".manifest",
    "FORMAT_VERSION": ".manifest",
    "MANIFEST_NAME": ".manifest",
    "export_vision_onnx": ".onnx_vision",
    "write_llm_gguf": ".gguf_llm",
    "llm_logits_diff": ".gguf_llm",
    "write_mmproj_gguf": ".mmproj",
    "measure_mmproj": ".validate",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
