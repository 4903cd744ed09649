"""What every command shares: its argument parser and the one-line error exit."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

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


class ArgumentParser(argparse.ArgumentParser):
    """Every command's parser: a bad, missing or unknown option is one `error:` line on stderr,
    naming the option and what it takes, and exit code 2, like every other user error of the
    command; `--help` prints the full help as usual."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def _get_value(self, action: argparse.Action, arg_string: str):
        # argparse says "invalid int value: 'x'" for `--bits x` without the values --bits takes.
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError:
            if action.choices is None:
                raise
            choices = ", ".join(str(c) for c in action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {arg_string!r} (choose from {choices})") from None


def add_truncated_images_option(parser: argparse.ArgumentParser) -> None:
    """`--allow-truncated-images`, the same words in every command that reads images."""
    from tinyllava_edge.data.images import ALLOW_TRUNCATED_HELP, ALLOW_TRUNCATED_OPTION

    parser.add_argument(ALLOW_TRUNCATED_OPTION, action="store_true", help=f"{ALLOW_TRUNCATED_HELP} (default: refuse)")


HUB_ID_HELP = "or a Hugging Face Hub repository id (owner/name; fetched into the Hugging Face cache unless cached)"
REVISION_HELP = "the branch, tag or commit of a Hub repository id (default: main)"


def add_model_option(parser: argparse.ArgumentParser, what: str, *, flag: str = "--model", required: bool = False,
                     revision: bool = True) -> None:
    """`--model` (or `flag`): `what` (a folder) or a Hub repository id, and `--revision` with it
    (tinyllava_edge/hub.py resolves both, the same way for every command)."""
    parser.add_argument(flag, required=required, help=f"{what}, {HUB_ID_HELP}")
    if revision:
        parser.add_argument("--revision", help=REVISION_HELP)


# OpenMP threads that spin this many times at a barrier before they sleep (libgomp, which torch's
# Linux wheels use). Measured on the idle 2-core AMD EPYC, a tiny-shapes stage-2 step (bf16,
# batch 16, 120 steps, twice): 0.245 s against 0.29 s with OMP_WAIT_POLICY=PASSIVE (no spinning);
# with one other CPU-bound process, 0.45 against 0.39 s. libgomp's own default (300,000 spins)
# and ACTIVE were 3x slower than PASSIVE beside a busy process, so a short spin is the trade:
# most of the idle gain, a sixth lost under contention.
TRAIN_SPIN_COUNT = 1000


def set_training_openmp_wait() -> None:
    """Before torch loads OpenMP: a short spin at barriers (TRAIN_SPIN_COUNT), unless the user
    set OMP_WAIT_POLICY or GOMP_SPINCOUNT, which then win."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(TRAIN_SPIN_COUNT)
