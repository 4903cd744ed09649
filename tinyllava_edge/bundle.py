"""The edge bundle's format, owned here because every stage shares it: export writes bundles,
quant turns one bundle into another, the runtime and the demo read them.

A bundle is a directory of model files (vision ONNX graphs, the LLM GGUF, the stock-llama.cpp
mmproj) and `manifest.json` (format_version 1), which ties the parts together. Layout (keys in
order):

    format_version  1
    created         UTC time, ISO 8601
    format, bits    what was asked: "gguf" | "onnx", 32 | 16 (export) or 8 | 4 ... (quant)
    source          {path, layout, sha256 (of the weights files together), files: [{name, size, sha256}],
                     hub: {repo_id, commit} when the checkpoint came from the Hugging Face Hub}
    model           {llm_family, llm_architecture, vision_tower, vision_model_type, connector,
                     hidden_size, image_tokens, image_token_index, vocab_size, tokenizer_size,
                     vision_feature_layer, vision_feature_select_strategy, image_aspect_ratio,
                     max_length}
    preprocess      PreprocessConfig.to_dict(): size, resize_mode, resample, image_mean,
                    image_std, rescale_factor, aspect, shortest_edge
    template        Template.to_dict(): name, system, image_slot, user_slot, assistant_slot,
                    separator, eos, generation_prompt, stop, label_style
    tokenizer       {bos_token_id, eos_token_id, pad_token_id, add_bos}
    files           [{name, role, format, quant, size, sha256, ...role facts}]; roles:
                    vision (+ vision_weights for external ONNX data), llm, mmproj
    skipped         [{role, reason}]: parts that were not written and why
    validation      {enabled, vision_onnx, llm, tokenizer, mmproj}: the figures measured at export
    vision_default  (quantized bundles) the vision graph the runtime runs by default
    quantization    (quantized bundles) what the quant stage did and the fidelity it measured
    tools           package versions that wrote the bundle

:func:`read_manifest` refuses a bundle whose files were changed or lost, or whose parts disagree
(image-embedding width, image-token count, image size), with one sentence naming both values.

Writing one: `tinyllava_edge.staging.check_destination` first (with :func:`is_bundle`, it refuses
to replace anything but a previous bundle); then a stage assembles the bundle in a staging folder
beside the destination (`tinyllava_edge.atomic.staged_folder`), records each file with
:func:`file_record`, writes the manifest with :func:`write_manifest`, and renames the folder into
place (`tinyllava_edge.atomic.replace_folder`), so an interrupted or failed run leaves nothing at
the destination. `tinyllava_edge.staging.source_record` hashes the checkpoint it came from.

No torch (or any model library) here: the edge runtime reads bundles with the standard library.
docs/architecture.md places this module among the stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinyllava_edge.atomic import write_text
from tinyllava_edge.errors import TinyLlavaError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_REQUIRED = ("format_version", "source", "model", "preprocess", "template", "files")
_OBJECTS = ("source", "model", "preprocess", "template")  # required keys whose value is a JSON object
_HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, role: str, fmt: str, quant: str, **facts: Any) -> dict:
    """One `files` entry: name, role, format, quant type, size, sha256, then role facts."""
    return {"name": path.name, "role": role, "format": fmt, "quant": quant, "size": path.stat().st_size,
            "sha256": sha256_file(path), **facts}


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """Write `folder/manifest.json` through a temporary name (a reader never sees half a file)."""
    return write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def is_bundle(folder: str | os.PathLike) -> bool:
    """True when `folder` holds a manifest.json that names this format (any version)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "files" in data


