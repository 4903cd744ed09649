"""The models a demo offers: variants found on disk, their size, and a model card for each.

A variant is a directory the runtime loads: a bundle (``manifest.json``, edge backend) or a
checkpoint (``config.json``, torch backend). :func:`discover` turns what the user pointed at into
variants:

* a bundle or a checkpoint, a folder or a Hugging Face Hub repository id (tinyllava_edge/hub.py):
  that one;
* a directory whose children are bundles / checkpoints (``bundle-F16/``, ``bundle-Q8_0/``,
  ``model/``): each of them;
* nothing given: the default bundle ``runs/tiny-shapes/bundle`` plus every sibling of it that is
  a bundle or a checkpoint (``runs/tiny-shapes/model``, ``runs/tiny-shapes/bundle-Q8_0``...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tinyllava_edge.bundle import MANIFEST_NAME
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.hub import repo_of, resolve_model
from tinyllava_edge.runtime.loader import CONFIG, backend_kind
from tinyllava_edge.sizes import human_size

DEFAULT_WORKDIR = Path("runs/tiny-shapes")
DEFAULT_BUNDLE = DEFAULT_WORKDIR / "bundle"
MAIN_JOB = "bash scripts/main.sh"
REVISION_WITHOUT_MODEL = "--revision names a revision of --model given as a Hub repository id; no --model was given"


@dataclass(frozen=True)
class Variant:
    name: str  # what the selector shows, unique among the variants offered
    path: Path
    kind: str  # "edge" (bundle) | "torch" (checkpoint)

    @property
    def label(self) -> str:
        backend = "bundle" if self.kind == "edge" else "checkpoint"
        return f"{self.name} ({backend}, {human_size(disk_size(self.path))})"


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_NAME).is_file() or (path / CONFIG).is_file())


def _children(folder: Path) -> list[Variant]:
    return [Variant(child.name, child, backend_kind(child))
            for child in sorted(folder.iterdir()) if _is_model_dir(child)]


def discover(model: str | Path | None, default_bundle: Path = DEFAULT_BUNDLE,
             revision: str | None = None) -> list[Variant]:
    """The variants to offer, the first being the one served at start; one sentence when there are none.
    `revision`: of `model` given as a Hub repository id."""
    if model is None:
        if revision is not None:
            raise TinyLlavaError(REVISION_WITHOUT_MODEL)
        bundle = Path(default_bundle)
        if not _is_model_dir(bundle):
            raise TinyLlavaError(f"no --model given and the default bundle {bundle} does not exist; run the main job "
                                 f"first ({MAIN_JOB}) or pass --model PATH (a bundle or a checkpoint)")
        others = [v for v in _children(bundle.parent) if v.path != bundle]
        return [Variant(bundle.name, bundle, backend_kind(bundle)), *others]
    path = resolve_model(model, revision)
    if _is_model_dir(path):
        return [Variant(repo_of(path) or path.name or str(path), path, backend_kind(path))]
    if path.is_dir():
        found = _children(path)
        if found:
            return found
        raise TinyLlavaError(f"{path} is neither a bundle (no {MANIFEST_NAME}) nor a checkpoint (no {CONFIG}), and "
                             "none of its subdirectories is one")
    backend_kind(path)  # raises the runtime's sentence: missing, or a file
    raise AssertionError("unreachable: backend_kind accepts only directories")


def disk_size(path: Path) -> int:
    """Bytes of the files a variant loads: a bundle's listed files, a checkpoint's top-level files
    (trainer sub-checkpoints such as checkpoint-1200/ are not part of the model)."""
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", [])
        return sum(int(f.get("size", 0)) for f in files) + manifest.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _quantization_lines(quantization: dict, manifest: dict) -> list[str]:
    """What the quant stage did to a bundle, and how close it stayed to its source (the manifest's record)."""
    llm = quantization.get("llm", {})
    lines = [f"**Quantized** from a bundle made {quantization.get('source_created', '?')}: LLM {llm.get('from', '?')} "
             f"-> {llm.get('type', '?')}"
             + (f", mmproj -> {quantization['mmproj'].get('type')}" if isinstance(quantization.get("mmproj"), dict)
                else "")
             + (f", vision graph by default: {manifest['vision_default']}" if manifest.get("vision_default") else "")]
    fidelity = llm.get("fidelity")
    if isinstance(fidelity, dict):
        shown = ", ".join(f"{k} {_figure(v)}" for k, v in fidelity.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool))
        lines.append(f"- LLM against its source: {shown}")
    for scheme, figures in (quantization.get("vision") or {}).items():
        if isinstance(figures, dict) and "mean_token_cosine" in figures:
            lines.append(f"- vision {scheme} against fp32: mean token cosine {_figure(figures['mean_token_cosine'])}")
    return lines


