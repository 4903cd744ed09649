"""The runtime: `tinyllava_edge.load` on a bundle (edge) and a checkpoint (torch), chat, caches, devices.

One Qwen2 miniature, exported once as an F32 bundle. The edge side runs llama.cpp with an F32 KV
cache and flash attention off, so it can be held to the torch backend token for token. The
miniature's random weights answer greedily with one repeated token, so agreement is checked on
seeded sampling (temperature 1: varied tokens, the same draw wherever the logits agree) as well.

Measured here (1 thread): prompt logits edge vs torch 4.8e-7 of the largest logit; greedy and
seeded-sampled tokens identical; TTFT ~5 ms, prefill ~30k and decode ~5k tokens/s on the edge
backend (the miniature is 64 wide, 2 layers).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

import tinyllava_edge  # noqa: E402
from tinyllava_edge.data.template import tokenizer_image_token  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from tinyllava_edge.export.checks import QUESTIONS, synthetic_images  # noqa: E402
from tinyllava_edge.runtime import GenerationStats, Probes, detect, plan_device, sampling_params  # noqa: E402
from tinyllava_edge.runtime.backend import positions  # noqa: E402
from tinyllava_edge.runtime.devices import ALL_LAYERS, fit_context  # noqa: E402
from tinyllava_edge.runtime.images import ImageCache, ImageSource  # noqa: E402
from tinyllava_edge.runtime.sampling import TextStream, next_token  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"device": "cpu", "n_threads": 1, "kv_type": "f32", "flash_attn": "off"}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def paths(runtime_miniature):
    return runtime_miniature


@pytest.fixture(scope="module")
def edge(paths):
    with tinyllava_edge.load(paths["bundle"], **EXACT) as vlm:
        yield vlm


@pytest.fixture(scope="module")
def reference(paths):
    torch.set_num_threads(1)
    with tinyllava_edge.load(paths["ckpt"], device="cpu") as vlm:
        yield vlm


@pytest.fixture(scope="module")
def images():
    return synthetic_images(4, seed=7)


def _one_sentence(excinfo) -> str:
    message = str(excinfo.value)
    assert excinfo.type is TinyLlavaError or issubclass(excinfo.type, TinyLlavaError)
    assert message and "\n" not in message, message
    return message


# -- edge == torch -----------------------------------------------------------------------------------

def test_edge_matches_torch(edge, reference, images):
    assert edge.backend.kind == "edge" and reference.backend.kind == "torch"
    for i, image in enumerate(images[:3]):
        question = QUESTIONS[i]
        for settings in ({"max_new_tokens": 8}, {"max_new_tokens": 12, "temperature": 1.0, "seed": i}):
            text = edge.generate(image, question, **settings)
            tokens = edge.last_tokens
            assert reference.generate(image, question, **settings) == text
            assert reference.last_tokens == tokens and len(tokens) == settings["max_new_tokens"]
    # the prompt logits themselves, fed through both backends' own segment path
    rows_edge = edge.encode_images([images[0]])
    rows_torch = reference.encode_images([images[0]])
    assert np.abs(rows_edge[0] - rows_torch[0]).max() < 1e-4
    messages = [{"from": "human", "value": "<image>\n" + QUESTIONS[0]}]
    edge.backend.reset()
    reference.backend.reset()
    a = edge.backend.feed(edge.prompt_segments(messages, rows_edge))
    b = reference.backend.feed(reference.prompt_segments(messages, rows_torch))
    rel = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    print(f"prompt logits edge vs torch: {rel:.2e} of the largest")
    assert rel < 1e-4


def test_torch_backend_matches_model_generate(reference, images):
    from tinyllava_edge.data.preprocess import preprocess

    backend = reference.backend
    messages = [{"from": "human", "value": "<image>\n" + QUESTIONS[1]}]
    ids = reference.template.encode(messages, backend.tokenizer, mode="eval")["input_ids"]
    pixels = torch.from_numpy(preprocess(images[1], backend.preprocess))
    with torch.no_grad():
        expected = backend.model.generate(torch.tensor([ids]), images=pixels, max_new_tokens=6, do_sample=False,
                                          eos_token_id=sorted(backend.stop_ids),
                                          pad_token_id=backend.tokenizer.pad_token_id)
    reference.generate(images[1], QUESTIONS[1], max_new_tokens=6)
    assert reference.last_tokens == expected[0].tolist()


# -- streaming, sampling, text -----------------------------------------------------------------------

def test_stream_pieces_join_to_generate(edge, reference, images):
    for vlm in (edge, reference):
        settings = {"max_new_tokens": 16, "temperature": 1.0, "seed": 3}
        pieces = list(vlm.stream(images[2], "Describe the image.", **settings))
        streamed_tokens = list(vlm.last_tokens)
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == vlm.generate(images[2], "Describe the image.", **settings)
        assert vlm.last_tokens == streamed_tokens
    # a stream closed early says so
    stream = edge.stream(images[2], "Describe the image.", max_new_tokens=16, temperature=1.0, seed=3)
    next(stream)
    stream.close()
    assert edge.last_stats.finish_reason == "cancelled"


def test_text_stream_utf8_stops_and_whitespace():
    stream = TextStream(stop=["STOP"])
    data = "  héllo 😀 wörld".encode()
    pieces = [stream.push(data[i:i + 1]) for i in range(len(data))]  # one byte per token
    assert "".join(pieces) + stream.finish() == "héllo 😀 wörld"
    assert "\ufffd" not in "".join(pieces) and pieces[:3] == ["", "", "h"]  # leading spaces dropped
    stream = TextStream(stop=["STOP"])
    out = [stream.push(b) for b in (b"ab", b"cST", b"O", b"Pxyz")]
    assert out == ["ab", "c", "", ""] and stream.stopped and stream.text == "abc"
    stream = TextStream(stop=["STOP"])
    assert stream.push(b"ST") == "" and stream.push(b"ay") == "STay"  # held back, then released
    stream = TextStream()
    assert stream.push(b"ok \xe2\x82") == "ok " and stream.finish() == "\ufffd"  # a character that never completes


def test_sampling_is_seeded_and_checked(edge, images):
    settings = {"max_new_tokens": 10, "temperature": 0.9, "top_p": 0.9}
    edge.generate(images[0], "What?", seed=11, **settings)
    first = list(edge.last_tokens)
    edge.generate(images[0], "What?", seed=11, **settings)
    assert edge.last_tokens == first
    edge.generate(images[0], "What?", seed=12, **settings)
    assert edge.last_tokens != first
    logits = np.array([0.0, 5.0, 4.9, -1.0])
    rng = np.random.default_rng(0)
    assert next_token(logits, sampling_params(temperature=0), rng) == 1
    # a top_p the first token alone reaches leaves only it
    assert {next_token(logits, sampling_params(temperature=1.0, top_p=0.1), rng) for _ in range(20)} == {1}
    assert {next_token(logits, sampling_params(temperature=1.0, top_p=1.0), rng) for _ in range(200)} >= {1, 2}


@pytest.mark.parametrize("settings, message", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer of at least 1"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"stop": ["ok", ""]}, "stop must be a non-empty string"),
    ({"stop": 5}, "stop must be a non-empty string or a list of them, got 5"),
])
def test_bad_generation_settings(edge, settings, message):
    with pytest.raises(TinyLlavaError, match=message) as excinfo:
        edge.generate(None, "Hi", **settings)
    _one_sentence(excinfo)


# -- chat --------------------------------------------------------------------------------------------

def test_chat_turn_decodes_only_new_tokens(edge, images):
    backend = edge.backend
    settings = {"max_new_tokens": 12, "temperature": 0.8, "seed": 5}
    chat = edge.chat(**settings)
    answer1 = chat.ask(images[0], "What is it?")
    tokens1 = list(edge.last_tokens)
    before = backend.positions_decoded
    history = positions(chat.history_segments())
    answer2, stats = chat.ask(None, "And the colour?", return_stats=True)
    tokens2 = list(edge.last_tokens)
    # only the new turn (the end of answer 1, "USER: ... ASSISTANT:") and the new tokens were evaluated
    assert backend.positions_decoded - before == stats.prefill_tokens + len(tokens2) - 1
    assert stats.prefill_tokens < 40 < history
    # ... and they give what one fresh pass over the whole conversation gives
    rows = edge.encode_images([images[0]])
    eos = backend.llm.eos_id
    closing = [] if tokens1[-1] == eos else [eos]
    turn2 = tokenizer_image_token("USER: And the colour? ASSISTANT:", backend.prompt_tokenizer(False))
    full = edge.prompt_segments([{"from": "human", "value": "<image>\nWhat is it?"}], rows) + \
        [tokens1 + closing + turn2]
    assert positions(full) == positions(chat.last_prompt) == history + stats.prefill_tokens - len(closing) - 1
    assert stats.context_used == positions(full) + len(tokens2) - 1
    fresh = "".join(edge.decode(full, sampling_params(**settings), GenerationStats(), fresh=True,
                                started=time.perf_counter()))
    assert edge.last_tokens == tokens2 and fresh == answer2
    assert [(q, has_image) for q, has_image, _ in chat.history()] == [("What is it?", True), ("And the colour?", False)]
    # turn 1 is a plain prompt; when something else used the model in between, a session
    # evaluates its history again and answers the same
    assert edge.generate(images[0], "What is it?", **settings) == answer1
    other = edge.chat(**settings)
    other.ask(images[0], "What is it?")
    edge.generate(None, "Something else.", max_new_tokens=3)
    answer, stats = other.ask(None, "And the colour?", return_stats=True)
    assert answer == answer2 and edge.last_tokens == tokens2
    # ... from position 0, the system prompt and the image coming from the saved prefix state
    assert stats.prefill_tokens + stats.prefix_reused == positions(full)
    assert stats.prefix_reused >= backend.image_tokens


def test_chat_context_policies(paths, images):
    with tinyllava_edge.load(paths["bundle"], n_ctx=256, **EXACT) as vlm:
        assert vlm.n_ctx == 256
        strict = vlm.chat(max_new_tokens=40, temperature=1.0, seed=0, overflow="error")
        strict.ask(images[0], "What is in the picture?")
        with pytest.raises(TinyLlavaError, match=r"needs \d+ positions with max_new_tokens 40 but the context holds "
                                                 r"256; call reset\(\)") as excinfo:
            for _ in range(4):
                strict.ask(None, "Tell me more about the colours.")
        _one_sentence(excinfo)
        rolling = vlm.chat(max_new_tokens=40, temperature=1.0, seed=0)
        for i in range(6):
            rolling.ask(images[i % 2], f"Question {i}: what do you see?")
            assert vlm.last_stats.context_used <= 256
        assert rolling.dropped_turns >= 1 and 1 <= len(rolling.turns) < 6
        assert rolling.history()[-1][0] == "Question 5: what do you see?"
        with pytest.raises(TinyLlavaError, match="positions but the context holds 256") as excinfo:
            rolling.ask(None, "word " * 300)
        _one_sentence(excinfo)


# -- images: cache, batch, inputs -----------------------------------------------------------------------

def test_image_cache_skips_the_encoder(paths, images, tmp_path):
    from PIL import Image

    png = tmp_path / "same.png"
    Image.fromarray(images[1]).save(png)
    with tinyllava_edge.load(paths["bundle"], image_cache_size=2, **EXACT) as vlm:
        _, stats = vlm.generate(images[1], "What?", max_new_tokens=2, return_stats=True)
        assert vlm.encoder_calls == 1 and stats.image_cache_hits == 0 and stats.image_encode_ms > 0
        for same in (images[1].copy(), png, Image.open(png)):  # the same pixels, three ways
            _, stats = vlm.generate(same, "What?", max_new_tokens=2, return_stats=True)
            assert stats.image_cache_hits == 1
        assert vlm.encoder_calls == 1
        vlm.generate(images[2], "What?", max_new_tokens=2)
        vlm.generate(images[3], "What?", max_new_tokens=2)  # capacity 2: images[1] is dropped
        vlm.generate(images[1], "What?", max_new_tokens=2)
        assert vlm.encoder_calls == 4
    with tinyllava_edge.load(paths["bundle"], image_cache_size=0, **EXACT) as vlm:
        for _ in range(2):
            vlm.generate(images[1], "What?", max_new_tokens=2)
        assert vlm.encoder_calls == 2
    cache = ImageCache(1)
    cache.put("a", np.zeros(1))
    cache.put("b", np.ones(1))
    assert cache.get("a") is None and cache.get("b") is not None and len(cache) == 1


class PngSource(ImageSource):
    """An image as a server receives it: PNG (or `fmt`) bytes named by their hash; counts its decodes."""

    def __init__(self, array: np.ndarray, fmt: str = "PNG"):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(array).save(buf, fmt)
        self.data = buf.getvalue()
        self.decodes = 0

    @property
    def source_key(self) -> str:
        return hashlib.blake2b(self.data, digest_size=16).hexdigest()

    def decode(self):
        from PIL import Image

        self.decodes += 1
        return Image.open(io.BytesIO(self.data))


def test_image_source_is_found_by_its_bytes(paths, images):
    """Bytes seen before skip decoding, preprocessing and the encoder and give the same answer as a
    miss and as the plain image; an image of the same size with one pixel changed gets its own entry;
    other bytes of the same pixels share the pixels' entry; the names are bounded like the entries."""
    sample = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}  # varied tokens: answers that show the image
    near = images[1].copy()
    near[0, 0] ^= 255  # same size, one pixel different
    with tinyllava_edge.load(paths["bundle"], image_cache_size=2, **EXACT) as vlm, \
            tinyllava_edge.load(paths["bundle"], image_cache_size=0, **EXACT) as plain:
        first = PngSource(images[1])
        miss, stats = vlm.generate(first, "What?", return_stats=True, **sample)
        assert first.decodes == 1 and stats.image_cache_hits == 0 and vlm.encoder_calls == 1
        again = PngSource(images[1])  # the same bytes in another request
        hit, stats = vlm.generate(again, "What?", return_stats=True, **sample)
        assert again.decodes == 0 and stats.image_cache_hits == 1 and vlm.encoder_calls == 1
        assert hit == miss == plain.generate(images[1], "What?", **sample)

        other = PngSource(near)
        answer, stats = vlm.generate(other, "What?", return_stats=True, **sample)
        assert other.decodes == 1 and stats.image_cache_hits == 0 and vlm.encoder_calls == 2
        assert answer == plain.generate(near, "What?", **sample)
        rows_near, rows_first = vlm.encode_images([PngSource(near), PngSource(images[1])])
        assert not np.array_equal(rows_near, rows_first)
        np.testing.assert_array_equal(rows_first, plain.encode_images([images[1]])[0])

        bmp = PngSource(images[1], "BMP")  # other bytes, the same pixels: decoded once, the pixels' entry
        _, stats = vlm.generate(bmp, "What?", return_stats=True, **sample)
        assert bmp.decodes == 1 and stats.image_cache_hits == 1 and vlm.encoder_calls == 2

        vlm.generate(PngSource(images[2]), "What?", max_new_tokens=1)  # 2 names kept: images[1]'s PNG is forgotten
        assert vlm.image_cache.find_source(first.source_key) is None
        late = PngSource(images[1])  # decoded again; its pixels' entry is still there
        assert vlm.generate(late, "What?", **sample) == miss and late.decodes == 1 and vlm.encoder_calls == 3
    cache = ImageCache(2)
    cache.put("p1", np.zeros(1))
    for name in ("s1", "s2", "s3"):
        cache.name_source(name, "p1")
    assert cache.find_source("s1") is None and cache.find_source("s3")[0] == "p1"  # the oldest name went
    cache.put("p2", np.ones(1))
    cache.put("p3", np.ones(1))  # p1's rows went: its names lead nowhere
    assert cache.find_source("s3") is None and len(cache) == 2
    assert ImageCache(0).find_source("s1") is None


