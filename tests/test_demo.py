"""The Gradio demo: variants, uploads, the CLI, a real browser (Playwright + Debian's chromium), load.

One Qwen2 miniature, exported as an F32 bundle beside its checkpoint: the demo serves both as
variants. Answers in the page are held to what `tinyllava_edge.load(variant).generate` answers
for the same image and question (greedy; the first turn of a conversation is the same prompt).
The browser test needs the `playwright` package and /usr/bin/chromium (`apt-get install -y
chromium`; no `playwright install`) and skips without them. Its screenshot goes to the test's
tmp dir and to runs/test-artifacts/demo.png.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("onnx")
gr = pytest.importorskip("gradio")

import tinyllava_edge  # noqa: E402
from tinyllava_edge.apps.demo import (  # noqa: E402
    ANSWERED, DEFAULT_MAX_NEW_TOKENS, PROBLEM, DemoHandlers, DemoSession, ModelPool, build_app, example_images,
)
from tinyllava_edge.apps.uploads import open_upload  # noqa: E402
from tinyllava_edge.apps.variants import discover, model_card  # noqa: E402
from tinyllava_edge.cli.demo import main as demo_main  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = "TinyLLaVA-Qwen2-0.5B-SigLIP"
CHROMIUM = Path("/usr/bin/chromium")
OPTIONS = {"n_threads": 1}
UPLOAD_CAP = "1mb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_text(text: str) -> str:
    return " ".join(text.split())


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants_dir(tmp_path_factory):
    import torch

    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo") / "variants"
    ckpt, _ = build_miniature_bundle(MINIATURE, root)
    return root


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    text = root / "notes.png"
    text.write_text("this is a text file, not a picture\n")
    good = root / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = root / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    huge = root / "huge.png"  # a valid PNG header declaring 20000 x 20000 (400 MP), next to no data

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return {"text": text, "truncated": truncated, "huge": huge}


@pytest.fixture(scope="module")
def server(variants_dir, tmp_path_factory):
    """The demo on a free port of 127.0.0.1, both variants, CPU, one thread per model."""
    variants = discover(variants_dir)
    app = build_app(variants, "cpu", load_options=OPTIONS, examples_dir=tmp_path_factory.mktemp("examples"))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               max_file_size=UPLOAD_CAP, allowed_paths=[str(app.examples_dir)])
    yield {"url": f"http://127.0.0.1:{port}/", "app": app, "variants": variants,
           "examples": example_images(app.examples_dir)}
    app.close()
    app.model_pool.close()


@pytest.fixture(scope="module")
def reference(variants_dir):
    """The answer `tinyllava_edge.load(variant).generate` gives, per (variant, image, question)."""
    loaded = {}

    def answer(name: str, image: str | Path, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
        if name not in loaded:
            loaded[name] = tinyllava_edge.load(variants_dir / name, device="cpu", **OPTIONS)
        return loaded[name].generate(Image.open(image).convert("RGB"), question, max_new_tokens=max_new_tokens)

    yield answer
    for vlm in loaded.values():
        vlm.close()


# -- variants, model card, uploads, CLI -------------------------------------------------------------


def test_discover_variants(variants_dir, tmp_path):
    assert [(v.name, v.kind) for v in discover(variants_dir)] == [("bundle", "edge"), ("ckpt", "torch")]
    assert [v.name for v in discover(variants_dir / "bundle")] == ["bundle"]
    workdir = tmp_path / "runs" / "tiny-shapes"
    workdir.mkdir(parents=True)
    with pytest.raises(TinyLlavaError, match="scripts/main.sh"):
        discover(None, default_bundle=workdir / "bundle")
    (workdir / "bundle").symlink_to(variants_dir / "bundle")
    (workdir / "model").symlink_to(variants_dir / "ckpt")
    (workdir / "logs").mkdir()
    assert [v.name for v in discover(None, default_bundle=workdir / "bundle")] == ["bundle", "model"]
    with pytest.raises(TinyLlavaError, match="neither a bundle"):
        discover(workdir / "logs")


def test_model_card(variants_dir):
    variants = {v.name: v for v in discover(variants_dir)}
    card = model_card(variants["bundle"])
    assert "llm-F32.gguf" in card and "Fidelity" in card and "vision.onnx" in card
    assert "Checkpoint" in model_card(variants["ckpt"])


def test_model_card_of_a_quantized_bundle(variants_dir, tmp_path):
    # what the main job's 4-bit variant shows: what the quant stage did, then the export's figures
    from tinyllava_edge.quant.bundle import quantize_to_bits

    quantize_to_bits(variants_dir / "bundle", tmp_path / "bundle-8bit", 8, progress=False)
    (variant,) = discover(tmp_path / "bundle-8bit")
    card = model_card(variant)
    assert "**Quantized** from a bundle made" in card and "llm-F32.gguf -> Q8_0, mmproj -> Q8_0" in card
    assert "- LLM against its source: prompts 4" in card and "- vision int8 against fp32: mean token cosine" in card
    assert "Fidelity against PyTorch (measured at export, on the bundle it was quantized from)" in card


def test_bad_uploads_one_sentence(bad_files):
    expected = {"text": "cannot be read as an image", "truncated": "is truncated", "huge": "20000"}
    for kind, path in bad_files.items():
        with pytest.raises(TinyLlavaError) as err:
            open_upload(path)
        message = str(err.value)
        assert "\n" not in message and path.name in message
        assert expected[kind] in message or (kind == "huge" and "pixels" in message), message


def test_cli_help_and_errors(capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as code:
        demo_main(["--help"])
    assert code.value.code == 0 and "--share" in capsys.readouterr().out
    assert demo_main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
    monkeypatch.chdir(tmp_path)  # no runs/tiny-shapes/bundle here
    assert demo_main([]) == 2
    err = capsys.readouterr().err.strip()
    assert "bash scripts/main.sh" in err and "\n" not in err


def test_handler_streams_and_keeps_history(variants_dir, tmp_path, reference):
    variants = discover(variants_dir)
    pool = ModelPool(variants, OPTIONS)
    handlers = DemoHandlers(pool)
    path, question = example_images(tmp_path, n=1)[0]
    try:
        outputs = list(handlers.ask({"path": path, "orig_name": "shape.png"}, question, "bundle", "cpu", 16, 0.0,
                                    1.0, -1, None))
        streamed = [o for o in outputs if o[2] == "answering…"]
        assert len(streamed) >= 2  # the answer arrives piece by piece
        messages, _, status, figures, state = outputs[-1]
        assert status.startswith(ANSWERED) and "time to first token" in figures and "peak RSS" in figures
        assert same_text(messages[-1]["content"]) == same_text(reference("bundle", path, question, 16))
        assert isinstance(state, DemoSession) and state.chat.turns[0].image_rows is not None
        # a follow-up in the same session: the picture is not sent again
        outputs = list(handlers.ask({"path": path}, "And its colour?", "bundle", "cpu", 16, 0.0, 1.0, -1, state))
        assert outputs[-1][2].startswith(ANSWERED) and len(state.messages) == 4
        assert state.chat.turns[1].image_rows is None
    finally:
        pool.close()


def test_truncated_uploads_follow_the_demo_option(variants_dir, bad_files, monkeypatch, capsys):
    """Refused by default with the sentence every entry point gives; answered with
    --allow-truncated-images (tinyllava_edge/data/images.py)."""
    pool = ModelPool(discover(variants_dir), OPTIONS)
    upload = {"path": str(bad_files["truncated"]), "orig_name": "holiday.png"}
    try:
        for allowed in (False, True):
            handlers = DemoHandlers(pool, allow_truncated_images=allowed)
            status = list(handlers.ask(upload, "What shape?", "bundle", "cpu", 4, 0.0, 1.0, -1, None))[-1][2]
            if allowed:
                assert status.startswith(ANSWERED) and handlers.check_upload(upload).startswith("image ready")
            else:
                assert status.startswith(PROBLEM) and "image file 'holiday.png' is truncated" in status, status
                assert "--allow-truncated-images" in handlers.check_upload(upload)
    finally:
        pool.close()

    seen = {}

    def fake_build_app(variants, device, **options):  # the command hands the option to the page
        seen.update(options)
        raise TinyLlavaError("stop here")

    monkeypatch.setattr("tinyllava_edge.apps.demo.build_app", fake_build_app)
    for argv, expected in (([], False), (["--allow-truncated-images"], True)):
        assert demo_main(["--model", str(variants_dir), *argv]) == 2
        assert seen["allow_truncated_images"] is expected
    assert "stop here" in capsys.readouterr().err


# -- a real browser ---------------------------------------------------------------------------------


def _chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                 "(pip install playwright; no `playwright install`)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    return sync_api


def _ask(page, question: str, expect) -> str:
    """Type `question`, send it, wait for the status to say it answered; the last bot message's text."""
    before = page.locator("#chat [data-testid=bot]").count()
    status = page.locator("#status").inner_text()
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    expect(page.locator("#status")).not_to_have_text(status, timeout=60_000)
    expect(page.locator("#status")).to_contain_text(ANSWERED, timeout=60_000)
    expect(page.locator("#chat [data-testid=bot]")).to_have_count(before + 1)
    return page.locator("#chat [data-testid=bot]").last.inner_text()


