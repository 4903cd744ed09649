"""tinyllava-edge: train, export, quantize and run small LLaVA-style vision-language models.

Importing this package is light: no torch. The model framework lives in
``tinyllava_edge.model`` (which needs the ``torch`` extra).
"""

from .errors import TinyLlavaError

__version__ = "0.1.0"

__all__ = ["TinyLlavaError", "__version__"]
