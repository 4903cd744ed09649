"""tinyllava-edge: train, export, quantize and run small LLaVA-style vision-language models.

Importing this package is light: no torch. The model framework lives in
``tinyllava_edge.model`` (which needs the ``torch`` extra); ``tinyllava_edge.load`` (the runtime)
is imported on first use and runs a bundle without torch.
"""

from tinyllava_edge import offline
from tinyllava_edge.errors import TinyLlavaError

__version__ = "0.1.0"

# Before anything imports bitsandbytes, which would fetch a kernel from the Hugging Face Hub.
offline.install()

__all__ = ["TinyLlavaError", "__version__", "load"]


def __getattr__(name: str):
    if name == "load":
        from tinyllava_edge.runtime import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