def test_prefix_reuse_answers_as_a_fresh_prefill(paths, images):
    """The edge backend keeps the cached prefix of a new prompt (same system prompt + image), or
    restores the state saved after it, and decodes only the rest: same tokens as without reuse."""
    settings = {"max_new_tokens": 10, "temperature": 1.0, "seed": 4}
    calls = [(images[0], "What is it?"), (images[0], "What colour is it?"), (images[1], "What is it?"),
             (images[0], "Which shape?"), (None, "Hi"), (images[0], "What is it?")]
    with tinyllava_edge.load(paths["bundle"], **EXACT) as cached, \
            tinyllava_edge.load(paths["bundle"], prefix_cache_mb=0, **EXACT) as plain:
        rows = cached.backend.image_tokens
        reused = []
        for image, question in calls:
            text, stats = cached.generate(image, question, return_stats=True, **settings)
            tokens = list(cached.last_tokens)
            plain_text, plain_stats = plain.generate(image, question, return_stats=True, **settings)
            assert (text, tokens) == (plain_text, plain.last_tokens)
            assert plain_stats.prefix_reused == 0
            assert stats.prefill_tokens + stats.prefix_reused == plain_stats.prefill_tokens
            reused.append(stats.prefix_reused)
        # 2: the cache holds the same image's prompt; 4: restored from the state saved in call 1
        # (call 3 used another image); 5: no image, the system prompt only; 6: call 1's prompt
        # whole but its last position, or its saved state
        assert reused[0] == 0 and reused[1] > rows and reused[3] > rows and 0 < reused[4] <= reused[3] - rows
        assert reused[5] == plain_stats.prefill_tokens - 1 or reused[5] > rows
        assert len(cached.backend.llm.prefix_store) == 2  # one state per image prompt
        # the prompt logits, through both backends' segment path
        messages = [{"from": "human", "value": "<image>\n" + "Shape?"}]
        prompt = cached.prompt_segments(messages, cached.encode_images([images[1]]))
        cached.backend.reset()
        plain.backend.reset()
        a, b = cached.backend.feed(prompt), plain.backend.feed(prompt)
        assert cached.backend.last_reused > rows
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
        assert "cached)" in stats.line()
    with pytest.raises(TinyLlavaError, match="prefix_cache_mb must be a number >= 0") as excinfo:
        tinyllava_edge.load(paths["bundle"], prefix_cache_mb=-1, **EXACT)
    _one_sentence(excinfo)


