"""Load on a running demo through gradio_client: N concurrent sessions × M questions each.

Each session is its own `gradio_client.Client` (its own browser-like session and conversation);
its first question goes with an image, later ones follow up in the same conversation or bring
the next image. Latency is the wall time of one `/ask` call, queueing included.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tinyllava_edge.apps.demo import ANSWERED


@dataclass
class LoadResult:
    sessions: int
    questions: int
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    def line(self) -> str:
        done = len(self.latencies_s)
        return (f"{self.sessions} sessions x {self.questions} questions: {done} answered, {len(self.errors)} errors, "
                f"latency p50 {self.percentile(50):.2f} s p95 {self.percentile(95):.2f} s max "
                f"{max(self.latencies_s, default=float('nan')):.2f} s, {done / self.wall_s:.1f} answers/s")


def run_load(url: str, examples: Sequence[tuple[str, str]], variant: str, *, sessions: int = 8, questions: int = 5,
             device: str = "cpu", max_new_tokens: int = 32,
             timeout_s: float = 300.0) -> LoadResult:
    """Drive `/ask` of the demo at `url` from `sessions` threads; every call's status must say it answered."""
    from gradio_client import Client, handle_file

    result = LoadResult(sessions, questions)
    lock = threading.Lock()
    start = threading.Barrier(sessions)

    def session(index: int) -> None:
        try:
            client = Client(url, verbose=False, download_files=False)
        except Exception as err:  # noqa: BLE001 - any failure to connect counts as an error of this session
            with lock:
                result.errors.append(f"session {index}: connect: {err}")
            start.abort()
            return
        try:
            start.wait(timeout=timeout_s)
        except threading.BrokenBarrierError:
            pass
        for turn in range(questions):
            path, question = examples[(index + turn) % len(examples)]
            image = handle_file(path) if turn % 2 == 0 else None  # a new image every other turn
            began = time.perf_counter()
            try:
                job = client.submit(image, question, variant, device, max_new_tokens, 0.0, 1.0, -1, api_name="/ask")
                outputs = job.result(timeout=timeout_s)
                status = outputs[2]
                if not str(status).startswith(ANSWERED):
                    raise RuntimeError(f"status {status!r}")
            except Exception as err:  # noqa: BLE001 - the load test counts every failure
                with lock:
                    result.errors.append(f"session {index} turn {turn}: {' '.join(str(err).split())[:200]}")
                continue
            with lock:
                result.latencies_s.append(time.perf_counter() - began)
        client.close()

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(sessions)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * questions)
    result.wall_s = time.perf_counter() - began
    return result
