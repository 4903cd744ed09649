"""`load(path, device="auto", revision=None, **options)`: a bundle or a checkpoint -> a :class:`~.vlm.VLM`.

`path` is a directory or a Hugging Face Hub repository id (`owner/name`, at `revision`), fetched
into the Hugging Face cache or found there (tinyllava_edge/hub.py: an existing folder wins; never
a pickle; with HF_HUB_OFFLINE=1 the cache only).

* a directory with ``manifest.json`` (written by tinyllava-export) runs on the ``edge`` backend:
  onnxruntime + llama.cpp, no torch;
* a directory with ``config.json`` (a checkpoint of any layout the model framework reads) runs on
  the ``torch`` backend.

`options` are the backend's (see EdgeBackend / TorchBackend) plus the VLM's own:
`image_cache_size` (embeddings of recent images kept, default 32; 0 turns the cache off),
`vision_batch_size` (images per encoder run in `generate_batch`, default 8) and
`allow_truncated_images` (default False: a truncated image file is refused with one sentence;
True decodes what it holds, the rest left blank, as tinyllava_edge/data/images.py says). An
unknown option raises, naming the known ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from tinyllava_edge.bundle import MANIFEST_NAME
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.hub import resolve_model
from tinyllava_edge.runtime.backend import BACKENDS
from tinyllava_edge.runtime.vlm import VLM

VLM_OPTIONS = ("image_cache_size", "vision_batch_size", "allow_truncated_images")
CONFIG = "config.json"


def backend_kind(path: str | os.PathLike) -> str:
    """"edge" for a bundle, "torch" for a checkpoint; one sentence for anything else."""
    folder = Path(path)
    if not folder.exists():
        raise TinyLlavaError(f"model path {folder} does not exist; expected a bundle directory (manifest.json) or a "
                             "checkpoint directory (config.json)")
    if not folder.is_dir():
        raise TinyLlavaError(f"model path {folder} is a file; expected a bundle directory (manifest.json) or a "
                             "checkpoint directory (config.json)")
    if (folder / MANIFEST_NAME).is_file():
        return "edge"
    if (folder / CONFIG).is_file():
        return "torch"
    raise TinyLlavaError(f"{folder} is neither a bundle (no {MANIFEST_NAME}) nor a checkpoint (no {CONFIG})")


def load(path: str | os.PathLike, device: str = "auto", revision: str | None = None, **options) -> VLM:
    """Load a bundle (edge backend, no torch) or a checkpoint (torch backend), a folder or a Hub
    repository id at `revision`, on `device` ("auto" | "cpu" | "cuda" | "jetson")."""
    path = resolve_model(path, revision)
    kind = backend_kind(path)
    vlm_options = {k: options.pop(k) for k in VLM_OPTIONS if k in options}
    backend = BACKENDS.get(kind)(path, device, **options)
    try:
        return VLM(backend, **vlm_options)
    except TinyLlavaError:
        backend.close()
        raise