def test_prefix_store_is_bounded_lru():
    from tinyllava_edge.llamacpp import PrefixStore

    store = PrefixStore(25)
    for key in (b"a", b"b"):
        store.put(key, bytes(10))
    assert store.get(b"a") is not None  # a is now the most recent
    store.put(b"c", bytes(10))  # 30 > 25: the least recent (b) goes
    assert b"b" not in store and b"a" in store and b"c" in store and store.bytes == 20
    store.put(b"big", bytes(26))  # larger than the whole store: not kept
    assert b"big" not in store and len(store) == 2
    assert PrefixStore(0).capacity == 0
    off = PrefixStore(0)
    off.put(b"a", bytes(1))
    assert len(off) == 0


def test_generate_batch_encodes_images_together(edge, images):
    requests = [(images[0], "What is it?"), (None, "Hello?"), (images[1], "Colour?"), (images[0], "Shape?")]
    edge.image_cache.clear()
    calls = edge.encoder_calls
    texts, stats = edge.generate_batch(requests, max_new_tokens=6, temperature=1.0, seed=2, return_stats=True)
    assert edge.encoder_calls == calls + 1 and edge.images_encoded >= 2  # two distinct images, one run
    assert [s.images for s in stats] == [1, 0, 1, 1]
    singles = [edge.generate(image, q, max_new_tokens=6, temperature=1.0, seed=2) for image, q in requests]
    assert texts == singles
    assert edge.encoder_calls == calls + 1  # every single call hit the cache
    assert edge.generate_batch([{"image": None, "prompt": "Hi"}], max_new_tokens=2) == [edge.generate(
        None, "Hi", max_new_tokens=2)]