def model_card(variant: Variant) -> str:
    """Markdown: what the variant is, its files, and the fidelity measured at export (or the config)."""
    lines = [f"### {variant.name}", f"`{variant.path}` · {human_size(disk_size(variant.path))} on disk"]
    if variant.kind == "edge":
        manifest = json.loads((variant.path / MANIFEST_NAME).read_text())
        model = manifest.get("model", {})
        lines += ["", f"**Bundle** format {manifest.get('format', '?')}, {manifest.get('bits', '?')}-bit, "
                      f"created {manifest.get('created', '?')}",
                  f"LLM {model.get('llm_family', '?')} · vision {model.get('vision_tower', '?')} · connector "
                  f"{model.get('connector', '?')} · hidden {model.get('hidden_size', '?')} · "
                  f"{model.get('image_tokens', '?')} image tokens · context {model.get('max_length', '?')}",
                  "", "| file | role | quant | size |", "|---|---|---|---|"]
        lines += [f"| {f.get('name')} | {f.get('role', '')} | {f.get('quant', '')} | {human_size(f.get('size', 0))} |"
                  for f in manifest.get("files", [])]
        quantization = manifest.get("quantization")
        if isinstance(quantization, dict):
            lines += ["", *_quantization_lines(quantization, manifest)]
        validation = manifest.get("validation", {})
        at_export = "measured at export, on the bundle it was quantized from" if quantization else "measured at export"
        lines += ["", f"**Fidelity against PyTorch ({at_export})**"]
        if not validation.get("enabled", bool(validation)):
            lines.append("not measured (exported without verification)")
        for part, figures in validation.items():
            if isinstance(figures, dict):
                shown = ", ".join(f"{k} {_figure(v)}" for k, v in figures.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool))
                lines.append(f"- {part}: {shown or json.dumps(figures)[:200]}")
        for skipped in manifest.get("skipped", []):
            lines.append(f"- skipped: {skipped if isinstance(skipped, str) else json.dumps(skipped)[:200]}")
        source = manifest.get("source", {})
        if source:
            lines += ["", f"Source checkpoint `{source.get('path', '?')}` ({source.get('layout', '?')}, sha256 "
                          f"{str(source.get('sha256', '?'))[:12]}…)"]
    else:
        config = json.loads((variant.path / CONFIG).read_text())
        text = config.get("text_config", {})
        vision = config.get("vision_config", {})
        lines += ["", f"**Checkpoint** ({config.get('model_type', '?')}), runs on transformers",
                  f"LLM {text.get('model_type', '?')} · hidden {text.get('hidden_size', '?')} · "
                  f"{text.get('num_hidden_layers', '?')} layers · vision {vision.get('model_type', '?')} "
                  f"{vision.get('image_size', '?')} px · connector {config.get('connector_type', '?')}"]
        summary = variant.path / "train_summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            shown = ", ".join(f"{k} {_figure(v)}" for k, v in data.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool))
            lines += ["", f"**Training summary**: {shown}"]
    return "\n".join(lines)
