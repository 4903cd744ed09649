"""The OpenAI client suite: the official SDK and raw HTTP against a server's /v1 (see conftest.py).

Greedy requests (temperature 0) throughout, so answers can be compared between calls. Tests that
use the `ours` fixture check tinyllava-serve's own behaviour and skip against another server.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MAX_TOKENS = 8


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes | Image.Image, media_type: str = "image/png") -> str:
    if isinstance(data, Image.Image):
        data = png_bytes(data)
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def user(text: str, url: str | None = None, bare: bool = False) -> dict:
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.insert(0, {"type": "image_url", "image_url": url if bare else {"url": url}})
    return {"role": "user", "content": parts}


def ask(client, target, messages, **options):
    options = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
    return client.chat.completions.create(model=target.model, messages=messages, **options)


def post(target, body, *, headers=None, raw: bytes | None = None, path="/chat/completions", method="POST",
         timeout=120) -> httpx.Response:
    headers = {**target.headers(), **(headers if headers is not None else {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.request(method, target.base_url + path, content=content if method == "POST" else None,
                         headers={"content-type": "application/json", **headers}, timeout=timeout)


def assert_error_shape(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"].strip() and "\n" not in error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


# -- answers ----------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client, target):
    ids = [m.id for m in client.models.list().data]
    assert target.model in ids
    if target.ours:  # vLLM 0.32 has no GET /v1/models/{id}
        assert client.models.retrieve(target.model).id == target.model


def test_chat_completion_with_an_image(client, target, shapes):
    image, question = shapes[0]
    out = ask(client, target, [user(question, data_uri(image))])
    assert out.object == "chat.completion" and out.model == target.model and out.id
    (choice,) = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = out.usage
    assert 1 <= usage.completion_tokens <= MAX_TOKENS
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_answers_equal_the_runtime(client, ours, shapes):
    """The server renders a conversation as the runtime does: a first question's greedy answer is
    VLM.generate's; a follow-up's is what the runtime answers to ChatSession's rendering of the
    same turns from their text (what VLM.chat() evaluates after it drops turns; within one
    session it keeps the answer's own tokens, which a stateless API cannot)."""
    import time

    import tinyllava_edge
    from tinyllava_edge.runtime.chat import Turn
    from tinyllava_edge.runtime.sampling import sampling_params
    from tinyllava_edge.runtime.stats import GenerationStats
    from tinyllava_edge.runtime.vlm import question_text

    image, question = shapes[1]
    follow_up = "Is there anything else?"
    out = ask(client, ours, [user(question, data_uri(image))])
    first = out.choices[0].message.content
    out = ask(client, ours, [user(question, data_uri(image)), {"role": "assistant", "content": first},
                             user(follow_up)])
    with tinyllava_edge.load(ours.bundle, device="cpu", n_threads=1) as vlm:
        assert vlm.generate(image, question, max_new_tokens=MAX_TOKENS) == first
        chat = vlm.chat()
        (rows,) = vlm.encode_images([image])
        segments = chat._rendered([Turn(question, rows, first, ())], question_text(follow_up, False), None)
        params = sampling_params(MAX_TOKENS)
        expected = "".join(vlm.decode(segments, params, GenerationStats(), fresh=True, started=time.perf_counter()))
    assert out.choices[0].message.content == expected


def test_multi_turn_follow_up_reuses_the_prefix(client, target, shapes):
    image, question = shapes[2]
    messages = [user(question, data_uri(image))]
    first = ask(client, target, messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 user("And what colour is it?")]
    second = ask(client, target, messages)
    assert second.choices[0].message.role == "assistant" and second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    if target.ours:  # the follow-up prefills only what is new: the first prompt came from the KV cache
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_stream_equals_the_plain_answer(client, target, shapes):
    image, question = shapes[3]
    messages = [user(question, data_uri(image))]
    plain = ask(client, target, messages)
    chunks = list(ask(client, target, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choice = [c for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in with_choice]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choice)
    assert text == plain.choices[0].message.content
    assert not chunks[-1].choices and chunks[-1].usage is not None  # the usage chunk comes last
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing(target, shapes):
    image, question = shapes[0]
    body = {"model": target.model, "messages": [user(question, data_uri(image))], "max_tokens": 4,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", target.base_url + "/chat/completions", json=body, headers=target.headers(),
                      timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finished = [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1 and chunks[finished[0]]["choices"][0]["finish_reason"] in ("stop", "length")
    assert finished[0] == len(chunks) - 2 and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_stream_without_usage_ends_with_the_finish_chunk(target):
    body = {"model": target.model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 2,
            "temperature": 0, "stream": True}
    raw = post(target, body).text
    events = raw[:-2].split("\n\n")
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in json.loads(e[len("data: "):]) or json.loads(e[len("data: "):])["usage"] is None
               for e in events[:-1])


def test_max_tokens_and_length(client, target, shapes):
    image, question = shapes[4]
    out = ask(client, target, [user(question, data_uri(image))], max_tokens=1)
    assert out.usage.completion_tokens == 1 and out.choices[0].finish_reason == "length"
    out = ask(client, target, [user(question, data_uri(image))], max_tokens=None, max_completion_tokens=1)
    assert out.usage.completion_tokens == 1


def test_stop_string_cuts_the_answer(client, ours, shapes):
    image, question = shapes[5]
    full = ask(client, ours, [user(question, data_uri(image))], max_tokens=16).choices[0].message.content
    assert len(full) >= 2
    stop = full[len(full) // 2:][:2]
    out = ask(client, ours, [user(question, data_uri(image))], max_tokens=16, stop=[stop, "never-there"])
    assert out.choices[0].message.content == full[:full.index(stop)].strip()
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client, target, shapes):
    image, question = shapes[0]
    runs = [ask(client, target, [user(question, data_uri(image))], temperature=1.0, seed=11).choices[0].message.content
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_system_message_and_unknown_fields(client, target, shapes):
    image, question = shapes[0]
    plain = ask(client, target, [user(question, data_uri(image))])
    out = ask(client, target, [{"role": "system", "content": "Answer in one word."}, user(question, data_uri(image))],
              extra_body={"some_future_field": {"x": 1}}, user="tester", metadata=None)
    assert out.usage.prompt_tokens != plain.usage.prompt_tokens  # the system text is in the prompt


def test_bare_string_image_url_and_file_url(client, ours, shapes):
    image, question = shapes[1]
    expected = ask(client, ours, [user(question, data_uri(image))]).choices[0].message.content
    bare = ask(client, ours, [user(question, data_uri(image), bare=True)])
    assert bare.choices[0].message.content == expected
    path = ours.files / "shape.png"
    path.write_bytes(png_bytes(image))
    from_file = ask(client, ours, [user(question, path.as_uri())])
    assert from_file.choices[0].message.content == expected


# -- errors -----------------------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, idat: bytes) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height, with next to no pixel data behind it."""
    return _png(width, height, zlib.compress(b"\0" * 64))


def _png_bomb(side: int = 6000) -> bytes:
    """A complete PNG: side x side RGB zeros, ~100 MB decoded from ~100 KB on the wire."""
    row = b"\0" * (1 + 3 * side)  # the filter byte, then the pixels
    compressor = zlib.compressobj(9)
    return _png(side, side, b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush())


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def _corpus(target, shapes):
    """(name, request kwargs for `post`, status, whether any OpenAI-compatible server must agree)."""
    image, question = shapes[0]
    good = data_uri(image)

    def chat(messages=None, **fields):
        return {"body": {"model": target.model, "messages": messages or [user(question, good)], "max_tokens": 4,
                         **fields}}

    def with_image(url, text=question):
        return chat([user(text, url)])

    long_text = "shape colour count " * 4000  # far over any small model's context
    cases = [
        ("malformed JSON", {"body": None, "raw": b'{"model": "x", "messages": ['}, 400, True),
        ("body is an array", {"body": None, "raw": b"[1, 2]"}, 400, True),
        ("empty message list", {"body": {"model": target.model, "messages": []}}, 400, True),
        ("unknown model", {"body": {**chat()["body"], "model": "no-such-model"}}, 404, True),
        ("max_tokens 0", chat(max_tokens=0), 400, True),
        ("temperature -1", chat(temperature=-1), 400, True),
        ("unknown role", chat([{"role": "wizard", "content": "hi"}]), 400, True),
        ("stop is a number", chat(stop=5), 400, True),
        ("prompt over the context", chat([user(long_text)]), 400, True),
        ("unknown route", {"body": None, "path": "/no/such/route", "method": "GET"}, 404, True),
        ("GET on chat completions", {"body": None, "method": "GET"}, 405, True),
        ("n = 2", chat(n=2), 400, False),
        ("logprobs", chat(logprobs=True), 400, False),
        ("tools", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, False),
        ("last message from the assistant", chat([user(question), {"role": "assistant", "content": "a"}]), 400,
         False),
        ("bad base64", with_image("data:image/png;base64,@@@not base64@@@"), 400, False),
        ("a text file as the image", with_image(data_uri(b"just some text, not a picture", "image/png")), 400, False),
        ("a PDF media type", with_image(data_uri(b"%PDF-1.4", "application/pdf")), 400, False),
        ("truncated PNG", with_image(data_uri(_noise_png(64)[:400])), 400, False),
        ("image over the byte cap", with_image(data_uri(_noise_png(620))), 413, False),
        ("image over the pixel cap", with_image(data_uri(_png_declaring(3000, 3000))), 413, False),
        ("PNG bomb", with_image(data_uri(_png_bomb())), 413, False),
        ("body over the cap", {"body": None, "raw": b'{"model": "' + b"x" * (3 * 2**20) + b'"}'}, 413, False),
        ("http URL", with_image("http://127.0.0.1:9/picture.png"), 400, False),
        ("https URL", with_image("https://example.invalid/picture.png"), 400, False),
        ("file URL outside the allowed folder", with_image("file:///etc/passwd"), 400, False),
        ("file URL escaping with ..", with_image(f"file://{target.files}/../../etc/hostname" if target.files
                                                 else "file:///etc/hostname"), 400, False),
        ("two images in one turn", chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": good}}, {"type": "image_url", "image_url": {"url": good}},
            {"type": "text", "text": question}]}]), 400, False),
        ("<image> in the text", chat([user("<image> what is this?")]), 400, False),
        ("an audio part", chat([{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]), 400, False),
    ]
    if target.api_key:
        cases += [("no API key", {**chat(), "headers": {"Authorization": ""}}, 401, True),
                  ("wrong API key", {**chat(), "headers": {"Authorization": "Bearer sk-wrong"}}, 401, True)]
    return cases


def test_bad_input_corpus_then_a_normal_answer(client, target, shapes):
    cases = _corpus(target, shapes)
    assert len(cases) >= 15
    problems = []
    for name, kwargs, status, portable in cases:
        if not (portable or target.ours):
            continue
        kwargs = dict(kwargs)
        body = kwargs.pop("body")
        resp = post(target, body, **kwargs)
        try:
            if not target.ours:
                # another server must agree on the status; the error object's shape and its one-line
                # message are tinyllava-serve's (vLLM 0.32 answers a malformed body with pydantic's
                # multi-line message, an unknown route or method with FastAPI's {"detail": ...})
                assert resp.status_code == status, (resp.status_code, resp.text[:500])
                continue
            error = assert_error_shape(resp, status)
        except AssertionError as err:
            problems.append(f"{name}: {err}")
            continue
        if status == 401:
            assert error["code"] == "invalid_api_key"
    assert not problems, "\n".join(problems)
    out = ask(client, target, [user(shapes[0][1], data_uri(shapes[0][0]))])
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens >= 1


def test_error_messages_say_what_to_do(ours, shapes):
    image, question = shapes[0]

    def error(url):
        body = {"model": ours.model, "messages": [user(question, url)], "max_tokens": 2}
        return assert_error_shape(post(ours, body), 400)

    http = error("http://127.0.0.1:9/a.png")
    assert "fetches nothing from the network" in http["message"] and http["param"] == "messages[0].content[0].image_url"
    assert "outside the folder" in error("file:///etc/passwd")["message"]  # the suite's server has --allow-files
    resp = post(ours, {"model": ours.model, "messages": [user("a " * 5000)], "max_tokens": 4})
    assert assert_error_shape(resp, 400)["code"] == "context_length_exceeded"


def test_sdk_raises_typed_errors(client, target):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[user("hi")], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=target.model, messages=[], max_tokens=2)
    if target.api_key:
        wrong = openai.OpenAI(base_url=target.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


# -- the server around the API ------------------------------------------------------------------------


def test_health_and_metrics(ours, client, shapes):
    assert httpx.get(ours.root + "/health", timeout=30).json()["status"] == "ok"  # no key needed for probes
    ask(client, ours, [user(shapes[0][1], data_uri(shapes[0][0]))])
    ask(client, ours, [user(shapes[0][1] + " Really?", data_uri(shapes[0][0]))])  # same image: prefix + image hits
    resp = httpx.get(ours.root + "/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for name in ("tinyllava_http_requests_total", "tinyllava_queue_depth", "tinyllava_time_to_first_token_seconds",
                 "tinyllava_decode_tokens_per_second", "tinyllava_prefix_cache_hits_total",
                 "tinyllava_image_cache_hits_total"):
        assert name in text, name
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['tinyllava_http_requests_total{path="/v1/chat/completions",status="200"}'] >= 2
    assert values["tinyllava_prefix_cache_hits_total"] >= 1 and values["tinyllava_image_cache_hits_total"] >= 1


def test_no_cors_headers_unless_asked(ours):
    origin = {"Origin": "http://evil.example"}
    pre = httpx.options(ours.base_url + "/chat/completions", timeout=30,
                        headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    got = httpx.get(ours.base_url + "/models", headers={**origin, **ours.headers()}, timeout=30)
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers


def test_binds_loopback_by_default(ours):
    assert ours.base_url.startswith("http://127.0.0.1:")