def test_a_tiny_llm_decodes_on_one_thread_and_prefills_on_all(paths, images):
    """llamacpp.SMALL_LLM_BYTES: below it the runtime's own thread choice decodes one token at a
    time on one thread; the prompt's batches keep every thread; a caller's count stands."""
    import llama_cpp

    from tinyllava_edge.llamacpp import SMALL_LLM_BYTES

    bundle = paths["bundle"]
    assert all(f.stat().st_size < SMALL_LLM_BYTES for f in Path(bundle).glob("llm-*.gguf"))
    with tinyllava_edge.load(bundle, device="cpu") as vlm:
        llm = vlm.backend.llm
        if llm.n_threads > 1:
            assert llama_cpp.llama_n_threads(llm._ctx) == 1
            assert llama_cpp.llama_n_threads_batch(llm._ctx) == llm.n_threads
        llm.set_threads(2)
        assert llama_cpp.llama_n_threads(llm._ctx) == 1 and llama_cpp.llama_n_threads_batch(llm._ctx) == 2
        assert vlm.info()["decode_threads"] == 1
        assert isinstance(vlm.generate(images[0], "What is it?", max_new_tokens=3), str)
    with tinyllava_edge.load(bundle, device="cpu", n_threads=2) as vlm:
        assert llama_cpp.llama_n_threads(vlm.backend.llm._ctx) == 2 and vlm.info()["decode_threads"] == 2


