"""What a runtime backend provides, the registry of backends, and helpers they share.

A backend owns one model and one KV cache (one sequence). The :class:`~.vlm.VLM` above it does
everything else the same way for every backend: prompts (the chat template), images (the
shared preprocessing, the embedding cache), sampling, streaming text, chat history and stats.

Backends are registered by exact key: ``edge`` (a bundle: onnxruntime + llama.cpp) and
``torch`` (a checkpoint: transformers). Each module is imported when its backend is first
used, so picking ``edge`` never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tinyllava_edge.data.preprocess import PreprocessConfig
from tinyllava_edge.data.template import Template
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry


class Detokenizer(Protocol):
    def push(self, token: int) -> bytes:
        """The bytes this token adds to the text (b"" for control tokens, or while waiting)."""
        ...

    def flush(self) -> bytes:
        """What is still held back when the answer ends."""
        ...


class Backend(Protocol):
    kind: str  # registry key
    path: Path
    model_id: str
    device: str  # resolved: cpu | cuda | jetson
    template: Template
    preprocess: PreprocessConfig
    n_ctx: int  # positions the KV cache holds
    n_past: int  # positions in it now
    positions_decoded: int  # every position ever fed (tests count work with it)
    image_tokens: int  # rows one image gives
    stop_ids: frozenset[int]  # tokens that end an answer

    def prompt_tokenizer(self, first: bool) -> Any:
        """A tokenizer `Template.encode` can use; `first` False adds no BOS (a later chat turn)."""
        ...

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, N, n_embd) float32 rows, scaled as the LLM takes them."""
        ...

    def reset(self) -> None:
        """Empty the KV cache."""
        ...

    def feed(self, segments: Sequence) -> np.ndarray:
        """Append segments (token-id lists, (n, n_embd) float arrays) to the cache; last logits (n_vocab,)."""
        ...

    def detokenizer(self) -> Detokenizer: ...

    def info(self) -> dict: ...

    def close(self) -> None: ...


class _LazyBackend:
    """A registry entry that imports its module on first use (torch stays unimported for `edge`)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        return getattr(import_module(self.module), self.name)(*args, **kwargs)


BACKENDS: Registry[Any] = Registry("runtime backend")
BACKENDS.add("edge", _LazyBackend("tinyllava_edge.runtime.edge", "EdgeBackend"))
BACKENDS.add("torch", _LazyBackend("tinyllava_edge.runtime.torch_backend", "TorchBackend"))


def check_options(kind: str, given: dict, known: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TinyLlavaError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                             f"the {kind} backend; known: {', '.join(sorted(known))}")


def stop_token_ids(eos_id: int | None, template: Template, single_token) -> frozenset[int]:
    """EOS plus every template stop string that is one token (`single_token(text) -> id | None`),
    as the eval predictor decides; the same set on every backend, so their greedy answers agree."""
    ids = {int(eos_id)} if eos_id is not None else set()
    for stop in template.stop:
        token = single_token(stop) if stop else None
        if token is not None:
            ids.add(int(token))
    if not ids:
        raise TinyLlavaError(f"the model has no EOS token and template {template.name!r} no single-token stop; "
                             "decoding would never stop on its own")
    return frozenset(ids)


def positions(segments: Sequence) -> int:
    """KV-cache positions the segments take (image arrays: one per row)."""
    return sum(len(s) for s in segments)


def check_segments(segments: Sequence, n_past: int, n_ctx: int, n_vocab: int, name: str) -> int:
    total = positions(segments)
    if total == 0:
        raise TinyLlavaError("a prompt needs at least one token or image row")
    if n_past + total > n_ctx:
        raise TinyLlavaError(f"{n_past + total} positions do not fit the {n_ctx}-token context of {name}")
    for segment in segments:
        if not isinstance(segment, np.ndarray):
            bad = [t for t in segment if not 0 <= int(t) < n_vocab]
            if bad:
                raise TinyLlavaError(f"token id {bad[0]} is outside the vocabulary of {name} (0..{n_vocab - 1})")
    return total
