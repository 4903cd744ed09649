"""`VLM`: what `tinyllava_edge.load` returns, the same for every backend.

    vlm = tinyllava_edge.load("bundles/tiny-shapes", device="auto")
    vlm.generate("cat.png", "What is in the picture?")                 # -> str
    for piece in vlm.stream(image, "Describe it.", temperature=0.7, seed=1):
        print(piece, end="", flush=True)
    chat = vlm.chat(); chat.ask(image, "What colour?"); chat.ask(None, "And its shape?")
    vlm.generate_batch([(image1, "q1"), (image2, "q2")])                 # vision batched
    text, stats = vlm.generate(image, "q", return_stats=True)            # or vlm.last_stats

Prompts are built as the eval predictor and TinyLLaVA_Factory build them: ``"<image>\\n" +
question`` when an image goes with it, rendered with the chat template, tokenized with the
model's own tokenizer (llama.cpp's for a bundle). Answers end at EOS, at a template stop
string, at a `stop` string of the call, after `max_new_tokens`, or when the context is full;
they come without leading whitespace.

A VLM holds one KV cache: one generation runs at a time. A second thread that asks while one is
decoding gets a TinyLlavaError at its first token (not a mixed-up cache); load one VLM per thread
for parallel answers. Images are cached by
content (see runtime/images.py): the same image again skips the vision encoder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.llamacpp import split_segments
from tinyllava_edge.runtime.backend import Backend, positions
from tinyllava_edge.runtime.images import DEFAULT_CACHE_SIZE, ImageCache, ImageSource, prepare_image
from tinyllava_edge.runtime.sampling import SamplingParams, TextStream, next_token, sampling_params
from tinyllava_edge.runtime.stats import GenerationStats, peak_rss_bytes

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_VISION_BATCH = 8


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TinyLlavaError(f"a prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise TinyLlavaError("the prompt is empty; ask a question")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: undecodable bytes from argv or a file read leniently
        raise TinyLlavaError(f"the prompt is not valid UTF-8 text (character {err.start} cannot be encoded); "
                             "give it as UTF-8") from None
    if DEFAULT_IMAGE_TOKEN in prompt:
        raise TinyLlavaError(f"the prompt contains {DEFAULT_IMAGE_TOKEN!r}; pass the image as the image argument and "
                             "the runtime places it")
    return prompt


def question_text(prompt: str, with_image: bool) -> str:
    """What the user turn says: Factory's ``"<image>\\n" + question`` when an image goes with it."""
    return f"{DEFAULT_IMAGE_TOKEN}\n{prompt}" if with_image else prompt


