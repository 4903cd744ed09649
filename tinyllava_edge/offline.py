"""Nothing at run time reaches a network unless the user named a Hub repository id.

Naming one (`--model owner/name`, `load("owner/name")`) is an explicit request: tinyllava_edge/hub.py
looks it up and fetches what is not cached yet, and with HF_HUB_OFFLINE=1 reads the cache only. A
local folder never leads to a lookup. Everything below is about the rest of the stack.

Every path found where a library of the stack goes online on its own, and how it is stopped
here, deliberately (not by HF_HUB_OFFLINE, which users need not set). tests/test_offline.py runs
the stack with a socket guard and no offline variables: importing it, training a step, exporting,
loading a bundle and a checkpoint (4-bit too), serving the demo and the HTTP API.

* bitsandbytes (0.49+), when imported on a CPU with AVX512-BF16, asks the ``kernels`` package
  (installed with transformers 5) for ``kernels-community/quantization-bitsandbytes`` from the
  Hugging Face Hub, a faster 4-bit CPU matmul. transformers' Trainer imports it through peft, so
  every training run did. :func:`install` (run when ``tinyllava_edge`` is imported) hides
  ``kernels`` from that one module while it loads: bitsandbytes then uses its own CPU kernels.
  A process that imported bitsandbytes before ``tinyllava_edge`` has already asked.
* Gradio sends usage analytics and checks for a newer version when a page is built and launched:
  the demo builds its page with ``analytics_enabled=False`` (apps/demo.py).
* transformers takes a tokenizer path that does not exist for a hub repository id and looks it
  up online: ``load_tokenizer`` refuses a missing folder and reads with ``local_files_only``
  (model/tokenizer.py).

torch, onnxruntime, llama.cpp, peft, accelerate and the server's Starlette + uvicorn were not seen
to reach out (tinyllava-serve fetches no image URLs either: apps/serve/images.py).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

# The modules that fetch hub kernels when they are imported.
HUB_KERNEL_USERS = frozenset({"bitsandbytes.backends.cpu.ops"})
_ABSENT = object()


class _WithoutHubKernels(importlib.abc.MetaPathFinder):
    """Finds the modules of HUB_KERNEL_USERS as usual and runs them with `kernels` unimportable."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in HUB_KERNEL_USERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _KernelsHidden(spec.loader)
        return spec


class _KernelsHidden(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        saved = sys.modules.get("kernels", _ABSENT)
        sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError: no hub
        log = logging.getLogger(module.__name__)
        level = log.level
        log.setLevel(logging.ERROR)  # its "failed to load ... from kernels-community" warning
        try:
            self._loader.exec_module(module)
        finally:
            log.setLevel(level)
            if saved is _ABSENT:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = saved

    def __getattr__(self, name):  # get_source and the rest, for tracebacks and inspect
        return getattr(self._loader, name)


def install() -> None:
    """Put the import hook in place (once per process)."""
    if not any(isinstance(finder, _WithoutHubKernels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WithoutHubKernels())
