"""What every command shares: sizes for summaries and the one-line error exit."""

from __future__ import annotations

import sys

from tinyllava_edge.errors import TinyLlavaError

USER_ERRORS = (TinyLlavaError, OSError)  # what a command reports in one line instead of a traceback


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, bytes shown whole)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fail(err: BaseException, hint: str = "") -> int:
    """Print `error: <one sentence>` on stderr and return the exit code 2."""
    if isinstance(err, OSError) and not isinstance(err, TinyLlavaError):
        reason = err.strerror or str(err)
        message = f"{reason}: {err.filename}" if err.filename else reason
    else:
        message = str(err)
    message = " ".join(message.split())  # one line, whatever the exception carried
    print(f"error: {message}{' ' + hint if hint else ''}", file=sys.stderr)
    return 2
