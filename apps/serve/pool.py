"""Workers, the bounded queue, and how a request becomes tokens on one of them.

A worker is one runtime instance (``tinyllava_edge.load``: a model and its own KV cache) and one
thread that answers its jobs one after another. The pool lives in the event loop: it admits at
most ``workers + queue`` requests at once (counted from before their body is read; past that 429
with a ``Retry-After`` estimated from recent service times), hands a job to an idle worker or
queues it. Tokens go back to the event loop as they are chosen, in batches: the worker adds each
to its job and wakes the loop only when the loop has taken the previous batch (Job).

Reuse across requests. An OpenAI client sends the whole conversation each time; the worker
renders it with the model's template as ``VLM.chat()`` does (``{system} USER: <image>\\n{q1}
ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT:``) and starts a fresh prompt, which the edge backend
matches against what its KV cache holds (the longest common prefix) and against its prefix
store (the state after system prompt + image), so a follow-up about the same image evaluates
only its new tokens. For that the follow-up must reach the same worker: each worker remembers
the affinity keys (system prompt + first image) of its recent requests, an idle worker that holds
the key is preferred, and a worker that frees up takes the first queued job it holds the key of
(looking a few places down the queue) before the head. Image embeddings are one cache shared by
all workers (ImageCache is thread-safe), found by the image's bytes, so a repeated image is
neither decoded nor preprocessed nor encoded again, even on another worker.

Cancelling: when the client goes away, the job is taken out of the queue, or its worker stops
after the token it is choosing (the stream is closed between two tokens) and takes the next job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import islice

from tinyllava_edge.apps.serve.errors import ApiError, bad_request
from tinyllava_edge.apps.serve.metrics import ServeMetrics
from tinyllava_edge.apps.serve.request import ChatRequest
from tinyllava_edge.apps.serve.settings import ServeSettings
from tinyllava_edge.constants import IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.llamacpp import split_segments
from tinyllava_edge.runtime.backend import positions
from tinyllava_edge.runtime.sampling import sampling_params
from tinyllava_edge.runtime.stats import GenerationStats
from tinyllava_edge.runtime.vlm import VLM, question_text

log = logging.getLogger("tinyllava_edge.serve")

AFFINITY_KEYS = 64  # keys a worker remembers; its prefix store holds about a dozen image prefixes anyway
AFFINITY_SCAN = 8  # queued jobs a freed worker looks through for one it holds the key of
SERVICE_EWMA = 0.2  # weight of the latest request in the service-time estimate behind Retry-After
# How long a worker waits, after a streamed answer's first text, for the event loop to write it
# before it computes the next token. Decoding keeps every core busy (llama.cpp's threads, one per
# physical core), so the loop thread would otherwise wait for a core and for the GIL to send the
# first chunk; with the worker paused it gets both at once. The wait is a fraction of a
# millisecond when the loop is free; the cap bounds it when the loop is busy with other clients.
FIRST_CHUNK_WAIT_S = 0.005


@dataclass(frozen=True)
class Outcome:
    stats: GenerationStats
    prompt_tokens: int
    finish_reason: str  # OpenAI's: "stop" | "length" (also when the context filled up)
    cancelled: bool


class Job:
    """One request on its way. The worker adds the answer's text with `add_piece`; the event loop
    takes what has come with `take_pieces`. `events` tells the loop what happened: ("piece", None)
    when text is waiting (streams only: once until it is taken, so a batch of tokens costs one
    hand-off between the threads, however many tokens the worker chose meanwhile), then
    ("done", Outcome) | ("error", ApiError), or ("gone", None) when the client left."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop, arrived: float):
        self.request = request
        self.affinity = request.affinity
        self.arrived = arrived  # time.perf_counter() when the request came in
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.ended = False  # its last event was posted (loop thread)
        self._loop = loop
        self._pieces: list[str] = []
        self._lock = threading.Lock()
        self._signalled = False  # a ("piece", None) event is posted and its text not taken yet
        self.first_written = threading.Event()  # set by the stream once the first text went out (or it ended)

    def add_piece(self, piece: str) -> None:
        """From the worker thread: more text; the loop hears of it only if it took the last batch."""
        with self._lock:
            self._pieces.append(piece)
            if self._signalled or not self.request.stream:  # a plain answer is taken whole at "done"
                return
            self._signalled = True
        self._loop.call_soon_threadsafe(self.events.put_nowait, ("piece", None))

    def take_pieces(self) -> str:
        """From the event loop: the text added since the last call (the next piece signals again)."""
        with self._lock:
            text = "".join(self._pieces)
            self._pieces.clear()
            self._signalled = False
        return text


