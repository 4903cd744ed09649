"""The runtime shown end to end: multi-turn chat against a from-scratch pass, the image cache,
``tinyllava-chat`` on a real terminal, bad input, and (where the tiny-shapes benchmark left one)
a trained model's F32 bundle against its checkpoint.

One Qwen2 miniature, exported once as an F32 bundle (as tests/test_runtime.py does). The edge
side runs with an F32 KV cache and flash attention off where answers are compared token for token.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from tinyllava_edge.export.checks import synthetic_images

import tinyllava_edge
from tinyllava_edge.data.template import tokenizer_image_token
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.runtime import GenerationStats, sampling_params
from tinyllava_edge.runtime.backend import positions
from tinyllava_edge.runtime.stats import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = "TinyLLaVA-Qwen2-0.5B-SigLIP"
EXACT = {"device": "cpu", "n_threads": 1, "kv_type": "f32", "flash_attn": "off"}
# The main job's trained model (bash scripts/main.sh); TINYLLAVA_SHAPES_RUN points elsewhere.
SHAPES_RUN = Path(os.environ.get("TINYLLAVA_SHAPES_RUN", ROOT / "runs" / "tiny-shapes"))
SHAPES_MODEL = SHAPES_RUN / "model"
SHAPES_DATA = SHAPES_RUN / "data"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from PIL import Image

    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runtime-show")
    ckpt, _ = build_miniature_bundle(MINIATURE, root)
    png = root / "picture.png"
    Image.fromarray(synthetic_images(1, seed=3)[0]).save(png)
    return {"root": root, "ckpt": ckpt, "bundle": root / "bundle", "png": png}


@pytest.fixture(scope="module")
def edge(paths):
    with tinyllava_edge.load(paths["bundle"], **EXACT) as vlm:
        yield vlm


@pytest.fixture(scope="module")
def images():
    return synthetic_images(3, seed=11)


def _one_sentence(excinfo) -> str:
    message = str(excinfo.value)
    assert issubclass(excinfo.type, TinyLlavaError), excinfo.type
    assert message and "\n" not in message, message
    return message


class _Counter:
    """Wraps LlamaCppModel.decode_tokens / decode_embeddings of one model: positions evaluated."""

    def __init__(self, llm, monkeypatch):
        self.tokens = self.rows = 0
        decode_tokens, decode_embeddings = llm.decode_tokens, llm.decode_embeddings

        def tokens(ids):
            self.tokens += len(ids)
            return decode_tokens(ids)

        def rows(array, keys=None):
            self.rows += len(array)
            return decode_embeddings(array, keys)

        monkeypatch.setattr(llm, "decode_tokens", tokens)
        monkeypatch.setattr(llm, "decode_embeddings", rows)

    def take(self) -> tuple[int, int]:
        counted = (self.tokens, self.rows)
        self.tokens = self.rows = 0
        return counted


def _greedy_from_scratch(backend, segments, max_new: int) -> list[int]:
    """An empty cache, the whole conversation in one feed, then argmax token by token."""
    backend.reset()
    logits = backend.feed(segments)
    tokens: list[int] = []
    while True:
        token = int(np.argmax(logits))
        tokens.append(token)
        if token in backend.stop_ids or len(tokens) >= max_new:
            return tokens
        logits = backend.feed([[token]])


# -- 1. a three-turn chat == the conversation evaluated from scratch -------------------------------------

@pytest.mark.parametrize("settings", [{"max_new_tokens": 8}, {"max_new_tokens": 10, "temperature": 1.0, "seed": 9}],
                         ids=["greedy", "seeded"])
def test_three_turn_chat_equals_from_scratch(edge, images, monkeypatch, settings):
    backend = edge.backend
    backend.llm.clear()  # nothing of an earlier prompt to reuse: turn 1 is prefilled whole
    backend.llm.prefix_store.clear()
    counter = _Counter(backend.llm, monkeypatch)
    eos = backend.llm.eos_id
    next_tokenizer = backend.prompt_tokenizer(False)
    questions = ["What is in the picture?", "And the colour?", "Is it round?"]
    chat = edge.chat(**settings)
    max_new = settings["max_new_tokens"]

    answers, turns_tokens, evaluated = [], [], []
    for i, question in enumerate(questions):
        answer, stats = chat.ask(images[0] if i == 0 else None, question, return_stats=True)
        answers.append(answer)
        turns_tokens.append(list(edge.last_tokens))
        evaluated.append((counter.take(), stats.prefill_tokens, stats.ttft_ms))

    # turn 1: the whole prompt (one image's rows through the embeddings path) + the answer but its last token
    prompt1 = edge.prompt_segments([{"from": "human", "value": "<image>\n" + questions[0]}],
                                   edge.encode_images([images[0]]))
    (tok1, rows1), _, _ = evaluated[0]
    assert rows1 == backend.image_tokens and tok1 + rows1 == positions(prompt1) + len(turns_tokens[0]) - 1
    # turns 2 and 3: the previous answer's last token (+ the template's end where the answer was cut),
    # "USER: q ASSISTANT:", then the answer but its last token. No image rows, nothing earlier again.
    full = list(prompt1)
    for k in (1, 2):
        previous = turns_tokens[k - 1]
        closing = [] if previous[-1] == eos else [eos]
        turn = tokenizer_image_token(f"USER: {questions[k]} ASSISTANT:", next_tokenizer)
        (tok, rows), prefill, _ = evaluated[k]
        assert rows == 0 and prefill == 1 + len(closing) + len(turn)
        assert tok == prefill + len(turns_tokens[k]) - 1
        full = full + [previous + closing + turn]
        # the same conversation from an empty cache gives the same tokens
        if settings.get("temperature", 0) == 0:
            fresh_tokens = _greedy_from_scratch(backend, full, max_new)
            fresh_text = None
        else:
            fresh_text = "".join(edge.decode(full, sampling_params(**settings), GenerationStats(), fresh=True,
                                             started=time.perf_counter()))
            fresh_tokens = list(edge.last_tokens)
        assert fresh_tokens == turns_tokens[k], f"turn {k + 1}"
        assert fresh_text in (None, answers[k])
        counter.take()
    history = [positions(prompt1)] + [e[1] for e in evaluated[1:]]
    print(f"\n3-turn chat ({'greedy' if len(settings) == 1 else 'seeded'}): positions evaluated per turn "
          f"{[sum(e[0]) for e in evaluated]} (prefill {history}; image rows {backend.image_tokens}); "
          f"from scratch turn 3 would prefill {positions(full)}; TTFT ms "
          f"{[round(e[2], 1) for e in evaluated]}")
    assert [q for q, _, _ in chat.history()] == questions


# -- 2. the same image again skips the encoder -------------------------------------------------------------

def test_cached_image_skips_the_encoder(paths, images, monkeypatch):
    with tinyllava_edge.load(paths["bundle"], **EXACT) as vlm:
        runs = []
        encode = vlm.backend.encode_images

        def counted(pixels):
            runs.append(len(pixels))
            return encode(pixels)

        monkeypatch.setattr(vlm.backend, "encode_images", counted)
        _, first = vlm.generate(images[1], "What shape is it?", max_new_tokens=4, return_stats=True)
        assert runs == [1] and first.image_cache_hits == 0 and first.image_encode_ms > 0
        _, second = vlm.generate(images[1].copy(), "What colour is it?", max_new_tokens=4, return_stats=True)
        assert runs == [1] and second.image_cache_hits == 1 and second.images == 1
        assert second.ttft_ms > 0 and "(cached)" in second.line() and "TTFT" in second.line()
        # a new chat on the same image: the cache again
        _, third = vlm.chat(max_new_tokens=4).ask(paths["png"], "What?", return_stats=True)
        _, fourth = vlm.chat(max_new_tokens=4).ask(paths["png"], "Why?", return_stats=True)
        assert runs == [1, 1] and third.image_cache_hits == 0 and fourth.image_cache_hits == 1
        assert vlm.encoder_calls == 2
        print(f"\nfirst question: image {first.image_encode_ms:.2f} ms, TTFT {first.ttft_ms:.2f} ms; "
              f"second (cached): image {second.image_encode_ms:.2f} ms, TTFT {second.ttft_ms:.2f} ms; "
              f"chat: TTFT {third.ttft_ms:.2f} ms then {fourth.ttft_ms:.2f} ms cached")


# -- 3. tinyllava-chat on a pseudo-terminal -----------------------------------------------------------------

class _Terminal:
    """A child process on a pty: read what it prints until a pattern shows, with a deadline."""

    def __init__(self, argv: list[str], env: dict):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.text = ""

    def expect(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.text, start)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.text[-3000:]}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.text += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return True

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def finish(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        while self._read(0.05):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"tinyllava-chat did not exit; the terminal shows:\n{self.text[-3000:]}")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


STATS_LINE = r"\[(?:image [^\]]*|no image) \| TTFT \d+ ms \|[^\]]*\]"


def test_chat_cli_on_a_terminal(paths):
    settings = {"max_new_tokens": 6, "temperature": 1.0, "seed": 4}
    with tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1) as vlm:  # the CLI's own settings
        chat = vlm.chat(**settings)
        expected1 = chat.ask(paths["png"], "What is it?")
        chat.reset()
        expected2 = chat.ask(None, "Hello there?")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8",
           "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "tinyllava_edge.cli.chat", "--model", str(paths["bundle"]), "--device", "cpu",
            "--threads", "1", "--max-new-tokens", "6", "--temperature", "1", "--seed", "4"]
    started = time.perf_counter()
    term = _Terminal(argv, env)
    try:
        term.expect(r"edge backend on cpu, context \d+\. commands:", timeout=60)
        term.expect(r"> $")
        term.send(f"/image {paths['png']}")
        mark = term.expect(r"\(image .*picture\.png goes with the next question\)").end()
        term.expect(r"> $", start=mark)
        term.send("What is it?")
        first = term.expect(STATS_LINE, start=mark)
        assert "(cached)" not in first.group(0) and "| length]" in first.group(0)
        answered = term.text[mark:first.start()]
        assert expected1 in answered, (expected1, answered)
        mark = first.end()
        term.expect(r"> $", start=mark)
        term.send("/reset")
        mark = term.expect(r"\(conversation cleared\)", start=mark).end()
        term.expect(r"> $", start=mark)
        term.send("Hello there?")
        second = term.expect(STATS_LINE, start=mark)
        assert second.group(0).startswith("[no image")
        assert expected2 in term.text[mark:second.start()]
        term.expect(r"> $", start=second.end())
        term.send("/quit")
        code = term.finish()
    finally:
        term.close()
    assert code == 0, term.text[-2000:]
    assert len(re.findall(STATS_LINE, term.text)) == 2 and "error" not in term.text.lower()
    # the child's own peak memory, not the one it inherits from this (larger, torch-holding) process
    child_rss = [int(m) for m in re.findall(r"peak RSS (\d+) MiB", term.text)]
    assert child_rss and max(child_rss) < peak_rss_bytes() / 2**20, (child_rss, peak_rss_bytes() / 2**20)
    print(f"\ntinyllava-chat on a pty ({time.perf_counter() - started:.1f} s, parent peak RSS "
          f"{peak_rss_bytes() / 2**20:.0f} MiB): answers {expected1!r}, {expected2!r}; stats lines:\n  "
          + "\n  ".join(re.findall(STATS_LINE, term.text)))


# -- 4. bad input: one sentence each ---------------------------------------------------------------------

def _linked_bundle(paths, where: Path) -> Path:
    where.mkdir()
    for item in paths["bundle"].iterdir():
        if item.name == "manifest.json":
            shutil.copy(item, where / item.name)
        else:
            (where / item.name).symlink_to(item)
    return where


def test_bad_bundles(paths, tmp_path):
    from tinyllava_edge.bundle import files_by_role, read_manifest

    manifest = read_manifest(paths["bundle"])
    llm = files_by_role(manifest, "llm")[0]
    vision = files_by_role(manifest, "vision")[0]

    no_llm = _linked_bundle(paths, tmp_path / "no-llm")
    (no_llm / llm["name"]).unlink()
    for load in (read_manifest, tinyllava_edge.load):
        with pytest.raises(TinyLlavaError, match=rf"bundle file {re.escape(llm['name'])} \(llm\) is missing") as info:
            load(no_llm)
        _one_sentence(info)

    mismatched = _linked_bundle(paths, tmp_path / "mismatched")
    data = json.loads((mismatched / "manifest.json").read_text())
    wide = llm["n_embd"] * 2
    for record in data["files"]:
        if record["role"] == "vision":
            record["hidden"] = wide
    (mismatched / "manifest.json").write_text(json.dumps(data))
    for load in (read_manifest, tinyllava_edge.load):
        with pytest.raises(TinyLlavaError) as info:
            load(mismatched)
        message = _one_sentence(info)
        assert f"gives {wide}-wide image embeddings" in message and f"n_embd {llm['n_embd']}" in message, message
        assert vision["name"] in message and llm["name"] in message
    print(f"\nmissing part / mismatched parts: {message}")


def test_bad_images_prompts_and_devices(paths, edge, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for image in (garbage, empty):
        with pytest.raises(TinyLlavaError, match="cannot be read as an image") as info:
            edge.generate(image, "What?", max_new_tokens=2)
        _one_sentence(info)
        with pytest.raises(TinyLlavaError, match="cannot be read as an image"):
            edge.chat().ask(image, "What?")
    with pytest.raises(TinyLlavaError, match="cannot be read as an image|is a directory|not a file") as info:
        edge.generate(tmp_path, "What?", max_new_tokens=2)
    print(f"\nimage is a directory: {_one_sentence(info)}")
    # a truncated file is refused unless allowed (data/images.py; allowed: tests/bad_inputs/test_bad_images.py)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(paths["png"].read_bytes()[:200])
    with pytest.raises(TinyLlavaError, match="is truncated .*--allow-truncated-images") as info:
        edge.generate(truncated, "What?", max_new_tokens=2)
    print(f"truncated image: {_one_sentence(info)}")

    min_ctx = 256  # llama.cpp rounds a context up to a multiple of 256
    with tinyllava_edge.load(paths["bundle"], n_ctx=edge.backend.image_tokens + 64, **EXACT) as small:
        assert small.n_ctx == min_ctx
        long = "word " * (2 * min_ctx)
        for call in (lambda: small.generate(None, long, max_new_tokens=2),
                     lambda: small.stream(paths["png"], long),
                     lambda: small.chat().ask(None, long)):
            with pytest.raises(TinyLlavaError, match=rf"the prompt takes \d+ positions but the context holds "
                                                     rf"{min_ctx}") as info:
                call()
            _one_sentence(info)
        assert small.generate(None, "Hi", max_new_tokens=2) is not None  # still usable afterwards
        print(f"\nprompt too long: {info.value}")

    for device in ("tpu", "TPU", ""):
        with pytest.raises(TinyLlavaError, match=f"device {device!r} is not one of") as info:
            tinyllava_edge.load(paths["bundle"], device=device)
        _one_sentence(info)


# -- 5. a trained model: its F32 bundle answers as its checkpoint does -------------------------------------

N_SHAPES = 50


@pytest.mark.skipif(not (SHAPES_MODEL / "config.json").is_file() or not (SHAPES_DATA / "test.json").is_file(),
                    reason=f"no trained tiny-shapes model in {SHAPES_RUN} (the main job makes one)")
def test_shapes_bundle_matches_checkpoint(tmp_path):
    from tinyllava_edge.export import export_bundle

    started = time.perf_counter()
    export_bundle(SHAPES_MODEL, tmp_path / "bundle", fmt="gguf", bits=32, verify=False, progress=False)
    exported = time.perf_counter() - started
    records = json.loads((SHAPES_DATA / "test.json").read_text())
    step = max(1, len(records) // N_SHAPES)
    records = records[::step][:N_SHAPES]
    requests = [(SHAPES_DATA / r["image"], r["conversations"][0]["value"].split("\n", 1)[1]) for r in records]
    truth = [r["conversations"][1]["value"].strip() for r in records]
    with tinyllava_edge.load(tmp_path / "bundle", **EXACT) as vlm:
        edge_answers = [vlm.generate(image, q, max_new_tokens=8) for image, q in requests]
    with tinyllava_edge.load(tmp_path / "bundle", device="cpu", n_threads=1) as vlm:  # default f16 KV, flash auto
        default_answers = [vlm.generate(image, q, max_new_tokens=8) for image, q in requests]
    with tinyllava_edge.load(SHAPES_MODEL, device="cpu") as vlm:
        torch_answers = [vlm.generate(image, q, max_new_tokens=8) for image, q in requests]
    same = sum(a == b for a, b in zip(edge_answers, torch_answers))
    same_default = sum(a == b for a, b in zip(default_answers, torch_answers))
    right = sum(a.strip().lower() == t.lower() for a, t in zip(torch_answers, truth))
    print(f"\ntiny-shapes, {len(requests)} test prompts: F32 bundle (f32 KV) == checkpoint on {same}, "
          f"default f16 KV on {same_default}; checkpoint right on {right}; export {exported:.1f} s, "
          f"total {time.perf_counter() - started:.1f} s")
    assert same == len(requests), [(a, b) for a, b in zip(edge_answers, torch_answers) if a != b][:5]
