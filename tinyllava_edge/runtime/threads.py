"""How many llama.cpp threads to run now: the cores other processes leave free.

llama.cpp's CPU threads meet at a barrier after every operation of the graph, waiting by spinning.
When another CPU-bound process takes one of their cores, the thread that shares it is descheduled
for whole time slices while the others spin, and every token waits for it: on a 2-core machine
with one busy process, decode at 2 threads fell to 0.02x its idle rate (docs/runtime.md), while
one thread on the free core keeps about half of it. So a backend that was not given a thread count
looks, before each prompt and every `RECHECK_S` while it decodes, at how many cores the *other*
processes kept busy since the last look, and runs on the rest:

    others = (busy CPU time of the machine - this process's CPU time) / wall time   (in cores)
    threads = clamp(round(cores - others), 1, limit)

from /proc/stat (the busy ticks, user + nice + system + irq + softirq + steal, of the CPUs this
process may run on) and `time.process_time()` (this process's threads). An idle machine leaves `others` near 0, so the
count stays at `limit` and the idle rate is untouched. Where /proc/stat cannot be read (not
Linux) the count stays at `limit`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial

# Shorter looks than this are mostly tick rounding (/proc/stat counts in 10 ms ticks).
MIN_INTERVAL_S = 0.2
# How often a long decode looks again (a busy process may start or stop in the middle of an answer).
RECHECK_S = 1.0
# Cores the others must keep busy before one is given up: background noise (a shell, a daemon)
# stays below it.
BUSY_THRESHOLD = 0.5


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on, where the OS says (Linux)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def read_proc_stat(path: str = "/proc/stat", cpus: set[int] | None = None) -> tuple[float, float] | None:
    """(busy seconds, total seconds) since boot summed over `cpus` (default: all CPUs), or None
    where unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    if cpus is None:
        rows = [fields[1:] for fields in lines if fields[0] == "cpu"]
    else:
        rows = [fields[1:] for fields in lines if fields[0][3:].isdigit() and int(fields[0][3:]) in cpus]
    if not rows:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = total = 0
    for row in rows:
        try:
            ticks = [int(v) for v in row[:8]]
        except ValueError:
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
        total += sum(ticks)
        busy += sum(ticks) - sum(ticks[3:5])
    return busy / hz, total / hz


def threads_for(cores: int, others_busy: float, limit: int) -> int:
    """Threads to run when other processes keep `others_busy` cores busy out of `cores`."""
    if others_busy < BUSY_THRESHOLD:
        return max(1, limit)
    free = cores - others_busy
    return max(1, min(limit, int(free + 0.5)))


class FreeCores:
    """Tracks the cores other processes keep busy; `threads()` says how many to run now.

    `limit` is the most threads wanted (the device plan's count); the cores looked at are those
    this process may run on (`cpus`, default: its affinity). The clock, /proc/stat reader and
    own-CPU reader can be replaced (tests).
    """

    def __init__(self, limit: int, cpus: set[int] | None = None, *,
                 read_stat: Callable[[], tuple[float, float] | None] | None = None,
                 own_cpu: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic):
        cpus = allowed_cpus() if cpus is None else cpus
        self.cores = max(1, len(cpus) if cpus else (os.cpu_count() or 1))
        read_stat = read_stat or partial(read_proc_stat, cpus=cpus)
        self.limit = max(1, int(limit))
        self._read_stat, self._own_cpu, self._clock = read_stat, own_cpu, clock
        self._last = self._look()
        self.others_busy = 0.0
        self.current = self.limit

    def _look(self) -> tuple[float, float, float] | None:
        stat = self._read_stat()
        return None if stat is None else (self._clock(), stat[0], self._own_cpu())

    def due(self, every: float = RECHECK_S) -> bool:
        """Whether `every` seconds passed since the last look (cheap: no file read)."""
        return self._last is None or self._clock() - self._last[0] >= every

    def threads(self) -> int:
        """The thread count for now; unchanged when the last look is too recent to tell."""
        now = self._look()
        if now is None:
            return self.current
        if self._last is None or now[0] - self._last[0] < MIN_INTERVAL_S:
            self._last = self._last or now
            return self.current
        wall = now[0] - self._last[0]
        busy = now[1] - self._last[1]
        own = now[2] - self._last[2]
        self._last = now
        self.others_busy = max(0.0, (busy - own) / wall)
        self.current = threads_for(self.cores, self.others_busy, self.limit)
        return self.current
