"""Choosing the next token from logits, and turning tokens into text as they come.

Sampling is numpy on the logits (both backends hand over float32 ``(n_vocab,)``): temperature 0
is greedy (argmax, the first of equal maxima); otherwise softmax(logits / temperature), cut to
the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al.
2019), drawn with ``numpy.random.default_rng(seed)``: the same seed gives the same tokens.

:class:`TextStream` turns tokens into text pieces: bytes of a character split over two tokens
wait for the rest (an incremental UTF-8 decoder), leading whitespace of the answer is dropped,
and text that may be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinyllava_edge.errors import TinyLlavaError


@dataclass(frozen=True)
class SamplingParams:
    """Validated generation settings (see :func:`sampling_params`)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_params(max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    stop: str | Sequence[str] | None = None) -> SamplingParams:
    """Check the generation settings; each out-of-range value raises one TinyLlavaError sentence."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise TinyLlavaError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise TinyLlavaError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise TinyLlavaError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise TinyLlavaError(f"seed must be a non-negative integer or None, got {seed!r}")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, (list, tuple)):
        stops = tuple(stop)
    else:
        raise TinyLlavaError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    if any(not isinstance(s, str) or not s for s in stops):
        raise TinyLlavaError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return SamplingParams(int(max_new_tokens), float(temperature), float(top_p),
                          None if seed is None else int(seed), stops)


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """One token id from `logits` (n_vocab,); `rng` may be None when `params` are greedy."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / params.temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]  # first index reaching top_p
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])
    return int(rng.choice(len(probs), p=probs))


class TextStream:
    """Bytes of generated tokens in, text pieces out; stops at the first stop string.

    `push(data)` returns the text that is now certain (possibly ""); `stopped` turns True once a
    stop string appeared (the text before it is returned, nothing after). `finish()` returns what
    was held back. The pieces joined are the answer, with leading whitespace removed.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text not yet given out
        self._started = False  # a non-whitespace character was given out
        self.stopped = False
        self.text = ""  # everything given out so far

    def push(self, data: bytes) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # Stop strings are looked for before the leading whitespace goes, as the eval predictor
        # cuts at a stop string and then strips.
        cut = min((i for i in (self._held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._held, self.stopped = self._held[:cut], "", True
        elif final:
            out, self._held = self._held, ""
        else:
            keep = self._partial_stop_length()
            out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        if not self._started:
            out = out.lstrip()
        if out:
            self._started = True
        self.text += out
        return out

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the held text that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best
