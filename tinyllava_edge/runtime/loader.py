"""`load(path, device="auto", **options)`: a bundle or a checkpoint directory -> a :class:`~.vlm.VLM`.

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


def load(path: str | os.PathLike, device: str = "auto", **options) -> VLM:
    """Load a bundle (edge backend, no torch) or a checkpoint (torch backend) on `device`
    ("auto" | "cpu" | "cuda" | "jetson")."""
    kind = backend_kind(path)
    vlm_options = {k: options.pop(k) for k in VLM_OPTIONS if k in options}
    backend = BACKENDS.get(kind)(path, device, **options)
    try:
        return VLM(backend, **vlm_options)
    except TinyLlavaError:
        backend.close()
        raise