class Worker:
    def __init__(self, index: int, vlm: VLM, pool: WorkerPool):
        self.index = index
        self.vlm = vlm
        self.recent: OrderedDict[str, None] = OrderedDict()  # affinity keys, least recent first
        self.current: Job | None = None  # the job it answers now
        self._pool = pool
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"serve-worker-{index}", daemon=True)
        self._thread.start()

    def give(self, job: Job) -> None:
        self.recent[job.affinity] = None
        self.recent.move_to_end(job.affinity)
        while len(self.recent) > AFFINITY_KEYS:
            self.recent.popitem(last=False)
        self._inbox.put(job)

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)
        self.vlm.close()

    def _run(self) -> None:
        while (job := self._inbox.get()) is not None:
            began = time.perf_counter()
            self.current = job
            last = None
            try:
                last = self._answer(job)
            finally:
                self.current = None
                # the job's last event travels with the worker's release, in one event-loop
                # callback: a client that asks its follow-up the moment it has the answer finds
                # this worker idle, and so the worker that holds its image
                self._pool.finished(self, time.perf_counter() - began, job, last)

    def _answer(self, job: Job) -> tuple[str, object] | None:
        """Answer `job`, its pieces emitted as they come; return its last event ("done" or "error"),
        None when it was cancelled before it started."""
        if job.cancelled.is_set():
            return None
        vlm, request = self.vlm, job.request
        stats = GenerationStats()
        try:
            # decoded here (the queue holds bytes), unless the shared cache knows these bytes already
            rows = vlm.encode_images(request.images, [stats] * len(request.images))
            segments = render_segments(vlm, request, rows)
            prompt_tokens = positions(segments)
            params = sampling_params(answer_budget(request.max_tokens, prompt_tokens, vlm.n_ctx,
                                                   self._pool.settings.default_max_tokens),
                                     request.temperature, request.top_p, request.seed, request.stop)
            stop_ids = vlm.backend.stop_ids
            if request.ignore_eos:  # this worker's thread alone uses its backend: restored below
                vlm.backend.stop_ids = frozenset()
            stream = vlm.decode(segments, params, stats, fresh=True, started=job.arrived)
            first = request.stream  # a stream's first text goes out before the next token (FIRST_CHUNK_WAIT_S)
            try:
                for piece in stream:
                    if job.cancelled.is_set():
                        break  # before the next token is evaluated: closing the stream ends the decode
                    job.add_piece(piece)
                    if first:
                        first = False
                        job.first_written.wait(FIRST_CHUNK_WAIT_S)
            finally:
                stream.close()
                vlm.backend.stop_ids = stop_ids
        except ApiError as err:
            return "error", err
        except TinyLlavaError as err:  # the runtime's sentence about this request (image, prompt, settings)
            return "error", bad_request(str(err))
        except Exception:  # noqa: BLE001 - a bug, not the client's fault: logged, answered 500, worker kept
            log.exception("worker %d failed on a request", self.index)
            return "error", ApiError(500, "the server failed while answering this request; its log has the cause")
        self._pool.metrics.record(stats, prompt_tokens, time.perf_counter() - job.arrived)
        finish = {"stop": "stop", "length": "length", "context": "length"}.get(stats.finish_reason, "stop")
        return "done", Outcome(stats, prompt_tokens, finish, job.cancelled.is_set())


def render_segments(vlm: VLM, request: ChatRequest, rows: list) -> list:
    """The conversation as the model sees it: ChatSession's rendering of earlier turns from their
    text (``"<image>\\n" + question`` where a turn has an image, answers stripped), tokenized
    with the model's tokenizer, the i-th image placeholder taking rows[i]."""
    messages = []
    for turn in request.turns:
        messages.append({"from": "human", "value": question_text(turn.question, turn.image is not None)})
        if turn.answer is not None:
            messages.append({"from": "gpt", "value": turn.answer.strip()})
    template = vlm.template
    if request.system is not None:
        # keep the separator the template puts after its system prompt (" " for Factory's templates)
        separator = template.system[len(template.system.rstrip()):] or " "
        template = replace(template, system=request.system.strip() + separator if request.system.strip() else "")
    ids = template.encode(messages, vlm.backend.prompt_tokenizer(True), mode="eval")["input_ids"]
    return split_segments(ids, list(rows), IMAGE_TOKEN_INDEX)


def answer_budget(max_tokens: int | None, prompt_tokens: int, n_ctx: int, default: int) -> int:
    """Tokens the answer may take: `max_tokens`, or `default` capped by the room the context leaves;
    400 context_length_exceeded when the prompt leaves no room or less than `max_tokens`."""
    room = n_ctx - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" and max_tokens asks for {max_tokens} more" if max_tokens is not None else ""
        raise ApiError(400, f"this model's context holds {n_ctx} positions; the messages take {prompt_tokens}{asked}",
                       param="messages", code="context_length_exceeded")
    return max_tokens if max_tokens is not None else min(default, room)


