"""`ChatSession`: a conversation whose history stays in the model's KV cache.

    chat = vlm.chat(max_new_tokens=128)
    chat.ask("photo.jpg", "What is in the picture?")
    chat.ask(None, "What colour is it?")          # only this turn's tokens are evaluated
    for piece in chat.ask_stream(None, "Why?"): ...

The conversation is what the chat template renders for it, ``{system} USER: <image>\\n{q1}
ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT:``, but kept as the tokens the model actually saw and
chose: each turn evaluates only what is new since the last one, namely the previous answer's
last token (and the template's end-of-answer where the answer did not end with it) and the new
user turn. Earlier turns are never evaluated again while the cache is the session's.

**Context policy.** Before a turn the session checks that the cache can hold the new turn plus
``max_new_tokens`` answer tokens. When it cannot:

* ``overflow="drop_oldest"`` (default): the oldest turns, with their images, are dropped (as few
  as give room) and the kept turns are rendered again from their text with the new question and
  evaluated afresh in one prefill (`dropped_turns` counts them);
* ``overflow="error"``: TinyLlavaError saying how many positions the turn needs and the context
  holds; ``reset()`` starts over.

A question that does not fit even on its own raises with either policy; one that fits but leaves
less than ``max_new_tokens`` of room is answered until the context is full (finish_reason
"context"). When something else used the model in between (`vlm.generate`, another session),
the session evaluates its own history again once: the answer is the same, only slower.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyllava_edge.constants import IMAGE_TOKEN_INDEX
from tinyllava_edge.data.template import tokenizer_image_token
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.llamacpp import split_segments
from tinyllava_edge.runtime.backend import positions
from tinyllava_edge.runtime.sampling import sampling_params
from tinyllava_edge.runtime.stats import GenerationStats
from tinyllava_edge.runtime.vlm import DEFAULT_MAX_NEW_TOKENS, VLM, check_prompt, question_text

OVERFLOW_POLICIES = ("drop_oldest", "error")


@dataclass(frozen=True)
class Turn:
    prompt: str  # the question as asked
    image_rows: np.ndarray | None  # (N, n_embd) embeddings of its image
    answer: str
    tokens: tuple[int, ...]  # chosen by the model, stop token included


class ChatSession:
    """Multi-turn chat on one VLM (see the module docstring for what is evaluated and the context policy).

    Sampling defaults (`max_new_tokens`, `temperature`, `top_p`, `seed`, `stop`) apply to every
    turn; `ask` takes the same names to change one turn.
    """

    def __init__(self, vlm: VLM, *, overflow: str = "drop_oldest", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None):
        if overflow not in OVERFLOW_POLICIES:
            raise TinyLlavaError(f"overflow policy {overflow!r} is not one of {', '.join(OVERFLOW_POLICIES)}")
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                         "stop": stop}
        sampling_params(**self.defaults)  # bad defaults fail here, not at the first question
        self.vlm = vlm
        self.overflow = overflow
        self.turns: list[Turn] = []
        self.dropped_turns = 0
        self.last_prompt: list = []  # the whole conversation up to the last answer, as segments
        self._fed: list = []  # segments evaluated into the cache, in order
        self._pending: list[int] = []  # tokens of the history not evaluated yet
        tokenizer = vlm.backend.prompt_tokenizer(False)
        self._closing = list(tokenizer.encode(vlm.template.eos)) if vlm.template.eos else []

    # -- the public side ------------------------------------------------------------------------------

    def ask(self, image: Any, text: str, *, return_stats: bool = False, **sampling) -> str:
        """The answer to `text` (with `image`, or None), in the context of the earlier turns."""
        answer = "".join(self.ask_stream(image, text, **sampling))
        return (answer, self.vlm.last_stats) if return_stats else answer

    def ask_stream(self, image: Any, text: str, **sampling) -> Iterator[str]:
        """`ask`, piece by piece. A stream closed early keeps the partial answer as the turn's."""
        started = time.perf_counter()
        unknown = sorted(set(sampling) - set(self.defaults))
        if unknown:
            raise TinyLlavaError(f"unknown option {unknown[0]!r} for a chat turn; known: {', '.join(self.defaults)}")
        params = sampling_params(**{**self.defaults, **sampling})
        prompt = check_prompt(text)
        stats = GenerationStats()
        rows = self.vlm.encode_images([image], [stats])[0] if image is not None else None
        question = question_text(prompt, rows is not None)
        new, fresh, full = self._plan(question, rows, params.max_new_tokens)
        self.last_prompt = full
        return self._run(new, fresh, prompt, rows, params, stats, started)

    def reset(self) -> None:
        """Forget the conversation."""
        self.turns, self._fed, self._pending, self.last_prompt = [], [], [], []
        if self.vlm._owner is self:
            self.vlm._owner = None

    def history(self) -> list[tuple[str, bool, str]]:
        """(question, had an image, answer) per turn kept."""
        return [(t.prompt, t.image_rows is not None, t.answer) for t in self.turns]

    def history_segments(self) -> list:
        """The conversation so far as the model sees it: token lists and image rows, in order."""
        return list(self._fed) + ([list(self._pending)] if self._pending else [])

    # -- what to evaluate ------------------------------------------------------------------------------

    def _later_turn(self, question: str, rows: np.ndarray | None) -> list:
        """Segments of a turn after the first: the template's text for it, tokenized without BOS."""
        template = self.vlm.template
        before = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
        head = template.render(before)
        text = template.render_prompt([*before, {"from": "human", "value": question}])
        if not text.startswith(head):  # every registered template renders turn by turn; a new one might not
            raise TinyLlavaError(f"template {template.name!r} does not render a later turn after the earlier ones; "
                                 "it cannot chat with a KV cache")
        ids = tokenizer_image_token(text[len(head):], self.vlm.backend.prompt_tokenizer(False))
        return split_segments(ids, [] if rows is None else [rows], IMAGE_TOKEN_INDEX)

    def _rendered(self, kept: Sequence[Turn], question: str, rows: np.ndarray | None) -> list:
        """The kept turns (from their text) and the new question as one prompt."""
        messages, images = [], []
        for turn in kept:
            messages += [{"from": "human", "value": question_text(turn.prompt, turn.image_rows is not None)},
                         {"from": "gpt", "value": turn.answer}]
            if turn.image_rows is not None:
                images.append(turn.image_rows)
        messages.append({"from": "human", "value": question})
        return self.vlm.prompt_segments(messages, images + ([] if rows is None else [rows]))

    def _plan(self, question: str, rows: np.ndarray | None, max_new: int) -> tuple[list, bool, list]:
        """(segments to evaluate, whether the cache starts empty, the whole prompt)."""
        vlm = self.vlm
        n_ctx = vlm.n_ctx
        if not self.turns:
            segments = self._rendered([], question, rows)
            vlm.check_fits(positions(segments), 0)
            return segments, True, segments
        pending = [list(self._pending)] if self._pending else []
        turn = self._later_turn(question, rows)
        history = self._fed + pending
        need = positions(history) + positions(turn) + max_new
        if need <= n_ctx:
            full = history + turn
            in_cache = vlm._owner is self and vlm.backend.n_past == positions(self._fed)
            return (pending + turn, False, full) if in_cache else (full, True, full)
        if self.overflow == "error":
            raise TinyLlavaError(f"the conversation needs {need} positions with max_new_tokens {max_new} but the "
                                 f"context holds {n_ctx}; call reset() or use overflow='drop_oldest'")
        for k in range(1, len(self.turns) + 1):
            kept = self.turns[k:]
            segments = self._rendered(kept, question, rows)
            if positions(segments) + max_new <= n_ctx or not kept:
                vlm.check_fits(positions(segments), 0)
                self.turns = list(kept)
                self.dropped_turns += k
                self._fed, self._pending = [], []
                return segments, True, segments
        raise AssertionError("unreachable: the last pass keeps no turns")

    # -- running a turn --------------------------------------------------------------------------------

    def _run(self, new: list, fresh: bool, prompt: str, rows: np.ndarray | None, params, stats: GenerationStats,
             started: float) -> Iterator[str]:
        vlm = self.vlm
        vlm._owner = self
        try:
            yield from vlm.decode(new, params, stats, fresh=fresh, started=started)
        except GeneratorExit:
            self._record(new, fresh, prompt, rows)
            raise
        except BaseException:
            vlm._owner = None  # the cache holds an unknown part of the turn: evaluate afresh next time
            raise
        self._record(new, fresh, prompt, rows)

    def _record(self, new: list, fresh: bool, prompt: str, rows: np.ndarray | None) -> None:
        tokens = list(self.vlm.last_tokens)
        # In the cache now: `new`, then every chosen token but the last (decode never evaluates it).
        self._fed = ([] if fresh else self._fed) + list(new) + ([tokens[:-1]] if len(tokens) > 1 else [])
        tail = tokens[-1:]
        if self._closing and tokens[-len(self._closing):] != self._closing:
            tail += self._closing  # the answer was cut (length, stop string): end it as the template does
        self._pending = tail
        self.turns.append(Turn(prompt, rows, self.vlm.last_text.strip(), tuple(tokens)))