def test_the_vision_graph_threads_block_instead_of_spinning(edge):
    """onnxruntime's pool threads would spin after the image is encoded, on the cores llama.cpp's
    prefill needs next (a first question ~3 ms slower on the default model, docs/runtime.md)."""
    from tinyllava_edge.runtime.edge import ORT_SPINNING

    assert edge.backend.session.get_session_options().get_session_config_entry(ORT_SPINNING) == "0"


def test_stats(edge, images):
    _, stats = edge.generate(images[3], "Describe it.", max_new_tokens=8, temperature=1.0, seed=1,
                                return_stats=True)
    assert stats is edge.last_stats
    data = stats.as_dict()
    for key in ("image_encode_ms", "ttft_ms", "prefill_tokens", "prefill_tokens_per_s", "decode_tokens",
                "decode_tokens_per_s", "peak_rss_mb", "finish_reason", "context_used", "n_ctx"):
        assert key in data
    assert stats.prefill_tokens + stats.prefix_reused == stats.context_used - stats.decode_tokens + 1
    assert stats.prefill_tokens > edge.backend.image_tokens and stats.decode_tokens == 8
    assert stats.ttft_ms > 0 and stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    assert stats.peak_rss_mb > 10 and stats.finish_reason == "length"
    print(f"miniature, edge, 1 thread: {stats.line()}")
    assert stats.line().startswith("[image ") and "TTFT" in stats.line()


@pytest.mark.parametrize("image, message", [
    ("{tmp}/missing.png", "does not exist"),
    ("{tmp}/notes.png", "cannot be read as an image"),
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((3, 8, 8), np.uint8), r"channels last"),
    (12, "must be a path, a PIL image or a numpy array"),
])
def test_bad_images(edge, tmp_path, image, message):
    (tmp_path / "notes.png").write_text("not a picture")
    if isinstance(image, str):
        image = image.format(tmp=tmp_path)
    with pytest.raises(TinyLlavaError, match=message) as excinfo:
        edge.generate(image, "What?", max_new_tokens=2)
    _one_sentence(excinfo)


@pytest.mark.parametrize("prompt, message", [
    ("", "the prompt is empty"),
    ("   \n", "the prompt is empty"),
    (None, "a prompt must be a string"),
    ("<image> what?", "pass the image as the image argument"),
])
def test_bad_prompts(edge, prompt, message):
    with pytest.raises(TinyLlavaError, match=message) as excinfo:
        edge.generate(None, prompt)
    _one_sentence(excinfo)
    with pytest.raises(TinyLlavaError, match=message):
        edge.chat().ask(None, prompt)


