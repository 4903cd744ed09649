"""Resident memory: the process's peak, a peak per stage, and sizes written as "8GB".

Peak resident set size is what decides whether a stage fits a device (a 16 GB laptop, a Jetson
with 8 GB shared): pages of files that are memory-mapped and read count in it, as they do against
the device's memory. On Linux the peak so far is VmHWM of /proc/self/status; each stage of an
export gets its own peak from it and from sampling (`StagePeak`); elsewhere only the process's
peak is known and every stage reports that.

Standard library only: the edge runtime and the command lines' --help use it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import resource
import sys
import threading

from tinyllava_edge.errors import TinyLlavaError

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

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


class StagePeak:
    """The peak resident size of one stage of a process, without resetting the kernel's figure.

    Lowering VmHWM (/proc/self/clear_refs) would also lower what getrusage and `/usr/bin/time -v`
    report for the whole process, so it is left alone: when the process's peak (VmHWM) rose during
    the stage, that new peak is the stage's, exactly; otherwise a thread sampling VmRSS every
    `interval` seconds gives the stage's peak (a spike shorter than that may be missed; it was
    below an earlier stage's peak anyway).
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.high, self.sampled = interval, peak_rss_bytes(), rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, rss_bytes() or 0)

    def peak(self) -> int:
        """This stage's peak so far."""
        now = peak_rss_bytes()
        return now if now > self.high else max(self.sampled, rss_bytes() or 0)

    def close(self) -> None:
        self._stop.set()


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
_MADV_DONTNEED = 4  # Linux


def drop_mapped_pages(path: str | os.PathLike) -> int:
    """Take the resident pages of this process's read-only mappings of `path` out of its memory
    (madvise MADV_DONTNEED; Linux, else nothing); returns the bytes of mapping covered.

    For a file that a library maps and then copies from: llama.cpp repacks most of a Q4_K file's
    weights into its own buffer at load (CPU_REPACK, phi2-scale: 1.04 GiB) after reading them
    through the map, and those pages then stay counted in the process beside the copy. The file
    is unchanged and still mapped: a page that is read again comes back from the page cache.
    """
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            ranges = []
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == target and "w" not in fields[1]:
                    start, end = (int(v, 16) for v in fields[0].split("-"))
                    ranges.append((start, end))
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    covered = 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, end in ranges:
        if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            covered += end - start
    return covered


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
