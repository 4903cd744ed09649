"""The ASGI app: OpenAI's Chat Completions API over a :class:`~.pool.WorkerPool`, on Starlette.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models`` (and ``/v1/models/{id}``),
``GET /health`` (503 until every worker is loaded, then 200), ``GET /metrics`` (Prometheus).
With an API key, every ``/v1`` route needs ``Authorization: Bearer KEY`` (compared in constant
time); ``/health`` and ``/metrics`` stay open for probes and scrapers. No CORS headers unless
origins are given. The request body is read up to ``max_body_bytes`` (413 past it, before JSON
parsing); a large body is parsed in a thread. Images are decoded by the worker that answers.
Every refusal has OpenAI's error shape (apps/serve/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinyllava_edge.apps.serve.errors import ApiError, bad_request, unknown_model
from tinyllava_edge.apps.serve.images import ImagePolicy
from tinyllava_edge.apps.serve.metrics import ServeMetrics
from tinyllava_edge.apps.serve.pool import WorkerPool
from tinyllava_edge.apps.serve.request import parse_chat_request
from tinyllava_edge.apps.serve.responses import EventStream, Reply, watch_disconnect
from tinyllava_edge.apps.serve.settings import ServeSettings
from tinyllava_edge.runtime.vlm import VLM

log = logging.getLogger("tinyllava_edge.serve")
OWNER = "tinyllava-edge"
INLINE_PARSE_BYTES = 256 * 1024  # smaller bodies are parsed on the event loop: a thread hop costs more


def build_app(settings: ServeSettings, *, loader: Callable[..., VLM] | None = None,
              on_load_failure: Callable[[BaseException], None] | None = None) -> Starlette:
    """The app for `settings`; its workers load when it starts (`loader`: tinyllava_edge.load unless
    given; `on_load_failure(err)` is called in the event loop when a worker does not load)."""
    metrics = ServeMetrics()
    pool = WorkerPool(settings, metrics, loader)
    policy = ImagePolicy(settings.max_image_bytes, settings.max_image_pixels, settings.allow_files,
                         settings.allow_truncated_images)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pool.start(asyncio.get_running_loop(), on_load_failure or _log_failure)
        try:
            yield
        finally:
            pool.close()

    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        pool.admit()
        handed_over = False  # the event stream releases the request when it ends
        try:
            response = await _answer(request, arrived)
            handed_over = isinstance(response, EventStream)
            return response
        finally:
            if not handed_over:
                pool.release()

    async def _answer(request: Request, arrived: float) -> Response:
        body = await _read_body(request, settings.max_body_bytes)
        if len(body) > INLINE_PARSE_BYTES:  # JSON and base64 of a large body: off the event loop
            chat = await run_in_threadpool(_parse, body, policy, settings.served_model_name)
        else:
            chat = _parse(body, policy, settings.served_model_name)
        reply = Reply(settings.served_model_name, chat.include_usage)  # made first: the worker starts at once
        job = pool.submit(chat, arrived)
        watcher = asyncio.ensure_future(watch_disconnect(request.receive, pool, job))
        try:
            kind, value = await job.events.get()
            if chat.stream and kind in ("piece", "done"):  # the request did not fail before its first token
                stream = EventStream(pool, job, watcher, (kind, value), reply, settings.stream_interval_s)
                watcher = None  # the stream owns it now
                return stream
        finally:
            if watcher is not None:
                watcher.cancel()
        if kind == "gone":  # the client went away (its generation was stopped): nobody reads this answer
            return Response(status_code=499)
        if kind == "error":
            raise value
        return JSONResponse(reply.completion(job.take_pieces(), value))

    def model_card() -> dict:
        card = {"id": settings.served_model_name, "object": "model", "created": started, "owned_by": OWNER}
        if pool.n_ctx is not None:
            card["max_model_len"] = pool.n_ctx  # vLLM's extra field, which clients read for the context size
        return card

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["name"]
        if name != settings.served_model_name:
            raise unknown_model(name, settings.served_model_name)
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        if not pool.ready:
            raise ApiError(503, "the model is still loading", code="model_loading", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "workers": len(pool.workers)})

    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    middleware = [Middleware(CountRequests, metrics=metrics)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"]))
    if settings.api_key:
        middleware.append(Middleware(RequireApiKey, key=settings.api_key))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.pool, app.state.metrics = pool, metrics
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port) for uvicorn (``Server.run(sockets=[...])``), created with
    proto IPPROTO_TCP: asyncio turns Nagle's algorithm off only on connections of such a socket
    (``base_events._set_nodelay`` checks the proto), and with it on every keep-alive response
    waited ~40 ms for a delayed ACK."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _parse(body: bytes, policy: ImagePolicy, served_model: str):
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if isinstance(err, ValueError) else "nested too deeply"
        raise bad_request(f"the request body is not valid JSON ({reason})", code="invalid_json") from None
    return parse_chat_request(payload, policy, served_model)


def _log_failure(err: BaseException) -> None:
    log.error("the model did not load: %s", err)


async def _read_body(request: Request, cap: int) -> bytes:
    too_large = ApiError(413, f"the request body is over the server's limit of {cap} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_large
    return bytes(body)


async def _api_error(request: Request, err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, err: HTTPException) -> Response:
    if err.status_code == 404:
        message = f"{request.method} {request.url.path} is not an endpoint of this server"
    elif err.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
    else:
        message = str(err.detail)
    return await _api_error(request, ApiError(err.status_code, message, headers=dict(err.headers or {})))


async def _server_error(request: Request, err: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
    return await _api_error(request, ApiError(500, "the server failed on this request; its log has the cause"))


class CountRequests:
    """Counts every HTTP answer by path and status (pure ASGI: streaming responses pass through)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(scope["path"], status)


class RequireApiKey:
    """401 for a /v1 request without ``Authorization: Bearer KEY``; the key compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                missing = not header
                err = ApiError(401, "this server needs an API key: send Authorization: Bearer KEY" if missing
                               else "the API key is wrong", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await JSONResponse(err.body(), status_code=401, headers=err.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
