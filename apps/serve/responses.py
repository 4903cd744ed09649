"""What the server sends back: ``chat.completion`` objects, and ``chat.completion.chunk`` events.

Streaming follows OpenAI's framing: each event is ``data: <chunk JSON>`` and a blank line; the
first delta carries ``role``, content deltas follow, the last chunk of the choice carries
``finish_reason``, then (with ``stream_options.include_usage``) one chunk with empty
``choices`` and the ``usage``, then ``data: [DONE]``. An error after the stream began (the
status line is gone) is one ``data: {"error": {...}}`` event before ``[DONE]``, as OpenAI's
and vLLM's servers do.

The client going away is noticed from the connection itself (ASGI ``http.disconnect``), also
while no token is being written, and the job is cancelled at once.
"""

from __future__ import annotations

import asyncio
import json
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
    """The fields one request's answer objects share."""

    def __init__(self, model: str):
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.model = model
        self.created = int(time.time())

    def completion(self, text: str, outcome: Outcome) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": outcome.finish_reason}],
                "usage": usage(outcome)}

    def chunk(self, delta: dict | None, finish_reason: str | None = None, usage_: dict | None = None,
              include_usage: bool = False) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish_reason}]}
        if include_usage:  # OpenAI: every chunk has "usage" (null until the last) when it was asked for
            body["usage"] = usage_
        return event(body)


def event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def wait_disconnect(receive) -> None:
    """Returns when the client has gone (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def next_event(job: Job, disconnect: asyncio.Task) -> tuple | None:
    """The job's next event, or None once the client has gone."""
    if disconnect.done():
        return None
    getter = asyncio.ensure_future(job.events.get())
    await asyncio.wait({getter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


class EventStream:
    """An ASGI response streaming one job's tokens as chunk events; `first` is the event already taken
    (the stream starts only once the request has not failed before its first token)."""

    def __init__(self, pool: WorkerPool, job: Job, disconnect: asyncio.Task, first: tuple, reply: Reply):
        self.pool, self.job, self.disconnect, self.first, self.reply = pool, job, disconnect, first, reply

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        include_usage = self.job.request.include_usage
        reply = self.reply
        answered = False  # the job ended (done or error): nothing to cancel
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._send(send, reply.chunk({"role": "assistant", "content": ""}, include_usage=include_usage))
            event_ = self.first
            while event_ is not None:
                kind, value = event_
                if kind == "piece":
                    await self._send(send, reply.chunk({"content": value}, include_usage=include_usage))
                elif kind == "done":
                    answered = True
                    await self._send(send, reply.chunk({}, value.finish_reason, include_usage=include_usage))
                    if include_usage:
                        await self._send(send, reply.chunk(None, usage_=usage(value), include_usage=True))
                    break
                else:  # "error" after the status line went out
                    answered = True
                    await self._send(send, event(value.body()))
                    break
                event_ = await next_event(self.job, self.disconnect)
            else:
                return  # the client went away: finally cancels the job
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
        except OSError:
            return  # the connection broke while writing: finally cancels the job
        finally:
            self.disconnect.cancel()
            if not answered:
                self.pool.cancel(self.job)
            self.pool.release()

    @staticmethod
    async def _send(send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

