"""tinyllava-serve in this process, with timing under control: loading, a full queue, clients
that go away, worker affinity, and the command line.

The server runs on uvicorn in a thread on a free loopback port; its workers load the miniature
bundle through a loader that can be held back (loading) and that slows every token down
(`DELAY_S` per evaluation), so a generation lasts long enough to be interrupted, and records when
each token was evaluated.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from tinyllava_edge.apps.serve.app import build_app, listening_socket  # noqa: E402
from tinyllava_edge.apps.serve.settings import ServeSettings  # noqa: E402

DELAY_S = 0.02  # per token evaluated: 1000 tokens take ~20 s, far longer than any test waits
LONG = 1000  # max_tokens of a request meant to be interrupted


class SlowLoader:
    """Loads the real model, optionally after `gate` opens; each worker's evaluations sleep `delay`
    first and are timed (`times`: time.monotonic() of every feed), and its answers never end at
    EOS (the random miniature may choose it at any step): they run to max_tokens."""

    def __init__(self, delay: float = DELAY_S, gate: threading.Event | None = None, eager_eos: bool = False):
        self.delay, self.gate = delay, gate
        self.eager_eos = eager_eos  # instead: EOS is the likeliest token at every step
        self.times: list[float] = []
        self.vlms = []

    def __call__(self, path, device="cpu", **options):
        import tinyllava_edge

        if self.gate is not None:
            assert self.gate.wait(60), "the test never released the loader"
        vlm = tinyllava_edge.load(path, device=device, **options)
        feed = vlm.backend.feed

        eos = min(vlm.backend.stop_ids)

        def slow_feed(segments):
            time.sleep(self.delay)
            self.times.append(time.monotonic())
            logits = feed(segments)
            if self.eager_eos:
                logits[eos] = logits.max() + 1.0
            return logits

        vlm.backend.feed = slow_feed
        if not self.eager_eos:
            vlm.backend.stop_ids = frozenset()
        self.vlms.append(vlm)
        return vlm


@contextlib.contextmanager
def serving(bundle, loader, **settings):
    """(base URL without /v1, app) of a server on 127.0.0.1; stopped on exit."""
    settings = ServeSettings(model=bundle, served_model_name="mini", device="cpu", threads=1, **settings)
    app = build_app(settings, loader=loader)
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the workers did not load"
        time.sleep(0.05)


def png_uri(seed: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(question="What is in the picture?", image_seed: int | None = 0, max_tokens=4, stream=False,
         history=()) -> dict:
    content = [{"type": "text", "text": question}]
    if image_seed is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_uri(image_seed)}})
    return {"model": "mini", "messages": [*history, {"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "stream_options": {"include_usage": True} if stream else None}


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def content_chunks(lines, n: int) -> int:
    """Read SSE events from `lines` (a response's iter_lines(), which the caller keeps: a line
    iterator dropped midway closes the connection) until `n` content deltas came; returns how many
    events were read."""
    seen = events = 0
    for line in lines:
        if not line.startswith("data: {"):
            continue
        events += 1
        delta = json.loads(line[len("data: "):])["choices"][0]["delta"]
        seen += bool(delta.get("content"))
        if seen >= n:
            return events
    raise AssertionError("the stream ended early")


# -- tests ------------------------------------------------------------------------------------------


def test_health_is_503_until_loaded(miniature_bundle):
    gate = threading.Event()
    with serving(miniature_bundle, SlowLoader(delay=0, gate=gate)) as (url, _):
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "model_loading"
        early = httpx.post(url + "/v1/chat/completions", json=body(), timeout=10)
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert early.json()["error"]["type"] == "server_error"
        gate.set()
        wait_ready(url)
        assert httpx.post(url + "/v1/chat/completions", json=body(), timeout=60).status_code == 200


def test_full_queue_answers_429_with_retry_after(miniature_bundle):
    loader = SlowLoader()
    with serving(miniature_bundle, loader, workers=1, queue=1) as (url, app):
        wait_ready(url)
        with httpx.Client(timeout=60) as running, httpx.Client(timeout=60) as waiting:
            with running.stream("POST", url + "/v1/chat/completions", json=body(max_tokens=LONG, stream=True)) as a:
                lines = a.iter_lines()
                content_chunks(lines, 1)  # the worker is busy with it
                queued = threading.Thread(target=lambda: waiting.post(url + "/v1/chat/completions",
                                                                      json=body(max_tokens=2)))
                queued.start()
                deadline = time.monotonic() + 10
                while metric(url, "tinyllava_queue_depth") < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                refused = httpx.post(url + "/v1/chat/completions", json=body(), timeout=10)
                assert refused.status_code == 429
                assert int(refused.headers["retry-after"]) >= 1
                error = refused.json()["error"]
                assert error["code"] == "queue_full" and "retry in" in error["message"]
            queued.join(60)  # closing the first stream cancelled it: the queued request got the worker
            assert not queued.is_alive()
        assert metric(url, "tinyllava_rejected_requests_total") == 1


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(miniature_bundle, stream):
    loader = SlowLoader()
    with serving(miniature_bundle, loader, workers=1) as (url, _):
        wait_ready(url)
        if stream:
            with httpx.Client(timeout=60) as client:
                with client.stream("POST", url + "/v1/chat/completions", json=body(max_tokens=LONG, stream=True)) as r:
                    lines = r.iter_lines()
                    content_chunks(lines, 3)
                    time.sleep(0.2)
                    assert len([t for t in loader.times if t > time.monotonic() - 0.1]) >= 2  # still generating
                    gone = time.monotonic()  # leaving the block closes the connection mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s of ~20 s
                httpx.post(url + "/v1/chat/completions", json=body(max_tokens=LONG), timeout=0.5)
            gone = time.monotonic()
        time.sleep(0.5)  # ~25 tokens' time: a generation that went on would show here
        after = [t for t in loader.times if t > gone]
        assert len(after) <= 2, f"{len(after)} tokens evaluated after the client went away"
        assert len(loader.times) < 100
        assert metric(url, "tinyllava_cancelled_requests_total") == 1
        began = time.monotonic()  # the worker is free: the next request does not wait for the first
        assert httpx.post(url + "/v1/chat/completions", json=body(max_tokens=2), timeout=30).status_code == 200
        assert time.monotonic() - began < 5


def test_follow_up_goes_to_the_worker_holding_its_image(miniature_bundle):
    """Two workers: a follow-up about an image goes back to the worker that saw it, and finds the
    image's KV prefix there (cached_tokens covers the image rows)."""
    loader = SlowLoader(delay=0)
    with serving(miniature_bundle, loader, workers=2) as (url, app):
        wait_ready(url)
        with httpx.Client(timeout=60) as client:
            def ask(**kw):
                resp = client.post(url + "/v1/chat/completions", json=body(**kw))
                assert resp.status_code == 200, resp.text
                return resp.json()

            a = ask(image_seed=1)  # worker 0
            ask(image_seed=2)  # worker 1
            c = ask(image_seed=3)  # worker 0 again (first idle); its cache now holds image 3
            history = [body(image_seed=1)["messages"][0],
                       {"role": "assistant", "content": a["choices"][0]["message"]["content"]}]
            follow = ask(question="And its colour?", image_seed=None, history=history)
        image_rows = loader.vlms[0].backend.image_tokens
        cached_c = c["usage"]["prompt_tokens_details"]["cached_tokens"]  # the text before the image only
        cached_follow = follow["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached_follow >= cached_c + image_rows
        assert metric(url, "tinyllava_image_cache_hits_total") == 1  # the follow-up brings image 1 again
        assert loader.vlms[0].image_cache is loader.vlms[1].image_cache


def test_ignore_eos_decodes_max_tokens(miniature_bundle):
    """vLLM's ignore_eos: a model that would stop at once decodes max_tokens tokens; the next
    request stops at EOS again (the worker's stop tokens are restored)."""
    with serving(miniature_bundle, SlowLoader(delay=0, eager_eos=True)) as (url, _):
        wait_ready(url)

        def usage(**extra):
            out = httpx.post(url + "/v1/chat/completions", json={**body(max_tokens=12), **extra}, timeout=60).json()
            return out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]

        assert usage() == (1, "stop")
        assert usage(ignore_eos=True) == (12, "length")
        assert usage() == (1, "stop")