def test_bad_paths_and_options(paths, edge, tmp_path):
    cases = [
        (lambda: tinyllava_edge.load(tmp_path / "nowhere"), "does not exist; expected a bundle directory"),
        (lambda: tinyllava_edge.load(tmp_path), "is neither a bundle .no manifest.json. nor a checkpoint"),
        (lambda: tinyllava_edge.load(paths["bundle"] / "manifest.json"), "is a file; expected a bundle directory"),
        (lambda: tinyllava_edge.load(paths["bundle"], device="tpu"), "device 'tpu' is not one of"),
        (lambda: tinyllava_edge.load(paths["bundle"], device="cuda"), "device 'cuda' was asked for but no CUDA"),
        (lambda: tinyllava_edge.load(paths["bundle"], device="jetson"), "is not a Jetson"),
        (lambda: tinyllava_edge.load(paths["bundle"], dtype="bf16"), "unknown option 'dtype' for the edge backend"),
        (lambda: tinyllava_edge.load(paths["bundle"], vision="int8", **EXACT), "has no 'int8' vision graph"),
        (lambda: tinyllava_edge.load(paths["bundle"], image_cache_size=-1), "image_cache_size must be"),
        (lambda: tinyllava_edge.load(paths["bundle"], n_ctx=10**6), "exceeds the model's context of 2048"),
        (lambda: tinyllava_edge.load(paths["ckpt"], quantization="bnb4"), "unknown torch quantization 'bnb4'"),
        (lambda: tinyllava_edge.load(paths["ckpt"], quantization="gptq"), "holds no GPTQ LLM; GPTQ is not applied at load"),
        (lambda: tinyllava_edge.load(paths["ckpt"], dtype="int3"), "dtype 'int3' is not one of"),
        (lambda: tinyllava_edge.load(paths["ckpt"], device="cuda"), "sees no CUDA GPU"),
    ]
    for make, message in cases:
        with pytest.raises(TinyLlavaError, match=message) as excinfo:
            make()
        _one_sentence(excinfo)
    with pytest.raises(TinyLlavaError, match="overflow policy 'wrap' is not one of drop_oldest, error"):
        edge.chat(overflow="wrap")
    with pytest.raises(TinyLlavaError, match="unknown option 'top_k' for a chat turn"):
        edge.chat().ask(None, "Hi", top_k=3)
    onnx_only = tmp_path / "onnx-bundle"
    onnx_only.mkdir()
    manifest = json.loads((paths["bundle"] / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["role"] == "vision"]
    (onnx_only / "manifest.json").write_text(json.dumps(manifest))
    (onnx_only / "vision.onnx").write_bytes((paths["bundle"] / "vision.onnx").read_bytes())
    with pytest.raises(TinyLlavaError, match="has no LLM GGUF"):
        tinyllava_edge.load(onnx_only)


def test_every_backend_has_a_test_case(edge, reference):
    from tinyllava_edge.runtime import BACKENDS

    assert BACKENDS.keys() == sorted({edge.backend.kind, reference.backend.kind})


# -- devices -------------------------------------------------------------------------------------------

def _host(tmp_path, name: str, mem_kb: int, *, jetson: bool = False) -> Path:
    root = tmp_path / name
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(f"MemTotal: {2 * mem_kb} kB\nMemFree: 1 kB\nMemAvailable: {mem_kb} kB\n")
    if jetson:
        (root / "etc").mkdir()
        (root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic\n")
        (root / "proc" / "device-tree").mkdir()
        (root / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    return root


def _probes(root, providers, gpu, cores=6, gpu_memory=None):
    return Probes(root=root, ort_providers=lambda: providers, gpu_offload=lambda: gpu,
                  gpu_memory=lambda: gpu_memory, physical_cores=lambda: cores)


GIB = 2**30
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def test_device_plans_for_simulated_hosts(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    model = {"kv_bytes_per_token": 1 << 20, "weights_bytes": 1 * GIB, "max_context": 4096}  # 1 MiB per position
    jetson = detect(_probes(_host(tmp_path, "orin", 3 * 2**20, jetson=True), [TRT, CUDA, CPU], True))
    assert jetson.jetson == "NVIDIA Jetson Orin Nano Developer Kit"
    plan = plan_device("auto", jetson, **model)
    # unified memory: (3 GiB - 1 GiB weights) x 0.5 / 1 MiB = 1024 positions
    assert (plan.device, plan.providers, plan.n_gpu_layers, plan.n_threads, plan.n_ctx) == \
        ("jetson", (TRT, CUDA, CPU), ALL_LAYERS, 6, 1024)

    cuda = detect(_probes(_host(tmp_path, "server", 64 * 2**20), [CUDA, CPU], True, cores=16, gpu_memory=5 * GIB))
    plan = plan_device("auto", cuda, **model)
    # bounded by the GPU's free memory, not the 64 GiB of RAM: (5 - 1) x 0.5 GiB / 1 MiB
    assert (plan.device, plan.providers, plan.n_gpu_layers, plan.n_threads, plan.n_ctx) == \
        ("cuda", (CUDA, CPU), ALL_LAYERS, 16, 2048)
    assert plan_device("cpu", cuda, **model).providers == (CPU,) and plan_device("cpu", cuda, **model).n_gpu_layers == 0
    assert plan_device("cuda", cuda, **{**model, "max_context": 512}).n_ctx == 512  # the model's cap

    laptop = detect(_probes(_host(tmp_path, "laptop", 16 * 2**20), [CPU], False, cores=4))
    plan = plan_device("auto", laptop, **model)
    assert (plan.device, plan.providers, plan.n_gpu_layers, plan.n_threads, plan.n_ctx) == \
        ("cpu", (CPU,), 0, 4, 4096)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert plan_device("auto", laptop, **model).n_threads == 2  # the user's own limit wins

    half = detect(_probes(_host(tmp_path, "half", 16 * 2**20), [CUDA, CPU], False))
    plan = plan_device("cuda", half, **model)
    assert plan.n_gpu_layers == 0 and any("llama.cpp was built without GPU offload" in n for n in plan.notes)

    with pytest.raises(TinyLlavaError, match=r"device 'cuda' was asked for but no CUDA was found \(no Jetson, "
                                             r"onnxruntime providers CPUExecutionProvider") as excinfo:
        plan_device("cuda", laptop, **model)
    _one_sentence(excinfo)
    with pytest.raises(TinyLlavaError, match=r"device 'jetson' was asked for but this machine is not a Jetson \(no "
                                             r"/etc/nv_tegra_release, .*; found onnxruntime providers CUDA"):
        plan_device("jetson", cuda, **model)
    with pytest.raises(TinyLlavaError, match="the model does not fit: 1024 MiB of memory available"):
        fit_context(1 * GIB, int(1.5 * GIB), 1 << 20, 4096, 300)


def test_real_cpu_and_simulated_memory(paths):
    hardware = detect()
    assert hardware.physical_cores >= 1 and CPU in hardware.ort_providers and hardware.mem_available
    with tinyllava_edge.load(paths["bundle"], device="auto", n_threads=1) as vlm:
        info = vlm.info()
        if not hardware.has_gpu:
            assert info["device"] == "cpu" and info["providers_used"] == [CPU] and info["n_gpu_layers"] == 0
        assert info["n_ctx"] == 2048  # the model's cap: memory is plentiful
        assert vlm.generate(None, "Hi", max_new_tokens=2) is not None
    # a host with little memory left: the context shrinks to what fits (here 256 B per position)
    manifest = json.loads((paths["bundle"] / "manifest.json").read_text())
    weights = sum(f["size"] for f in manifest["files"] if f["name"] in ("vision.onnx", "llm-F32.gguf"))
    root = _host(paths["root"], "small", (weights + 2 * 256 * 600) // 1024)
    with tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1, prefix_cache_mb=0,
                             probes=_probes(root, [CPU], False, cores=2)) as vlm:
        assert vlm.n_ctx == 512 and vlm.info()["memory_bound"] < weights + 400_000
    # the prefix store's memory is planned for too: 128 MiB of it leaves no room on that host
    with pytest.raises(TinyLlavaError, match="does not fit"):
        tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1, probes=_probes(root, [CPU], False, cores=2))


def test_edge_path_needs_no_torch(paths):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import tinyllava_edge
        vlm = tinyllava_edge.load({str(paths['bundle'])!r}, device="auto", n_threads=1)
        image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        text, stats = vlm.generate(image, "What is it?", max_new_tokens=4, return_stats=True)
        assert "".join(vlm.stream(image, "What is it?", max_new_tokens=4)) == text
        chat = vlm.chat(max_new_tokens=3)
        chat.ask(image, "a?")
        chat.ask(None, "b?")
        vlm.generate_batch([(image, "c?"), (None, "d?")], max_new_tokens=2)
        from tinyllava_edge.eval.predictor import RuntimePredictor
        assert len(RuntimePredictor({str(paths['bundle'])!r}, device="cpu", max_new_tokens=2,
                                    n_threads=1).predict([(image, "e?")])) == 1
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        print("ok", stats.decode_tokens)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok 4", proc.stderr[-2000:]


# -- tinyllava-eval on a bundle ---------------------------------------------------------------------------

def test_eval_runs_a_bundle(paths, reference):
    from tinyllava_edge.cli.eval import main as eval_main
    from tinyllava_edge.data.shapes import write_dataset
    from tinyllava_edge.eval import RuntimePredictor, TorchPredictor

    data = paths["root"] / "shapes"
    write_dataset(data, n_train=1, n_val=1, n_test=4, image_size=32)
    out = paths["root"] / "eval"
    assert eval_main(["--benchmark", "shapes", "--model", str(paths["bundle"]), "--data", str(data), "--out",
                      str(out), "--batch-size", "2", "--limit", "4", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["n"] == 4 and results["settings"]["backend"].startswith("edge runtime")
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(a["model_id"] == "bundle" for a in answers)
    records = json.loads((data / "test.json").read_text())[:3]
    requests = [(data / r["image"], r["conversations"][0]["value"].split("\n", 1)[1]) for r in records]
    edge = RuntimePredictor(paths["bundle"], device="cpu", max_new_tokens=4, n_threads=1, kv_type="f32",
                            flash_attn="off")
    torch_answers = TorchPredictor(paths["ckpt"], batch_size=1, max_new_tokens=4).predict(requests)
    assert edge.predict(requests) == torch_answers


def test_flash_attention_is_off_by_default_on_the_cpu(paths):
    # measured: "auto" turns it on and decodes ~17 % slower on a CPU (runtime/edge.py)
    with tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1) as vlm:
        assert vlm.backend.info()["flash_attn"] == "off"
    with tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1, flash_attn="auto") as vlm:
        assert vlm.backend.info()["flash_attn"] == "auto"


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_kv_cache_size_is_what_llama_cpp_allocates(paths, kv_type, monkeypatch):
    import re
    from collections import deque

    from tinyllava_edge import llamacpp

    monkeypatch.setattr(llamacpp, "_log_lines", deque(maxlen=2000))  # the whole log of one load
    with llamacpp.LlamaCppModel(paths["bundle"] / "llm-F32.gguf", n_ctx=512, n_threads=1, kv_type=kv_type,
                                flash_attn="off") as llm:
        assert llm.kv_bytes == llm.kv_bytes_per_token(kv_type) * llm.n_ctx
        logged = [float(m.group(1)) for line in llamacpp.recent_log()
                  for m in [re.search(r"llama_kv_cache: size = +([0-9.]+) MiB", line)] if m]
        assert logged and llm.kv_bytes / 2**20 == pytest.approx(logged[-1], abs=0.006)  # logged to 0.01 MiB


def test_q8_0_kv_cache_is_refused_with_a_reason(paths):
    from tinyllava_edge.llamacpp import LlamaCppModel

    gguf = paths["bundle"] / "llm-F32.gguf"
    with pytest.raises(TinyLlavaError, match="q8_0 KV cache needs flash attention") as excinfo:
        LlamaCppModel(gguf, n_ctx=512, n_threads=1, kv_type="q8_0", flash_attn="off")
    _one_sentence(excinfo)
    # the miniature's heads are 16 wide: not whole Q8_0 blocks (llama.cpp would refuse the context)
    with pytest.raises(TinyLlavaError, match="multiple of 32; llm-F32.gguf has heads of 16") as excinfo:
        tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1, kv_type="q8_0")
    _one_sentence(excinfo)


def test_saved_prefix_states_are_bounded_before_they_are_copied(paths, images):
    with tinyllava_edge.load(paths["bundle"], **EXACT) as vlm:
        vlm.generate(images[0], "What is it?", max_new_tokens=2)
        llm = vlm.backend.llm
        size = int(llm._lib.llama_state_seq_get_size(llm._ctx, 0))
        assert llm._save(size - 1) is None  # larger than the store could keep: not copied at all
        state = llm._save(size)
        assert isinstance(state, bytearray) and 0 < len(state) <= size
        assert len(llm.prefix_store) == 1  # the image prompt's state, kept by generate
    with tinyllava_edge.load(paths["bundle"], prefix_cache_mb=0.001, **EXACT) as small:  # 1 KB: no state fits
        small.generate(images[0], "What is it?", max_new_tokens=2)
        assert len(small.backend.llm.prefix_store) == 0


def test_clear_caches_forgets_images_and_prompts(paths, images):
    with tinyllava_edge.load(paths["bundle"], **EXACT) as vlm:
        first = vlm.generate(images[0], "What is it?", max_new_tokens=4)
        vlm.clear_caches()
        encoded = vlm.images_encoded
        again, stats = vlm.generate(images[0], "What is it?", max_new_tokens=4, return_stats=True)
        assert again == first and stats.prefix_reused == 0 and stats.image_cache_hits == 0
        assert vlm.images_encoded == encoded + 1


def test_threads_follow_the_free_cores_unless_fixed(paths, images):
    from tinyllava_edge.runtime.threads import FreeCores

    with tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1) as fixed:
        assert fixed.backend.free_cores is None and fixed.info()["adaptive_threads"] is False
    with tinyllava_edge.load(paths["bundle"], device="cpu") as vlm:
        backend = vlm.backend
        assert backend.free_cores is not None and backend.llm.n_threads == backend.plan.n_threads
        # a simulated 2-core host where another process keeps one core busy
        clock = {"now": 0.0, "busy": 0.0}
        backend.free_cores = FreeCores(2, {0, 1}, read_stat=lambda: (clock["busy"], clock["now"] * 2),
                                       own_cpu=lambda: 0.0, clock=lambda: clock["now"])
        clock["now"], clock["busy"] = 5.0, 5.0
        vlm.generate(images[0], "What is it?", max_new_tokens=2)
        assert backend.llm.n_threads == 1 and vlm.info()["llm_threads"] == 1
        clock["now"] += 5.0  # the other process stopped
        vlm.generate(images[1], "What is it?", max_new_tokens=2)
        assert backend.llm.n_threads == 2
