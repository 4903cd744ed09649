"""What the server sends back: ``chat.completion`` objects, and ``chat.completion.chunk`` events.

Streaming follows OpenAI's framing: each event is ``data: <chunk JSON>`` and a blank line; the
first delta carries ``role``, content deltas follow, the last chunk of the choice carries
``finish_reason``, then (with ``stream_options.include_usage``) one chunk with empty
``choices`` and the ``usage``, then ``data: [DONE]``. An error after the stream began (the
status line is gone) is one ``data: {"error": {...}}`` event before ``[DONE]``, as OpenAI's
and vLLM's servers do.

The client going away is noticed from the connection itself (ASGI ``http.disconnect``), also
while no token is being written, and the job is cancelled at once. The role delta goes out in
one write with the first text, and the finish chunk with the last.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time

from tinyllava_edge.apps.serve.pool import Job, Outcome, WorkerPool

DONE = b"data: [DONE]\n\n"


def usage(outcome: Outcome) -> dict:
    stats = outcome.stats
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": stats.decode_tokens,
            "total_tokens": outcome.prompt_tokens + stats.decode_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.prefix_reused}}


class Reply:
    """The fields one request's answer objects share, and its chunks as bytes."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage  # OpenAI: then every chunk has "usage", null until the last
        # A content chunk is most of a stream: its bytes around the text are made once (chunk() below
        # gives the same bytes, tests/api/test_serve_pool.py checks it).
        head, tail = self.chunk({"content": "\0"}).split(b'"\\u0000"')
        self._content = (head, tail)

    def completion(self, text: str, outcome: Outcome) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": outcome.finish_reason}],
                "usage": usage(outcome)}

    def chunk(self, delta: dict | None, finish_reason: str | None = None, usage_: dict | None = None) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish_reason}]}
        if self.include_usage:
            body["usage"] = usage_
        return event(body)

    def content(self, text: str) -> bytes:
        """``chunk({"content": text})``, without building the object."""
        head, tail = self._content
        return head + json.dumps(text, ensure_ascii=False).encode() + tail


def event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def watch_disconnect(receive, pool: WorkerPool, job: Job) -> None:
    """When the client goes away (the body was read): cancel its job at once (the worker stops
    before its next token, whatever the stream is doing), and put ("gone", None) among its events."""
    while (await receive())["type"] != "http.disconnect":
        pass
    pool.cancel(job)
    job.events.put_nowait(("gone", None))


class EventStream:
    """An ASGI response streaming one job's text as chunk events; `first` is the event already taken
    (the stream starts only once the request has not failed before its first token).

    Text goes out as soon as it comes, but no sooner than `interval` seconds after the previous
    chunk: tokens that come faster are joined into one chunk (the first goes out at once, and the
    end flushes at once). At thousands of tokens per second one chunk per token costs the event
    loop and the client more CPU than the model; at the tens per second of a larger model every
    token is its own chunk anyway."""

    def __init__(self, pool: WorkerPool, job: Job, watcher: asyncio.Task, first: tuple, reply: Reply,
                 interval: float = 0.0):
        self.pool, self.job, self.watcher, self.first, self.reply = pool, job, watcher, first, reply
        self.interval = interval

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        reply, job = self.reply, self.job
        loop = asyncio.get_running_loop()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            head = reply.chunk({"role": "assistant", "content": ""})  # goes out with the first text
            kind, value = self.first
            sent = -math.inf  # loop.time() of the last chunk
            while kind == "piece":
                wait = sent + self.interval - loop.time()
                if wait > 0:  # only an ending can come meanwhile: the worker signals once per batch
                    try:
                        kind, value = await asyncio.wait_for(job.events.get(), wait)
                        break
                    except asyncio.TimeoutError:
                        pass
                text = job.take_pieces()
                if text:
                    await self._send(send, head + reply.content(text))
                    head, sent = b"", loop.time()
                    job.first_written.set()  # the worker computes the next token now
                kind, value = await job.events.get()
            if kind == "gone":
                return
            if kind == "done":
                text = job.take_pieces()  # what came while the stream waited out its interval
                await self._send(send, head + (reply.content(text) if text else b"") +
                                 reply.chunk({}, value.finish_reason))
                if reply.include_usage:
                    await self._send(send, reply.chunk(None, usage_=usage(value)))
            else:  # "error" after the status line went out
                await self._send(send, head + event(value.body()))
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
        except OSError:
            return  # the connection broke while writing: finally cancels the job
        finally:
            job.first_written.set()  # a worker never waits on a stream that ended
            self.watcher.cancel()
            self.pool.cancel(job)  # nothing to do when it ended
            self.pool.release()

    @staticmethod
    async def _send(send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})
