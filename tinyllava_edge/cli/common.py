"""What every command shares: the one-line error exit."""

from __future__ import annotations

import sys

from tinyllava_edge.errors import TinyLlavaError

USER_ERRORS = (TinyLlavaError, OSError)  # what a command reports in one line instead of a traceback


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
