"""Resident memory: the process's peak, a peak per stage, and sizes written as "8GB".

Peak resident set size is what decides whether a stage fits a device (a 16 GB laptop, a Jetson
with 8 GB shared): pages of files that are memory-mapped and read count in it, as they do against
the device's memory. On Linux the peak so far is VmHWM of /proc/self/status, and writing "5" to
/proc/self/clear_refs lowers it to the current size, so each stage of an export gets its own peak
(`reset_peak_rss`); elsewhere only the process's peak is known and every stage reports that.

Standard library only: the edge runtime and the command lines' --help use it.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import sys

from tinyllava_edge.errors import TinyLlavaError

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (since the last `reset_peak_rss`).

    Linux: VmHWM of /proc/self/status. getrusage's ru_maxrss survives execve, so a process started
    from a larger one (a benchmark driver, a test run, a notebook) would report its parent's peak.
    Elsewhere getrusage (kB, bytes on macOS).
    """
    value = _status_field("VmHWM:")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int | None:
    """The current resident set size (Linux), None where it cannot be read."""
    return _status_field("VmRSS:")


def reset_peak_rss() -> bool:
    """Lower the recorded peak to the current resident size (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's malloc_trim),
    so that a stage starts from what is really held and its peak is its own: glibc keeps freed
    blocks of a stage that allocated gigabytes (torch.onnx, onnxruntime) mapped otherwise."""
    gc.collect()
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (musl and other libcs have none)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _status_field(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parse_size(text: str) -> int:
    """Bytes of "8GB", "7.5G", "6GiB", "512MB" or a plain number of bytes (GB = 10**9, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise TinyLlavaError(f"memory size {text!r} is not understood; write it as e.g. 8GB, 7.5GB or 6GiB")
    return int(float(match.group(1)) * _UNITS[unit])
