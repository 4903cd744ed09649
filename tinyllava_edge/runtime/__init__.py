"""One runtime for CPU, CUDA and Jetson: `load(path, device)` -> a VLM with generate / stream / chat.

    import tinyllava_edge
    vlm = tinyllava_edge.load("bundles/tiny-shapes")            # device="auto"
    print(vlm.generate("photo.jpg", "What is in the picture?"))

A bundle runs on onnxruntime + llama.cpp (``EdgeBackend``: numpy, pillow, onnxruntime and
llama-cpp-python only, never torch); a checkpoint on transformers (``TorchBackend``). Devices
(runtime/devices.py) are detected and planned the same way for both.

Nothing in this package imports torch at module level.
"""

from tinyllava_edge.runtime.backend import BACKENDS
from tinyllava_edge.runtime.chat import OVERFLOW_POLICIES, ChatSession
from tinyllava_edge.runtime.devices import DEVICES, DevicePlan, Hardware, Probes, detect, plan_device
from tinyllava_edge.runtime.loader import backend_kind, load
from tinyllava_edge.runtime.sampling import sampling_params
from tinyllava_edge.runtime.stats import GenerationStats
from tinyllava_edge.runtime.vlm import VLM

__all__ = [
    "BACKENDS",
    "DEVICES",
    "OVERFLOW_POLICIES",
    "ChatSession",
    "DevicePlan",
    "GenerationStats",
    "Hardware",
    "Probes",
    "VLM",
    "backend_kind",
    "detect",
    "load",
    "plan_device",
    "sampling_params",
]
