"""The contenders: what runs the model, with which files. A registry keyed by exact name.

Each turns (checkpoint, bundles, run settings) into a worker spec (see worker.py) and the files
it reads from disk. Every contender runs the same model and the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tinyllava_edge.registry import Registry


@dataclass(frozen=True)
class Contender:
    name: str
    family: str  # torch | edge | llama.cpp | mtmd: the groups of the table and plots
    runner: str  # worker.RUNNERS key
    gguf: str | None  # the LLM GGUF type it reads (None: the torch checkpoint)
    describe: str
    spec: Callable[[Path, Mapping[str, Path]], dict]  # (checkpoint, bundles) -> worker fields
    files: Callable[[Path, Mapping[str, Path]], list[Path]]  # what it reads from disk


def _weights(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.safetensors"))


def _manifest(bundle: Path) -> dict:
    import json

    return json.loads((bundle / "manifest.json").read_text())


def _role(bundle: Path, role: str, quant: str | None = None) -> Path:
    from tinyllava_edge.bundle import files_by_role

    records = [r for r in files_by_role(_manifest(bundle), role) if quant is None or r.get("quant") == quant]
    return bundle / records[0]["name"]


CONTENDERS: Registry[Contender] = Registry("bench contender")


def _torch(name: str, quantization: str | None, describe: str) -> None:
    options = {"quantization": quantization} if quantization else {}
    CONTENDERS.add(name, Contender(
        name, "torch", "vlm", None, describe,
        spec=lambda ckpt, b: {"model": str(ckpt), "options": dict(options)},
        files=lambda ckpt, b: _weights(ckpt)))


def _edge(quant: str, vision: str) -> None:
    CONTENDERS.add(f"edge {quant} / vision {vision}", Contender(
        f"edge {quant} / vision {vision}", "edge", "vlm", quant,
        f"tinyllava_edge.load(bundle) on llm-{quant}.gguf, {vision} vision ONNX",
        spec=lambda ckpt, b: {"model": str(b[quant]), "options": {"vision": vision}},
        files=lambda ckpt, b: [_role(b[quant], "llm"), _role(b[quant], "vision", vision)]))


def _raw(quant: str) -> None:
    CONTENDERS.add(f"llama.cpp {quant} (text)", Contender(
        f"llama.cpp {quant} (text)", "llama.cpp", "raw", quant,
        f"llama-cpp-python Llama on llm-{quant}.gguf, our prompt with random ids for the image rows",
        spec=lambda ckpt, b: {"gguf": str(_role(b[quant], "llm"))},
        files=lambda ckpt, b: [_role(b[quant], "llm")]))


def _mtmd(quant: str) -> None:
    CONTENDERS.add(f"mtmd {quant}", Contender(
        f"mtmd {quant}", "mtmd", "mtmd", quant,
        f"llama-cpp-python Llava15ChatHandler (stock mtmd) on llm-{quant}.gguf + the bundle's mmproj",
        spec=lambda ckpt, b: {"gguf": str(_role(b[quant], "llm")), "mmproj": str(_role(b[quant], "mmproj"))},
        files=lambda ckpt, b: [_role(b[quant], "llm"), _role(b[quant], "mmproj")]))


_torch("torch fp32", None, "tinyllava_edge.load(checkpoint): transformers eager, fp32")
_torch("torch nf4", "nf4", "tinyllava_edge.load(checkpoint, quantization='nf4'): bitsandbytes NF4 LLM linears")
for _quant in ("F16", "Q8_0", "Q4_K_M"):
    _edge(_quant, "fp32")
    if _quant != "F16":
        _edge(_quant, "int8")
for _quant in ("F16", "Q8_0", "Q4_K_M"):
    _raw(_quant)
for _quant in ("F16", "Q4_K_M"):
    _mtmd(_quant)

DEFAULT_CONTENDERS = tuple(CONTENDERS)