def read_manifest(bundle_dir: str | os.PathLike, *, check_hashes: bool = True) -> dict:
    """The manifest of a bundle, after checking that the bundle is whole and self-consistent.

    Checks, each failure raised as one TinyLlavaError sentence: the format version; that every
    file named exists with the recorded size and (unless `check_hashes` is False) sha256; that
    the parts agree: every vision graph's output width equals the LLM's `n_embd` (and the mmproj's
    projection width), its token count equals the model's image-token count, and its input size
    equals the preprocessing size.
    """
    folder = Path(bundle_dir)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise TinyLlavaError(f"bundle {folder} is not a directory")
    if not path.is_file():
        raise TinyLlavaError(f"{folder} holds no {MANIFEST_NAME}; expected a bundle written by tinyllava-export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TinyLlavaError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise TinyLlavaError(f"{path} holds a {type(manifest).__name__}; expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise TinyLlavaError(f"{path} has format_version {version!r}; this tinyllava-edge reads format_version "
                             f"{FORMAT_VERSION}")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise TinyLlavaError(f"{path} lacks {', '.join(missing)}")
    wrong = [key for key in _OBJECTS if not isinstance(manifest[key], dict)]
    if wrong:
        raise TinyLlavaError(f"{path} has {', '.join(wrong)} that {'is' if len(wrong) == 1 else 'are'} not a JSON "
                             "object; the file was changed after export")
    _check_files(folder, manifest["files"], check_hashes)
    check_parts(manifest)
    return manifest


def _check_files(folder: Path, files: Any, check_hashes: bool) -> None:
    if not isinstance(files, list) or not files:
        raise TinyLlavaError(f"{folder / MANIFEST_NAME} lists no files")
    for record in files:
        name = record.get("name") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise TinyLlavaError(f"{folder / MANIFEST_NAME} has a file entry without a plain file name: {record!r}")
        path = folder / name
        if not path.is_file():
            raise TinyLlavaError(f"bundle file {name} ({record.get('role')}) is missing from {folder}")
        size = path.stat().st_size
        if size != record.get("size"):
            raise TinyLlavaError(f"bundle file {name} has {size} bytes; the manifest records {record.get('size')}")
        if check_hashes:
            digest = sha256_file(path)
            if digest != record.get("sha256"):
                raise TinyLlavaError(f"bundle file {name} has sha256 {digest[:16]}…; the manifest records "
                                     f"{str(record.get('sha256'))[:16]}… (the file was changed after export)")


def check_parts(manifest: Mapping[str, Any]) -> None:
    """Raise when the recorded parts cannot work together (names both values)."""
    files = manifest["files"]
    model = manifest["model"]
    visions = [f for f in files if f.get("role") == "vision"]
    llms = [f for f in files if f.get("role") == "llm"]
    mmprojs = [f for f in files if f.get("role") == "mmproj"]
    size = _as_list(manifest["preprocess"].get("size", []))
    for vision in visions:
        if vision.get("n_tokens") != model.get("image_tokens"):
            raise TinyLlavaError(f"{vision['name']} gives {vision.get('n_tokens')} image tokens but the model records "
                                 f"{model.get('image_tokens')}")
        if vision.get("image_size") is not None and _as_list(vision["image_size"]) != size:
            raise TinyLlavaError(f"{vision['name']} takes {vision['image_size']} pixel images but the preprocessing "
                                 f"makes {size}")
        for llm in llms:
            if vision.get("hidden") != llm.get("n_embd"):
                raise TinyLlavaError(f"{vision['name']} gives {vision.get('hidden')}-wide image embeddings but "
                                     f"{llm['name']} has n_embd {llm.get('n_embd')}")
    for llm in llms:
        if llm.get("n_embd") != model.get("hidden_size"):
            raise TinyLlavaError(f"{llm['name']} has n_embd {llm.get('n_embd')} but the model records hidden size "
                                 f"{model.get('hidden_size')}")
        for mmproj in mmprojs:
            if mmproj.get("hidden") != llm.get("n_embd"):
                raise TinyLlavaError(f"{mmproj['name']} projects to {mmproj.get('hidden')} wide but {llm['name']} "
                                     f"has n_embd {llm.get('n_embd')}")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def files_by_role(manifest: Mapping[str, Any], role: str) -> list[dict]:
    """The `files` entries of one role (e.g. "vision", "llm", "mmproj"), in manifest order."""
    return [f for f in manifest["files"] if f.get("role") == role]