def test_a_repeated_image_is_not_decoded_again(miniature_bundle, monkeypatch):
    """An image whose bytes the server has seen goes to its cached embeddings undecoded, with the
    answer of a miss; another image of the same size is decoded and encoded on its own."""
    from tinyllava_edge.apps.serve.images import RequestImage

    decodes = []
    decode = RequestImage.decode
    monkeypatch.setattr(RequestImage, "decode", lambda self: decodes.append(self.digest) or decode(self))
    with serving(miniature_bundle, SlowLoader(delay=0)) as (url, _):
        wait_ready(url)

        def answer(seed):
            out = httpx.post(url + "/v1/chat/completions", json={**body(image_seed=seed, max_tokens=8),
                                                                 "temperature": 1.0, "seed": 11}, timeout=60)
            assert out.status_code == 200, out.text
            return out.json()["choices"][0]["message"]["content"]

        miss = answer(1)
        assert answer(1) == miss and len(decodes) == 1
        assert metric(url, "tinyllava_image_cache_hits_total") == 1
        answer(2)  # also 32 x 32 pixels
        assert len(decodes) == 2 and decodes[0] != decodes[1]
        assert metric(url, "tinyllava_image_cache_hits_total") == 1


def _stream(url: str, request: dict) -> tuple[list[str], dict, float, float]:
    """(content deltas, usage, seconds to the first content, seconds to [DONE]) of a streamed request;
    checks the framing around them: role first, finish then usage, then [DONE]."""
    began = time.monotonic()
    first = None
    contents, events = [], []
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            events.append(line[len("data: "):])
            if events[-1] != "[DONE]" and json.loads(events[-1])["choices"]:
                content = json.loads(events[-1])["choices"][0]["delta"].get("content")
                if content:
                    first = first or time.monotonic() - began
                    contents.append(content)
    done = time.monotonic() - began
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"] == []
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    return contents, chunks[-1]["usage"], first, done