def test_browser(server, reference, bad_files, tmp_path):
    sync_api = _chromium()
    expect = sync_api.expect
    path, question = server["examples"][0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(server["url"])
            # an example image fills the upload and the question
            page.locator("#examples button, #examples td").first.click()
            expect(page.locator("#question textarea")).to_have_value(question, timeout=30_000)
            expect(page.locator("#image img")).to_have_count(1, timeout=30_000)
            answer = _ask(page, question, expect)
            assert same_text(answer) == same_text(reference("bundle", path, question))
            expect(page.locator("#figures")).to_contain_text("tokens/s")
            expect(page.locator("#figures")).to_contain_text("variant size on disk")
            # the other variant: a new conversation on the checkpoint, same picture
            page.locator("#variant input").click()
            page.get_by_role("option", name="ckpt", exact=False).click()
            expect(page.locator("#status")).to_contain_text("ckpt on cpu: new conversation")
            expect(page.locator("#chat [data-testid=bot]")).to_have_count(0)
            answer = _ask(page, question, expect)
            assert same_text(answer) == same_text(reference("ckpt", path, question))
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            # a text file renamed .png: one sentence in the page, and the app goes on serving
            page.locator("#image button[aria-label='Remove Image']").first.click()
            page.locator("#image input[type=file]").set_input_files(str(bad_files["text"]))
            expect(page.locator("#status")).to_contain_text("cannot be read as an image", timeout=30_000)
            page.locator("#examples button, #examples td").first.click()
            expect(page.locator("#image img")).to_have_count(1, timeout=30_000)
            page.locator("#clear").click()
            expect(page.locator("#chat [data-testid=bot]")).to_have_count(0)
            answer = _ask(page, question, expect)
            assert same_text(answer) == same_text(reference("ckpt", path, question))
        finally:
            browser.close()
    artifacts = ROOT / "runs" / "test-artifacts"
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "demo.png", artifacts / "demo.png")
    except OSError:
        pass  # a read-only checkout: the copy under tmp_path is the artifact


