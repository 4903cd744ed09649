"""Thread choice from the free cores (runtime/threads.py) and the KV-cache size arithmetic: no model, no timing."""

import pytest

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.llamacpp import kv_cache_bytes
from tinyllava_edge.runtime.threads import BUSY_THRESHOLD, FreeCores, allowed_cpus, read_proc_stat, threads_for

MIB = 2**20


def test_threads_for_gives_up_only_cores_others_keep_busy():
    assert threads_for(2, 0.0, 2) == 2  # idle: the plan's count, so the idle rate is untouched
    assert threads_for(2, BUSY_THRESHOLD - 0.01, 2) == 2  # background noise
    assert threads_for(2, 1.0, 2) == 1  # one CPU-bound process on a 2-core machine
    assert threads_for(2, 0.7, 2) == 1  # it shares our cores: we see less than a whole core of it
    assert threads_for(2, 2.0, 2) == 1  # never fewer than one
    assert threads_for(8, 1.0, 4) == 4  # enough free cores left: the limit holds
    assert threads_for(8, 6.0, 4) == 2


class FakeHost:
    """A machine whose /proc/stat, clock and own CPU time the test advances."""

    def __init__(self, cores: int):
        self.cores, self.now, self.busy, self.own, self.readable = cores, 100.0, 50.0, 1.0, True

    def run(self, seconds: float, others: float, own: float) -> None:
        """`seconds` pass with `others` cores busy elsewhere and `own` cores of ours."""
        self.now += seconds
        self.busy += (others + own) * seconds
        self.own += own * seconds

    def stat(self):
        return (self.busy, self.now * self.cores) if self.readable else None

    def tracker(self, limit: int) -> FreeCores:
        return FreeCores(limit, set(range(self.cores)), read_stat=self.stat, own_cpu=lambda: self.own,
                         clock=lambda: self.now)


def test_free_cores_follow_other_processes_not_our_own_load():
    host = FakeHost(2)
    cores = host.tracker(2)
    host.run(2.0, others=0.05, own=2.0)  # we decoded on both cores, nobody else ran
    assert cores.threads() == 2 and cores.others_busy == pytest.approx(0.05)
    host.run(2.0, others=0.7, own=1.3)  # a busy process started and took a share of our cores
    assert cores.threads() == 1 and cores.others_busy == pytest.approx(0.7)
    host.run(0.05, others=0.0, own=1.0)  # too short to tell (10 ms ticks): keep the count
    assert cores.threads() == 1
    host.run(2.0, others=0.0, own=1.0)  # it stopped: back to the plan's count
    assert cores.threads() == 2
    assert not cores.due() and cores.due(every=0.0)
    host.run(1.5, others=1.0, own=1.0)
    assert cores.due()


def test_free_cores_without_proc_stat_keep_the_limit():
    host = FakeHost(4)
    host.readable = False
    cores = host.tracker(3)
    host.run(5.0, others=4.0, own=0.0)
    assert cores.threads() == 3 and cores.due()


def test_read_proc_stat(tmp_path):
    import os

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 20 5 5 20 7 0\n"
                    "cpu0 60 0 30 400 10 5 5 10 7 0\ncpu1 40 0 20 400 10 0 0 10 0 0\nintr 5\n")
    busy, total = read_proc_stat(str(stat))
    assert busy == pytest.approx(180 / hz) and total == pytest.approx(1000 / hz)
    busy, total = read_proc_stat(str(stat), cpus={1})  # the CPUs this process may use only
    assert busy == pytest.approx(70 / hz) and total == pytest.approx(480 / hz)
    assert read_proc_stat(str(stat), cpus={7}) is None
    stat.write_text("intr 1 2 3\n")
    assert read_proc_stat(str(stat)) is None
    assert read_proc_stat(str(tmp_path / "missing")) is None
    real = read_proc_stat()
    assert real is None or 0 <= real[0] <= real[1]
    mine = read_proc_stat(cpus=allowed_cpus())
    assert mine is None or 0 <= mine[0] <= mine[1]


def test_kv_cache_bytes():
    # Qwen2-0.5B (bench-scale): 24 layers, 2 KV heads of 64: 6 KiB of K and 6 of V per position in f16
    assert kv_cache_bytes(24, 2, 64, 64, "f16", 2048) == 24 * MIB
    assert kv_cache_bytes(24, 2, 64, 64, "q8_0", 2048) == 24 * MIB * 34 // 64  # 34 bytes per 32 values
    assert kv_cache_bytes(24, 2, 64, 64, "f32", 1) == 24 * 2 * 128 * 4
    # Phi-2 (TinyLLaVA-Phi-2-SigLIP-3.1B): 32 layers, 32 heads of 80: 320 KiB per position in f16
    assert kv_cache_bytes(32, 32, 80, 80, "f16", 2048) == 640 * MIB
    assert kv_cache_bytes(32, 32, 80, 80, "q8_0", 2048) == 340 * MIB
    # a row that is not a whole number of Q8_0 blocks still takes whole blocks
    assert kv_cache_bytes(1, 1, 40, 40, "q8_0", 1) == 2 * 2 * 34
    with pytest.raises(TinyLlavaError, match="KV-cache type 'q4' is not supported"):
        kv_cache_bytes(1, 1, 64, 64, "q4", 1)