def test_streamed_tokens_come_in_batches_complete_and_in_order(miniature_bundle):
    """Tokens faster than the stream interval are joined into fewer chunks that add up to the plain
    answer; the first chunk and the end are not held back by the interval."""
    request = {**body(max_tokens=60, stream=True), "temperature": 1.0, "seed": 5}  # varied tokens
    with serving(miniature_bundle, SlowLoader(delay=0.002), stream_interval_s=0.05) as (url, _):
        wait_ready(url)
        plain = httpx.post(url + "/v1/chat/completions", json={**request, "stream": False}, timeout=60).json()
        contents, usage, _, _ = _stream(url, request)
        assert "".join(contents) == plain["choices"][0]["message"]["content"]
        assert usage["completion_tokens"] == 60 and len(contents) <= 30  # ~2 ms a token, a chunk per 50 ms
    with serving(miniature_bundle, SlowLoader(delay=0.02), stream_interval_s=30.0) as (url, _):
        wait_ready(url)
        request["max_tokens"] = 10
        plain = httpx.post(url + "/v1/chat/completions", json={**request, "stream": False}, timeout=60).json()
        contents, usage, first, done = _stream(url, request)
        assert "".join(contents) == plain["choices"][0]["message"]["content"]
        assert len(contents) == 2 and first < 5 and done < 10  # the first at once, the rest with the finish


def test_the_first_chunk_goes_out_before_the_next_token(miniature_bundle, monkeypatch):
    """A streamed answer's worker waits, after the first text, until the stream has written it
    (here the write takes 0.3 s and the wait may last 5 s): no token is evaluated meanwhile."""
    import asyncio

    from tinyllava_edge.apps.serve import pool, responses

    monkeypatch.setattr(pool, "FIRST_CHUNK_WAIT_S", 5.0)
    written = []
    send = responses.EventStream._send

    async def slow_send(send_, data):
        if not written:
            await asyncio.sleep(0.3)
        await send(send_, data)
        written.append(time.monotonic())

    monkeypatch.setattr(responses.EventStream, "_send", staticmethod(slow_send))
    loader = SlowLoader(delay=0)
    with serving(miniature_bundle, loader) as (url, _):
        wait_ready(url)
        contents, usage, first, done = _stream(url, body(max_tokens=5, stream=True))
    assert usage["completion_tokens"] == 5 and done < 4  # the wait ended with the write, not after 5 s
    prompt, after_first = loader.times[:2]  # the prompt's evaluation, then the first token's
    assert after_first >= written[0] > prompt + 0.25


def test_disconnect_stops_generation_while_the_stream_waits_out_its_interval(miniature_bundle):
    loader = SlowLoader()
    with serving(miniature_bundle, loader, stream_interval_s=30.0) as (url, _):
        wait_ready(url)
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", url + "/v1/chat/completions", json=body(max_tokens=LONG, stream=True)) as r:
                content_chunks(r.iter_lines(), 1)
                time.sleep(0.2)
                gone = time.monotonic()
        time.sleep(0.5)
        assert len([t for t in loader.times if t > gone]) <= 2
        assert metric(url, "tinyllava_cancelled_requests_total") == 1