# -- the API: bad uploads, upload cap, load ---------------------------------------------------------


def test_bad_uploads_through_the_api(server, bad_files):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False, download_files=False)
    path, question = server["examples"][1]
    try:
        for kind, bad in bad_files.items():
            status = client.predict(handle_file(str(bad)), "What shape?", "bundle", "cpu", 8, 0.0, 1.0, -1,
                                    api_name="/ask")[2]
            assert status.startswith(PROBLEM) and bad.name in status and "\n" not in status, (kind, status)
        status = client.predict(handle_file(path), question, "bundle", "cpu", 8, 0.0, 1.0, -1, api_name="/ask")[2]
        assert status.startswith(ANSWERED)  # still serving
    finally:
        client.close()


def test_upload_cap(server, tmp_path):
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(2 * 2**20))
    with open(big, "rb") as f:
        response = httpx.post(server["url"] + "gradio_api/upload", files={"files": ("big.png", f, "image/png")},
                              timeout=30)
    assert response.status_code == 413, response.text


def test_load_8_sessions(server, capsys):
    from tinyllava_edge.apps.loadtest import run_load
    from tinyllava_edge.runtime.stats import peak_rss_bytes

    result = run_load(server["url"], server["examples"], "bundle", sessions=8, questions=5, max_new_tokens=16)
    assert result.errors == [], result.errors[:3]
    assert len(result.latencies_s) == 40
    with capsys.disabled():
        print(f"\ndemo load: {result.line()}; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