class WorkerPool:
    """`settings.workers` workers loaded in the background (`ready` once all are), and the queue."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics, loader: Callable[..., VLM] | None = None):
        self.settings = settings
        self.metrics = metrics
        self.workers: list[Worker] = []
        self.ready = False
        self.load_error: BaseException | None = None
        self._loader = loader
        self._idle: list[Worker] = []
        self._waiting: deque[Job] = deque()
        self._service_s = 1.0  # running estimate of one request's time on a worker
        self._in_flight = 0  # admitted requests not finished yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- loading ---------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, on_failure: Callable[[BaseException], None]) -> None:
        """Load the workers in a thread; `on_failure(err)` (in the loop) if one does not load."""
        self._loop = loop
        threading.Thread(target=self._load, args=(on_failure,), name="serve-loader", daemon=True).start()

    def _load(self, on_failure) -> None:
        vlms: list[VLM] = []
        try:
            while len(vlms) < self.settings.workers:
                vlms.append(self._load_one())
        except BaseException as err:  # noqa: BLE001 - reported to the CLI, which prints one line and exits
            for vlm in vlms:
                vlm.close()
            self.load_error = err
            self._loop.call_soon_threadsafe(on_failure, err)
            return
        for vlm in vlms[1:]:
            vlm.image_cache = vlms[0].image_cache  # one embedding cache for all workers
        self._loop.call_soon_threadsafe(self._loaded, vlms)

    def _load_one(self) -> VLM:
        from tinyllava_edge.runtime import load
        from tinyllava_edge.runtime.devices import default_threads, detect

        options = dict(self.settings.load_options)
        threads = self.settings.threads
        if threads is None and self.settings.workers > 1:
            # workers run at once: each gets its share of the cores (spinning threads on a busy core
            # cost far more than they give, docs/bench.md)
            threads = max(1, default_threads(detect()) // self.settings.workers)
        if threads is not None:
            options["n_threads"] = threads
        return (self._loader or load)(self.settings.model, device=self.settings.device, **options)

    def _loaded(self, vlms: list[VLM]) -> None:
        if self._closed:
            for vlm in vlms:
                vlm.close()
            return
        self.workers = [Worker(i, vlm, self) for i, vlm in enumerate(vlms)]
        self._idle = list(self.workers)
        self.metrics.workers.set(len(self.workers))
        self.ready = True

    @property
    def n_ctx(self) -> int | None:
        return self.workers[0].vlm.n_ctx if self.workers else None

    # -- scheduling (event loop thread) ----------------------------------------------------------------

    def admit(self) -> None:
        """Count a request in before its body is read: 503 while loading, 429 with Retry-After when
        `workers + queue` requests are in flight already (being read, waiting or answered), so the
        memory requests hold is bounded by the body cap times that number. `release()` when done."""
        if not self.ready:
            raise ApiError(503, "the model is still loading; retry when GET /health answers 200", code="model_loading",
                           headers={"Retry-After": "1"})
        busy = len(self.workers)
        if self._in_flight >= busy + self.settings.queue:
            self.metrics.rejected.inc()
            wait = max(1, math.ceil(self._service_s * (self._in_flight - busy + 1) / busy))
            raise ApiError(429, f"all {busy} workers are busy and {self._in_flight - busy} more requests are "
                                f"waiting; retry in {wait} s", code="queue_full", headers={"Retry-After": str(wait)})
        self._in_flight += 1

    def release(self) -> None:
        self._in_flight -= 1

    def submit(self, request: ChatRequest, arrived: float) -> Job:
        """Start an admitted request on an idle worker (the one holding its affinity key if any) or queue it."""
        job = Job(request, asyncio.get_running_loop(), arrived)
        worker = next((w for w in self._idle if job.affinity in w.recent), None) or (
            self._idle[0] if self._idle else None)
        if worker is not None:
            self._idle.remove(worker)
            worker.give(job)
        else:
            self._waiting.append(job)  # admit() bounds it by the queue size
        self._gauges()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: out of the queue, or stop its generation at the next token (once;
        nothing to do for a job that has ended)."""
        if job.cancelled.is_set() or job.ended:
            return
        job.cancelled.set()
        try:
            self._waiting.remove(job)
        except ValueError:
            pass  # running or done: the worker sees the flag
        self.metrics.cancelled.inc()
        self._gauges()

    def finished(self, worker: Worker, seconds: float, job: Job, last: tuple[str, object] | None) -> None:
        """From a worker thread: it is free again, and `job`'s last event (if any) is due."""
        self._loop.call_soon_threadsafe(self._next, worker, seconds, job, last)

    def _next(self, worker: Worker, seconds: float, job: Job, last: tuple[str, object] | None) -> None:
        self._service_s += SERVICE_EWMA * (seconds - self._service_s)
        try:
            if not self._closed:
                self._release(worker)
        finally:
            if last is not None:  # after the release: the answer reaches its client with the worker free
                job.ended = True
                job.events.put_nowait(last)

    def _release(self, worker: Worker) -> None:
        job = next((j for j in islice(self._waiting, AFFINITY_SCAN) if j.affinity in worker.recent), None)
        if job is None and self._waiting:
            job = self._waiting[0]
        if job is None:
            self._idle.append(worker)
        else:
            self._waiting.remove(job)
            worker.give(job)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.workers_busy.set(len(self.workers) - len(self._idle))

    def close(self) -> None:
        """Stop every worker (a running answer ends at its next token) and free the models."""
        self._closed = True
        for job in [*self._waiting, *(w.current for w in self.workers if w.current is not None)]:
            job.cancelled.set()
        self._waiting.clear()
        for worker in self.workers:
            worker.stop()
        self.workers, self._idle, self.ready = [], [], False