def test_a_batch_of_pieces_is_one_hand_off():
    """The worker's pieces reach the event loop as one ("piece", None) event until the loop takes
    them, joined in order; the next piece signals again; a plain answer's pieces signal nothing."""
    import asyncio
    from types import SimpleNamespace

    from tinyllava_edge.apps.serve.pool import Job

    async def run(stream: bool):
        job = Job(SimpleNamespace(affinity="k", stream=stream), asyncio.get_running_loop(), 0.0)
        worker = threading.Thread(target=lambda: [job.add_piece(f"{i},") for i in range(200)])
        worker.start()
        await asyncio.to_thread(worker.join)
        await asyncio.sleep(0)
        queued = job.events.qsize()
        text = job.take_pieces()
        job.add_piece("end")
        await asyncio.sleep(0)
        return queued, text, job.events.qsize(), job.take_pieces()

    queued, text, after, rest = asyncio.run(run(stream=True))
    assert queued == 1 and text == "".join(f"{i}," for i in range(200)) and after == 2 and rest == "end"
    assert asyncio.run(run(stream=False))[::2] == (0, 0)


def test_api_key_is_required_on_v1_only(miniature_bundle):
    with serving(miniature_bundle, SlowLoader(delay=0), api_key="sk-right") as (url, _):
        wait_ready(url)
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-wron"}, timeout=10)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-right"}, timeout=10).status_code \
            == 200
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert httpx.get(url + "/metrics", timeout=10).status_code == 200


def test_cors_only_for_the_origins_given(miniature_bundle):
    with serving(miniature_bundle, SlowLoader(delay=0), cors_origins=("http://app.example",)) as (url, _):
        wait_ready(url)
        pre = httpx.options(url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example"}, timeout=10)
        assert "access-control-allow-origin" not in other.headers


# -- the command line -----------------------------------------------------------------------------------


def _serve(*args: str, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllava_edge.cli.serve", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_refuses_bad_arguments_in_one_line(tmp_path, miniature_bundle):
    _one_error_line(_serve("--model", str(tmp_path / "missing")), "does not exist")
    _one_error_line(_serve("--model", str(miniature_bundle), "--workers", "0"), "--workers must be at least 1")
    _one_error_line(_serve("--model", str(miniature_bundle), "--stream-interval-ms", "-1"),
                    "--stream-interval-ms must be between 0 and 1000")
    _one_error_line(_serve("--model", str(miniature_bundle), "--allow-files", str(tmp_path / "nope")),
                    "is not a directory")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        _one_error_line(_serve("--model", str(miniature_bundle), "--port", port), f"127.0.0.1:{port}")


def test_cli_model_that_does_not_load_is_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    proc = _serve("--model", str(broken), "--port", "0", "--device", "cpu")
    _one_error_line(proc, "")


def test_cli_settings(tmp_path, miniature_bundle, monkeypatch):
    from tinyllava_edge.cli.serve import build_parser, settings_from_args

    monkeypatch.setenv("TINYLLAVA_API_KEY", "sk-env")
    settings = settings_from_args(build_parser().parse_args(["--model", str(miniature_bundle)]))
    assert settings.api_key == "sk-env" and settings.served_model_name == miniature_bundle.name
    assert settings.workers == 1 and settings.allow_files is None and settings.cors_origins == ()
    settings = settings_from_args(build_parser().parse_args(["--model", str(miniature_bundle), "--api-key", "sk-flag",
                                                             "--max-image-mb", "0.5"]))
    assert settings.api_key == "sk-flag" and settings.max_image_bytes == 2**19
    assert settings.stream_interval_s == 0.01
    assert settings_from_args(build_parser().parse_args(["--model", str(miniature_bundle), "--stream-interval-ms",
                                                         "25"])).stream_interval_s == 0.025
    assert build_parser().parse_args([]).host == "127.0.0.1"


def test_content_chunks_are_the_general_chunk_bytes():
    from tinyllava_edge.apps.serve.responses import Reply

    for include_usage in (False, True):
        reply = Reply('m/"é"', include_usage)
        for text in ("", "a", 'q"uote\\', "ü ✓ \n\t\0", "\u2028 </script>"):
            assert reply.content(text) == reply.chunk({"content": text})
