"""`Steps`: the numbered progress lines of the long commands (export, quantize), on stderr.

    steps = Steps(3, enabled=True)
    steps.start("writing vision.onnx")      # [1/3] writing vision.onnx ...
    steps.start("writing llm-F16.gguf")     #       done in 2.1 s / [2/3] writing llm-F16.gguf ...
    steps.done()
"""

from __future__ import annotations

import sys
import time


class Steps:
    """`[k/n] what` lines on stderr, each closed with its time."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.k, self.t0 = total, enabled, 0, None

    def start(self, what: str) -> None:
        self.done()
        self.k += 1
        self.t0 = time.perf_counter()
        if self.enabled:
            print(f"[{self.k}/{self.total}] {what} ...", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.t0 is not None and self.enabled:
            print(f"      done in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)
        self.t0 = None
