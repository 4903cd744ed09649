"""Devices: what this machine has, and how each part of a bundle runs on the device asked for.

    hardware = detect()                       # probes the real machine
    plan = plan_device("auto", hardware, kv_bytes_per_token=..., weights_bytes=..., max_context=2048)
    plan.providers, plan.n_gpu_layers, plan.n_threads, plan.n_ctx

Devices are exact names: ``cpu``, ``cuda``, ``jetson``, ``auto``.

* **Jetson**: ``/etc/nv_tegra_release`` exists, or ``/proc/device-tree/model`` contains
  "NVIDIA Jetson" (L4T writes both).
* **CUDA**: onnxruntime lists ``CUDAExecutionProvider`` (or ``TensorrtExecutionProvider``) in
  ``get_available_providers()``, or llama.cpp reports ``llama_supports_gpu_offload()``.
* ``auto`` picks ``jetson`` on a Jetson with a GPU path, else ``cuda`` where one exists, else ``cpu``.
  Asking for ``cuda`` or ``jetson`` where it is not found raises one sentence saying what was
  found. Where only one of the two libraries has the GPU (a CPU-only llama-cpp-python wheel
  beside onnxruntime-gpu is common), that part runs on the CPU and ``plan.notes`` says so.

Per-device defaults:

=========  ===========================================  ==============  ==========================
device     onnxruntime providers (those available)      n_gpu_layers    memory that bounds n_ctx
=========  ===========================================  ==============  ==========================
jetson     TensorRT -> CUDA -> CPU                      all             MemAvailable (unified)
cuda       CUDA -> CPU                                  all             free GPU memory
cpu        CPU                                          0               MemAvailable
=========  ===========================================  ==============  ==========================

Threads: the physical cores this process may run on (``psutil`` when present, else
``/proc/cpuinfo``, capped by ``os.sched_getaffinity``), and no more than ``OMP_NUM_THREADS``
when that is set: the user's own limit wins.

Context length: the KV cache may take ``MEMORY_FRACTION`` of the bounding memory once the weights
are counted; ``n_ctx`` is the most positions that fit, rounded down to a multiple of 256 (what
llama.cpp allocates anyway), capped by the model's trained context.

Every probe is injectable (:class:`Probes`: a root directory for the files, callables for the
libraries) so tests can simulate a Jetson or a CUDA host on any machine. Nothing here imports
torch.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinyllava_edge.errors import TinyLlavaError

DEVICES = ("auto", "cpu", "cuda", "jetson")
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
# Provider order per device: the first available one that can run a node takes it.
PROVIDER_ORDER = {"jetson": (TENSORRT_EP, CUDA_EP, CPU_EP), "cuda": (CUDA_EP, CPU_EP), "cpu": (CPU_EP,)}
# llama.cpp clamps n_gpu_layers to the model's layer count (+ output layer): a large number means all.
ALL_LAYERS = 999
MEMORY_FRACTION = 0.5  # of the bounding memory left after the weights, for the KV cache
CONTEXT_STEP = 256  # llama.cpp rounds n_ctx up to a multiple of 256 (measured with 0.3.36)
JETSON_MARKER = "NVIDIA Jetson"


def _default_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _default_gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _default_gpu_memory() -> int | None:
    """Free memory (bytes) of the first CUDA GPU from nvidia-smi, or None when it cannot tell."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * 1024 * 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _default_physical_cores() -> int:
    """Physical cores among the CPUs this process may use."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = _cpuinfo_cores(Path("/proc/cpuinfo"))
    return max(1, min(allowed, physical or allowed))


def _cpuinfo_cores(path: Path) -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where it lists none (ARM)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return len(cores) or None


@dataclass(frozen=True)
class Probes:
    """Where detection looks. `root` prefixes /etc and /proc; each callable replaces one library query."""

    root: Path = Path("/")
    ort_providers: Callable[[], list[str]] = _default_providers
    gpu_offload: Callable[[], bool] = _default_gpu_offload
    gpu_memory: Callable[[], int | None] = _default_gpu_memory
    physical_cores: Callable[[], int] = _default_physical_cores


@dataclass(frozen=True)
class Hardware:
    """What detection found."""

    jetson: str | None  # the board's model string (or the L4T release line); None off a Jetson
    ort_providers: tuple[str, ...]
    llama_gpu: bool
    physical_cores: int
    mem_available: int | None  # bytes, /proc/meminfo MemAvailable
    gpu_mem_free: int | None  # bytes, where known

    @property
    def ort_gpu(self) -> bool:
        return CUDA_EP in self.ort_providers or TENSORRT_EP in self.ort_providers

    @property
    def has_gpu(self) -> bool:
        return self.ort_gpu or self.llama_gpu

    def describe(self, board: bool = True) -> str:
        llama = "with GPU offload" if self.llama_gpu else "without GPU offload"
        text = f"onnxruntime providers {', '.join(self.ort_providers) or 'none'}, llama.cpp {llama}"
        if not board:
            return text
        return f"{f'a Jetson ({self.jetson})' if self.jetson else 'no Jetson'}, {text}"


def _read(root: Path, relative: str) -> str | None:
    try:
        return (root / relative).read_bytes().decode("utf-8", "replace").replace("\0", "").strip()
    except OSError:
        return None


def _mem_available(root: Path) -> int | None:
    text = _read(root, "proc/meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                return int(parts[1]) * 1024  # kB
            except (IndexError, ValueError):
                return None
    return None


def detect(probes: Probes | None = None) -> Hardware:
    """Probe the machine (or what `probes` simulate)."""
    probes = probes or Probes()
    root = Path(probes.root)
    jetson = None
    model = _read(root, "proc/device-tree/model")
    if model and JETSON_MARKER in model:
        jetson = model
    else:
        release = _read(root, "etc/nv_tegra_release")
        if release is not None:
            jetson = release.splitlines()[0] if release else "nv_tegra_release"
    providers = tuple(probes.ort_providers())
    llama_gpu = bool(probes.gpu_offload())
    has_gpu = llama_gpu or CUDA_EP in providers or TENSORRT_EP in providers
    return Hardware(
        jetson=jetson,
        ort_providers=providers,
        llama_gpu=llama_gpu,
        physical_cores=max(1, int(probes.physical_cores())),
        mem_available=_mem_available(root),
        gpu_mem_free=probes.gpu_memory() if has_gpu and jetson is None else None,
    )


def resolve_device(device: str, hardware: Hardware) -> str:
    """`device` as asked ("auto" resolved), or one TinyLlavaError saying what was found."""
    if device not in DEVICES:
        raise TinyLlavaError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        if hardware.jetson and hardware.has_gpu:
            return "jetson"
        return "cuda" if hardware.has_gpu else "cpu"
    if device == "jetson" and not hardware.jetson:
        raise TinyLlavaError(f"device 'jetson' was asked for but this machine is not a Jetson (no "
                             f"/etc/nv_tegra_release, no {JETSON_MARKER!r} in /proc/device-tree/model; found "
                             f"{hardware.describe(board=False)})")
    if device in ("cuda", "jetson") and not hardware.has_gpu:
        raise TinyLlavaError(f"device {device!r} was asked for but no CUDA was found ({hardware.describe()})")
    return device


@dataclass(frozen=True)
class DevicePlan:
    """How a bundle runs: onnxruntime providers, llama.cpp layers on the GPU, threads, context."""

    device: str
    providers: tuple[str, ...]
    n_gpu_layers: int
    n_threads: int
    n_ctx: int
    memory_bound: int | None  # bytes of the memory that bounded n_ctx (None: unknown, model cap used)
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        return {"device": self.device, "providers": list(self.providers), "n_gpu_layers": self.n_gpu_layers,
                "n_threads": self.n_threads, "n_ctx": self.n_ctx, "memory_bound": self.memory_bound,
                "notes": list(self.notes)}


def default_threads(hardware: Hardware | None = None) -> int:
    """Physical cores (`hardware`'s, or this machine's when None), capped by OMP_NUM_THREADS when
    the user set it."""
    threads = hardware.physical_cores if hardware is not None else _default_physical_cores()
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        threads = min(threads, int(limit))
    return max(1, threads)


def fit_context(memory: int | None, weights_bytes: int, kv_bytes_per_token: int, max_context: int,
                min_context: int) -> int:
    """The longest context (multiple of CONTEXT_STEP, <= max_context) whose KV cache fits `memory`.

    Raises when not even `min_context` positions fit (the weights alone may not).
    """
    if memory is None or kv_bytes_per_token <= 0:
        return max_context
    budget = (memory - weights_bytes) * MEMORY_FRACTION
    fits = int(budget // kv_bytes_per_token) if budget > 0 else 0
    n_ctx = min(max_context, fits // CONTEXT_STEP * CONTEXT_STEP)
    if n_ctx < min_context:
        raise TinyLlavaError(
            f"the model does not fit: {memory / 2**20:.0f} MiB of memory available, the weights take "
            f"{weights_bytes / 2**20:.0f} MiB and {min_context} context positions another "
            f"{min_context * kv_bytes_per_token / 2**20:.1f} MiB at most {MEMORY_FRACTION:.0%} of what is left"
        )
    return n_ctx


def plan_device(device: str, hardware: Hardware, *, kv_bytes_per_token: int, weights_bytes: int, max_context: int,
                min_context: int = 1, n_threads: int | None = None, n_ctx: int | None = None,
                n_gpu_layers: int | None = None) -> DevicePlan:
    """The per-device defaults for one model, any of which the caller may set instead."""
    chosen = resolve_device(device, hardware)
    notes: list[str] = []
    providers = tuple(p for p in PROVIDER_ORDER[chosen] if p in hardware.ort_providers or p == CPU_EP)
    gpu = chosen in ("cuda", "jetson")
    if gpu and not hardware.ort_gpu:
        notes.append("onnxruntime has no CUDA provider here: the vision encoder runs on the CPU")
    if gpu and not hardware.llama_gpu:
        notes.append("llama.cpp was built without GPU offload: the LLM runs on the CPU")
    layers = n_gpu_layers if n_gpu_layers is not None else (ALL_LAYERS if gpu and hardware.llama_gpu else 0)
    if chosen == "cuda" and hardware.llama_gpu and layers:
        memory = hardware.gpu_mem_free if hardware.gpu_mem_free is not None else hardware.mem_available
    else:  # CPU, or a Jetson's unified memory
        memory = hardware.mem_available
    if n_ctx is not None:
        if n_ctx < min_context:
            raise TinyLlavaError(f"n_ctx {n_ctx} is too small: a prompt with an image needs at least {min_context}")
        if n_ctx > max_context:
            raise TinyLlavaError(f"n_ctx {n_ctx} exceeds the model's context of {max_context} positions")
        context = n_ctx
    else:
        context = fit_context(memory, weights_bytes, kv_bytes_per_token, max_context, min_context)
    threads = n_threads if n_threads is not None else default_threads(hardware)
    if threads < 1:
        raise TinyLlavaError(f"n_threads must be at least 1, got {threads}")
    return DevicePlan(chosen, providers, layers, threads, context, memory, tuple(notes))


def cpu_model_name() -> str:
    """The CPU's model name as `lscpu` prints it (benchmarks name it beside every figure);
    platform.processor() where /proc/cpuinfo has no model name (ARM, macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