class VLM:
    """A loaded model: `generate`, `stream`, `chat`, `generate_batch`; `last_stats` after each call."""

    def __init__(self, backend: Backend, *, image_cache_size: int = DEFAULT_CACHE_SIZE,
                 vision_batch_size: int = DEFAULT_VISION_BATCH, allow_truncated_images: bool = False):
        if isinstance(image_cache_size, bool) or not isinstance(image_cache_size, int) or image_cache_size < 0:
            raise TinyLlavaError(f"image_cache_size must be an integer >= 0 (0: no cache), got {image_cache_size!r}")
        if isinstance(vision_batch_size, bool) or not isinstance(vision_batch_size, int) or vision_batch_size < 1:
            raise TinyLlavaError(f"vision_batch_size must be an integer >= 1, got {vision_batch_size!r}")
        if not isinstance(allow_truncated_images, bool):
            raise TinyLlavaError(f"allow_truncated_images must be True or False, got {allow_truncated_images!r}")
        self.backend = backend
        self.template = backend.template
        self.allow_truncated_images = allow_truncated_images  # the policy of data/images.py
        self.image_cache = ImageCache(image_cache_size)
        self.vision_batch_size = vision_batch_size
        self.encoder_calls = 0  # vision encoder runs (a batch is one)
        self.images_encoded = 0
        self.last_stats: GenerationStats | None = None
        self.last_tokens: list[int] = []  # the tokens chosen by the last call, stop token included
        self.last_text = ""
        self._owner: object | None = None  # the chat session whose history the KV cache holds
        self._busy = threading.Lock()  # guards _decoding
        self._decoding: int | None = None  # the thread whose generation holds the KV cache

    # -- facts ----------------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def info(self) -> dict:
        return {**self.backend.info(), "image_cache_size": self.image_cache.capacity,
                "allow_truncated_images": self.allow_truncated_images}

    def clear_caches(self) -> None:
        """Forget every image and prompt seen: the next answer encodes and prefills everything
        (the image cache, and a backend's KV cache and prefix states where it keeps them)."""
        self.image_cache.clear()
        clear = getattr(self.backend, "clear_caches", None)
        if clear is not None:
            clear()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- images ---------------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Any], stats: list[GenerationStats] | None = None) -> list[np.ndarray]:
        """(N, n_embd) rows per image, from the cache or the encoder (`vision_batch_size` at a time).

        An image is a path, a PIL image, an (H, W, 3) uint8 array or an
        :class:`~tinyllava_edge.runtime.images.ImageSource`: one whose bytes were seen before is
        neither decoded nor preprocessed again. With `stats` (one per image), each gets its share
        of the time and whether it was cached.
        """
        started = time.perf_counter()
        cache = self.image_cache
        keys: list[str] = []  # each image's pixel key, in order
        found: dict[str, np.ndarray] = {}
        hits: set[str] = set()
        todo: dict[str, np.ndarray] = {}
        for image in images:
            source = image.source_key if isinstance(image, ImageSource) else None
            known = None if source is None else cache.find_source(source)
            if known is not None:
                key, rows = known
                found[key] = rows
                hits.add(key)
                keys.append(key)
                continue
            p = prepare_image(image.decode() if source is not None else image, self.backend.preprocess,
                              self.allow_truncated_images)
            keys.append(p.key)
            if source is not None:
                cache.name_source(source, p.key)
            if p.key in found or p.key in todo:
                continue
            rows = cache.get(p.key)
            if rows is None:
                todo[p.key] = p.pixels
            else:
                found[p.key] = rows
                hits.add(p.key)
        prep_ms = (time.perf_counter() - started) * 1e3 / max(1, len(keys))
        encode_ms: dict[str, float] = {}
        batch = list(todo)
        for start in range(0, len(batch), self.vision_batch_size):
            chunk = batch[start:start + self.vision_batch_size]
            t = time.perf_counter()
            rows = self.backend.encode_images(np.stack([todo[k] for k in chunk]))  # (B, N, n_embd)
            share = (time.perf_counter() - t) * 1e3 / len(chunk)
            self.encoder_calls += 1
            self.images_encoded += len(chunk)
            for key, r in zip(chunk, rows):
                found[key] = r
                encode_ms[key] = share
                cache.put(key, r)
        if stats is not None:
            for key, s in zip(keys, stats):
                s.images += 1
                s.image_encode_ms += prep_ms + encode_ms.pop(key, 0.0)  # a repeat in the batch costs nothing
                s.image_cache_hits += key in hits
        return [found[k] for k in keys]

    # -- one-shot generation --------------------------------------------------------------------------

    def generate(self, image: Any, prompt: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, return_stats: bool = False):
        """The answer to `prompt` about `image` (a path, PIL image, (H, W, 3) uint8 array, or None).

        temperature 0 is greedy; otherwise temperature / top_p sampling, reproducible with `seed`.
        Returns the text, or (text, GenerationStats) with `return_stats`.
        """
        text = "".join(self.stream(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed, stop=stop))
        return (text, self.last_stats) if return_stats else text

    def stream(self, image: Any, prompt: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """`generate`, piece by piece as tokens are decoded (the pieces join to its text).

        The image is encoded and every argument checked before this returns; the prompt is
        evaluated on the first `next()`. `last_stats` is set when the iterator ends.
        """
        started = time.perf_counter()
        params = sampling_params(max_new_tokens, temperature, top_p, seed, stop)
        prompt = check_prompt(prompt)
        stats = GenerationStats()
        images = [] if image is None else self.encode_images([image], [stats])
        messages = [{"from": "human", "value": question_text(prompt, image is not None)}]
        segments = self.prompt_segments(messages, images)
        self.check_fits(positions(segments), 0)
        self._owner = None
        return self.decode(segments, params, stats, fresh=True, started=started)

    def generate_batch(self, requests: Sequence[Any], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop: str | Sequence[str] | None = None, return_stats: bool = False):
        """Answers to many (image, prompt) requests: the images go through the encoder in batches
        of `vision_batch_size`; the LLM answers one after another (one KV cache).

        A request is an (image, prompt) pair, an object with `image` and `question` or `prompt`
        attributes, or a mapping with those keys. Returns the texts, or (texts, stats list).
        """
        params = sampling_params(max_new_tokens, temperature, top_p, seed, stop)
        pairs = [_as_pair(r, i) for i, r in enumerate(requests)]
        stats = [GenerationStats() for _ in pairs]
        with_image = [i for i, (image, _) in enumerate(pairs) if image is not None]
        rows = self.encode_images([pairs[i][0] for i in with_image], [stats[i] for i in with_image])
        rows_of = dict(zip(with_image, rows))
        texts = []
        for i, (image, prompt) in enumerate(pairs):
            started = time.perf_counter() - stats[i].image_encode_ms / 1e3  # its share of the batch
            images = [rows_of[i]] if i in rows_of else []
            segments = self.prompt_segments([{"from": "human", "value": question_text(prompt, bool(images))}], images)
            self.check_fits(positions(segments), 0)
            self._owner = None
            texts.append("".join(self.decode(segments, params, stats[i], fresh=True, started=started)))
        return (texts, stats) if return_stats else texts

    def chat(self, **options):
        """A :class:`~.chat.ChatSession` on this model (options: see ChatSession)."""
        from tinyllava_edge.runtime.chat import ChatSession

        return ChatSession(self, **options)

    # -- the shared machinery (ChatSession uses it too) -----------------------------------------------

    def prompt_segments(self, messages: Sequence[Mapping[str, Any]], images: Sequence[np.ndarray],
                        first: bool = True) -> list:
        """Template-encoded messages (`first`: a whole prompt; else the text of a later turn) as
        segments, the i-th image placeholder taking images[i]."""
        ids = self.template.encode(messages, self.backend.prompt_tokenizer(first), mode="eval")["input_ids"]
        return split_segments(ids, list(images), IMAGE_TOKEN_INDEX)

    def check_fits(self, new_positions: int, n_past: int) -> None:
        if n_past + new_positions >= self.n_ctx:
            raise TinyLlavaError(f"the prompt takes {n_past + new_positions} positions but the context holds "
                                 f"{self.n_ctx}, leaving no room for an answer")

    def decode(self, segments: Sequence, params: SamplingParams, stats: GenerationStats, *, fresh: bool,
               started: float) -> Iterator[str]:
        """`_decode`, refused (one sentence) while another thread's generation holds the KV cache."""
        me = threading.get_ident()
        with self._busy:
            if self._decoding not in (None, me):
                raise TinyLlavaError(f"model {self.model_id} is answering in another thread; a VLM holds one KV "
                                     "cache, so load one per thread (or wait for the answer) to ask in parallel")
            self._decoding = me
        try:
            yield from self._decode(segments, params, stats, fresh=fresh, started=started)
        finally:
            with self._busy:
                if self._decoding == me:
                    self._decoding = None

    def _decode(self, segments: Sequence, params: SamplingParams, stats: GenerationStats, *, fresh: bool,
                started: float) -> Iterator[str]:
        """Evaluate `segments` (after emptying the cache when `fresh`), then choose and stream tokens.

        The last token chosen is never evaluated (it is the stop token, or the answer ended there):
        `last_tokens[-1]` is not in the cache afterwards; everything before it is.
        """
        backend = self.backend
        t = time.perf_counter()
        if fresh:
            backend.reset()
        logits = backend.feed(segments)
        stats.prefill_ms = (time.perf_counter() - t) * 1e3
        stats.prefix_reused = getattr(backend, "last_reused", 0) if fresh else 0
        stats.prefill_tokens = positions(segments) - stats.prefix_reused
        # greedy draws nothing; a generator seeded from OS entropy costs 10-100 us before the first token
        rng = None if params.greedy else np.random.default_rng(params.seed)
        text = TextStream(self.template.stop + params.stop)
        detokenizer = backend.detokenizer()
        tokens: list[int] = []
        self.last_tokens, self.last_text = tokens, ""
        finish = "cancelled"
        first = last = time.perf_counter()
        try:
            while True:
                token = next_token(logits, params, rng)
                tokens.append(token)
                last = time.perf_counter()
                if len(tokens) == 1:
                    first = last
                    stats.ttft_ms = (first - started) * 1e3
                if token in backend.stop_ids:
                    finish = "stop"
                    break
                piece = text.push(detokenizer.push(token))
                if piece:
                    yield piece
                if text.stopped:
                    finish = "stop"
                    break
                if len(tokens) >= params.max_new_tokens:
                    finish = "length"
                    break
                if backend.n_past >= backend.n_ctx:
                    finish = "context"
                    break
                logits = backend.feed([[token]])
            tail = text.push(detokenizer.flush()) + text.finish()
            if tail:
                yield tail
        finally:
            stats.decode_tokens = len(tokens)
            stats.decode_ms = (last - first) * 1e3
            stats.total_ms = (time.perf_counter() - started) * 1e3
            stats.context_used = backend.n_past
            stats.n_ctx = backend.n_ctx
            stats.peak_rss_mb = peak_rss_bytes() / 2**20
            stats.finish_reason = finish
            self.last_stats = stats
            self.last_text = text.text


def _as_pair(request: Any, index: int) -> tuple[Any, str]:
    if isinstance(request, Mapping):
        image, prompt = request.get("image"), request.get("prompt", request.get("question"))
    elif hasattr(request, "image") and (hasattr(request, "question") or hasattr(request, "prompt")):
        image = request.image
        prompt = request.question if hasattr(request, "question") else request.prompt
    elif isinstance(request, (tuple, list)) and len(request) == 2:
        image, prompt = request
    else:
        raise TinyLlavaError(f"request {index} is a {type(request).__name__}; expected (image, prompt), a mapping "
                             "with 'image' and 'prompt', or an object with image and question attributes")
    try:
        return image, check_prompt(prompt)
    except TinyLlavaError as err:
        raise TinyLlavaError(f"request {index}: {err}") from None
