"""Bad inputs, one corpus: every case ends in one clear sentence, never a traceback.

Each case is a small function over one shared set of artifacts (a Qwen2 miniature checkpoint and
its F32 bundle, built once for the module). Three ways a user meets an error, three checks:

* the Python API raises the project's own exception type (TinyLlavaError or a subclass) with a
  one-line message;
* a command (`main(argv)`) returns non-zero and prints exactly one `error: ...` line on stderr;
* the demo's upload check refuses the file with one sentence.

Image modes the loader should accept (CMYK, LA, P, 16-bit grey, animated GIF, EXIF-rotated
JPEG, 1x1) are in the corpus too, each checked on pixels. So is one behaviour for the same input
everywhere: a bad option value, a truncated image (refused by the API, tinyllava-chat,
tinyllava-eval, the demo and the server with the same sentence, accepted by each only when allowed; training
reads it as TinyLLaVA_Factory does), no network lookup for a missing folder, and the modes of
written files.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

import tinyllava_edge  # noqa: E402
from tinyllava_edge.apps.uploads import open_upload, upload_path  # noqa: E402
from tinyllava_edge.data.preprocess import load_image  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from tinyllava_edge.bundle import read_manifest, sha256_file  # noqa: E402

MINIATURE = "TinyLLaVA-Qwen2-0.5B-SigLIP"
# The one refusal of a truncated image, at every entry point (tinyllava_edge/data/images.py).
TRUNCATED = (r"image file '(.*/)?{}' is truncated \(.*\); pass allow_truncated_images=True "
             r"\(--allow-truncated-images\) to decode what it holds, leaving the rest blank")
EXACT = {"device": "cpu", "n_threads": 1, "kv_type": "f32", "flash_attn": "off"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tinyllava_edge.data.shapes import write_dataset
    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_inputs")
    ckpt, _ = build_miniature_bundle(MINIATURE, root)
    write_dataset(root / "data", n_train=2, n_val=1, n_test=1, image_size=32)
    with tinyllava_edge.load(root / "bundle", **EXACT) as vlm:
        yield {"root": root, "ckpt": ckpt, "bundle": root / "bundle", "data": root / "data", "vlm": vlm}


class Ctx:
    """What a case gets: the shared artifacts, its own temporary folder, captured output."""

    def __init__(self, built, tmp: Path, capsys):
        self.root, self.ckpt, self.bundle, self.data, self.vlm = (built[k] for k in
                                                                  ("root", "ckpt", "bundle", "data", "vlm"))
        self.tmp, self.capsys = tmp, capsys

    # -- artifacts to spoil -------------------------------------------------------------------------
    def ckpt_copy(self) -> Path:
        return Path(shutil.copytree(self.ckpt, self.tmp / "ckpt"))

    def bundle_copy(self) -> Path:
        return Path(shutil.copytree(self.bundle, self.tmp / "bundle"))

    def edit_config(self, change) -> Path:
        ckpt = self.ckpt_copy()
        raw = json.loads((ckpt / "config.json").read_text())
        change(raw)
        (ckpt / "config.json").write_text(json.dumps(raw))
        return ckpt

    def edit_manifest(self, change, bundle: Path | None = None) -> Path:
        bundle = bundle or self.bundle_copy()
        manifest = json.loads((bundle / "manifest.json").read_text())
        change(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle

    def spoil_part(self, role: str, spoil) -> Path:
        """A bundle whose `role` file is replaced by spoil(bytes), its manifest record updated to
        match (so the file itself, not the manifest check, is what the loader meets)."""
        bundle = self.bundle_copy()
        manifest = json.loads((bundle / "manifest.json").read_text())
        record = next(r for r in manifest["files"] if r["role"] == role and r.get("quant") in (None, "fp32", "F32"))
        path = bundle / record["name"]
        path.write_bytes(spoil(path.read_bytes()))
        record["size"], record["sha256"] = path.stat().st_size, sha256_file(path)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle

    def image(self, name: str, make) -> Path:
        path = self.tmp / name
        made = make(path)
        if isinstance(made, bytes):
            path.write_bytes(made)
        return path

    # -- the three checks -----------------------------------------------------------------------------
    def api(self, call, pattern: str, kind: type = TinyLlavaError) -> str:
        with pytest.raises(TinyLlavaError) as info:
            call()
        assert isinstance(info.value, kind), type(info.value)
        message = str(info.value)
        assert message and "\n" not in message, message
        assert re.search(pattern, message), message
        return message

    def cli(self, main, argv: list, pattern: str) -> str:
        self.capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse refusing an option
            code = stop.code
        err = self.capsys.readouterr().err.strip()
        assert code not in (0, None), err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.search(pattern, lines[0]), lines[0]
        return lines[0]

    def upload(self, path: Path, pattern: str) -> str:
        return self.api(lambda: open_upload(path), pattern)


def _chat(argv):
    from tinyllava_edge.cli.chat import main
    return main(argv, stdin=io.StringIO(""))


def _export(argv):
    from tinyllava_edge.cli.export import main
    return main(argv)


def _quantize(argv):
    from tinyllava_edge.cli.quantize import main
    return main(argv)


def _train(argv):
    from tinyllava_edge.cli.train import main
    return main(argv)


def _eval(argv):
    from tinyllava_edge.cli.eval import main
    return main(argv)


def _demo(argv):
    from tinyllava_edge.cli.demo import main
    return main(argv)


# -- image bytes ------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG declaring width x height RGB pixels, with next to no data."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def _noise(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _halves(path: Path, mode: str, left, right, fmt="PNG", **save) -> None:
    """A 32 x 16 picture: left half `left`, right half `right` (colours in `mode`)."""
    image = Image.new(mode, (32, 16), left)
    image.paste(Image.new(mode, (16, 16), right), (16, 0))
    image.save(path, format=fmt, **save)


def _rgb(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# -- the corpus ---------------------------------------------------------------------------------------------
# Each case: name -> function(ctx). Grouped as in the issue.

CASES = {}


def case(name):
    def register(fn):
        assert name not in CASES
        CASES[name] = fn
        return fn
    return register


# paths

@case("path/api-missing")
def _(c):
    c.api(lambda: tinyllava_edge.load(c.tmp / "nowhere"), "does not exist; expected a bundle directory")


@case("path/api-file-for-folder")
def _(c):
    c.api(lambda: tinyllava_edge.load(c.bundle / "manifest.json"), "is a file; expected a bundle directory")


@case("path/api-empty-folder")
def _(c):
    (c.tmp / "empty").mkdir()
    c.api(lambda: tinyllava_edge.load(c.tmp / "empty"), "neither a bundle .no manifest.json. nor a checkpoint")


@case("path/api-no-permission")
def _(c):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading, so there is no error to see")
    bundle = c.bundle_copy()
    (bundle / "manifest.json").chmod(0)
    try:
        c.api(lambda: read_manifest(bundle), "manifest.json")
    finally:
        (bundle / "manifest.json").chmod(0o644)


@case("path/chat-cli-missing-model")
def _(c):
    c.cli(_chat, ["--model", c.tmp / "nowhere", "--prompt", "hi"], "does not exist")


@case("path/export-cli-file-for-checkpoint")
def _(c):
    c.cli(_export, ["--model", c.ckpt / "config.json", "--out", c.tmp / "out", "--quiet"], "is a file")


@case("path/quantize-cli-empty-folder")
def _(c):
    (c.tmp / "empty").mkdir()
    c.cli(_quantize, ["--bundle", c.tmp / "empty", "--out", c.tmp / "q", "--quiet"], "manifest.json")


@case("path/train-cli-missing-data")
def _(c):
    c.cli(_train, ["--model", c.ckpt, "--data", c.tmp / "absent.json", "--output", c.tmp / "run", "--max-steps", 1],
          "does not exist")


@case("path/export-cli-out-is-a-file")
def _(c):
    (c.tmp / "taken").write_text("x")
    c.cli(_export, ["--model", c.ckpt, "--out", c.tmp / "taken", "--quiet"], "taken")


# checkpoints

@case("ckpt/corrupt-config-json")
def _(c):
    ckpt = c.ckpt_copy()
    (ckpt / "config.json").write_text("{ not json")
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "config.json is not valid JSON")


@case("ckpt/unknown-model-type")
def _(c):
    ckpt = c.edit_config(lambda raw: raw.update(model_type="bert", architectures=["BertModel"]))
    c.cli(_export, ["--model", ckpt, "--out", c.tmp / "out", "--quiet"], "'bert'")


@case("ckpt/unknown-llm-family")
def _(c):
    ckpt = c.edit_config(lambda raw: raw["text_config"].update(model_type="mistral"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "'mistral'")


@case("ckpt/unknown-vision-tower")
def _(c):
    ckpt = c.edit_config(lambda raw: raw["vision_config"].update(model_type="beit_vision_model"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "beit_vision_model")


@case("ckpt/unknown-connector")
def _(c):
    ckpt = c.edit_config(lambda raw: raw.update(connector_type="mlp9x_swish"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "mlp9x_swish")


@case("ckpt/truncated-safetensors")
def _(c):
    ckpt = c.ckpt_copy()
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    c.cli(_export, ["--model", ckpt, "--out", c.tmp / "out", "--quiet"], "not a readable safetensors file")


@case("ckpt/wrong-shape-weights")
def _(c):
    from safetensors.torch import load_file, save_file

    ckpt = c.ckpt_copy()
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["connector._connector.0.weight"] = torch.zeros(5, 7)
    save_file(tensors, str(ckpt / "model.safetensors"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), r"connector._connector.0.weight \(5, 7\) in the file")


# artifacts

@case("artifact/truncated-gguf")
def _(c):
    bundle = c.spoil_part("llm", lambda data: data[: len(data) // 2])
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "llama.cpp cannot load")


@case("artifact/corrupt-gguf")
def _(c):
    bundle = c.spoil_part("llm", lambda data: b"GGUF" + bytes(reversed(data[4:])))
    c.cli(_chat, ["--model", bundle, "--device", "cpu", "--prompt", "hi"], "llama.cpp cannot load")


@case("artifact/truncated-onnx")
def _(c):
    bundle = c.spoil_part("vision", lambda data: data[: len(data) // 2])
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "onnxruntime cannot load vision.onnx")


@case("artifact/corrupt-onnx")
def _(c):
    bundle = c.spoil_part("vision", lambda data: np.random.default_rng(1).bytes(len(data)))
    c.cli(_chat, ["--model", bundle, "--device", "cpu", "--prompt", "hi"], "onnxruntime cannot load vision.onnx")


@case("artifact/manifest-missing")
def _(c):
    bundle = c.bundle_copy()
    (bundle / "manifest.json").unlink()
    c.api(lambda: read_manifest(bundle), "holds no manifest.json")


@case("artifact/manifest-not-json")
def _(c):
    bundle = c.bundle_copy()
    (bundle / "manifest.json").write_text('{"format_version": 1, "files": [')
    c.cli(_chat, ["--model", bundle, "--prompt", "hi"], "manifest.json is not valid JSON")


@case("artifact/manifest-unknown-version")
def _(c):
    bundle = c.edit_manifest(lambda m: m.update(format_version=99))
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "format_version 99; this tinyllava-edge reads format_version 1")


@case("artifact/manifest-names-a-missing-file")
def _(c):
    bundle = c.bundle_copy()
    (bundle / "vision.onnx").unlink()
    c.cli(_quantize, ["--bundle", bundle, "--out", c.tmp / "q", "--bits", 8, "--quiet"],
          r"bundle file vision.onnx \(vision\) is missing")


@case("artifact/sha256-mismatch")
def _(c):
    bundle = c.bundle_copy()
    path = next(bundle.glob("llm-*.gguf"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "the file was changed after export")


@case("artifact/parts-disagree")
def _(c):
    def widen(m):
        next(r for r in m["files"] if r["role"] == "vision")["hidden"] = 4096
    bundle = c.edit_manifest(widen)
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "4096-wide image embeddings but .* has n_embd 64")


@case("artifact/file-entry-escapes-the-bundle")
def _(c):
    bundle = c.edit_manifest(lambda m: m["files"][0].update(name="../../etc/passwd"))
    c.api(lambda: read_manifest(bundle), "without a plain file name")


# images

@case("image/api-empty-file")
def _(c):
    path = c.image("empty.png", lambda p: b"")
    c.api(lambda: c.vlm.generate(path, "What?", max_new_tokens=1), "cannot be read as an image")


@case("image/upload-empty-file")
def _(c):
    c.upload(c.image("empty.jpg", lambda p: b""), "cannot be read as an image: not a format PIL reads")


@case("image/upload-not-an-image")
def _(c):
    c.upload(c.image("notes.png", lambda p: b"%PDF-1.4 this is not a picture\n"), "cannot be read as an image")


@case("image/chat-cli-not-an-image")
def _(c):
    path = c.image("notes.png", lambda p: b"just text\n")
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--image", path, "--prompt", "hi"],
          "cannot be read as an image")


@case("image/upload-truncated-png")
def _(c):
    c.upload(c.image("cut.png", lambda p: _noise("PNG")[:600]), TRUNCATED.format("cut.png"))


@case("image/upload-truncated-jpeg")
def _(c):
    c.upload(c.image("cut.jpg", lambda p: _noise("JPEG")[:700]), TRUNCATED.format("cut.jpg"))


@case("image/api-png-cut-in-its-header")
def _(c):
    path = c.image("header.png", lambda p: _noise("PNG")[:30])
    c.api(lambda: c.vlm.generate(path, "What?", max_new_tokens=1), "cannot be read as an image")


@case("image/api-decompression-bomb")
def _(c):
    path = c.image("bomb.png", lambda p: _png_header(30000, 30000))
    c.api(lambda: c.vlm.generate(path, "What?", max_new_tokens=1), "cannot be read as an image .*decompression bomb")


@case("image/upload-decompression-bomb")
def _(c):
    c.upload(c.image("bomb.png", lambda p: _png_header(30000, 30000)), "30000x30000|declares more than")


@case("image/upload-too-long-a-side")
def _(c):
    c.upload(c.image("strip.png", lambda p: _png_header(9000, 4)), r"9000x4 pixels; the demo takes images up to")


@case("image/upload-payload-of-a-wrong-type")
def _(c):
    c.api(lambda: upload_path(12345), "came as a int; expected an uploaded file")


@case("image/one-by-one-works")
def _(c):
    path = c.image("dot.png", lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p))
    assert isinstance(c.vlm.generate(path, "What?", max_new_tokens=1), str)
    assert open_upload(path).size == (1, 1)


@case("image/cmyk-works")
def _(c):
    path = c.image("cmyk.jpg", lambda p: _halves(p, "CMYK", (0, 255, 255, 0), (255, 255, 0, 0), fmt="JPEG",
                                                  quality=95))
    pixels = _rgb(path)
    assert pixels[8, 4, 0] > 200 and pixels[8, 4, 2] < 60  # cyan-free, yellow: red
    assert pixels[8, 28, 2] > 150 and pixels[8, 28, 0] < 60  # blue
    assert isinstance(c.vlm.generate(path, "What?", max_new_tokens=1), str)


@case("image/la-works")
def _(c):
    path = c.image("la.png", lambda p: _halves(p, "LA", (40, 255), (220, 0)))
    pixels = _rgb(path)
    assert tuple(pixels[8, 4]) == (40, 40, 40) and tuple(pixels[8, 28]) == (220, 220, 220)  # alpha dropped
    assert open_upload(path).mode == "RGB"


@case("image/palette-works")
def _(c):
    def make(p):
        image = Image.new("P", (32, 16), 0)
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        image.paste(1, (16, 0, 32, 16))
        image.save(p, transparency=1)
    pixels = _rgb(c.image("palette.png", make))
    assert tuple(pixels[8, 4]) == (255, 0, 0) and tuple(pixels[8, 28]) == (0, 0, 255)


@case("image/16-bit-grey-works")
def _(c):
    def make(p):
        ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (16, 1))  # (16, 32), left dark
        Image.fromarray(ramp).save(p)
    path = c.image("deep.png", make)
    assert Image.open(path).mode.startswith("I")
    pixels = _rgb(path)
    # scaled to 8 bits, not clipped to white: a ramp from 0 to 255
    assert pixels[8, 0, 0] == 0 and pixels[8, 31, 0] == 255 and 100 < pixels[8, 16, 0] < 160
    assert np.array_equal(np.asarray(open_upload(path)), pixels.astype(np.uint8))


@case("image/animated-gif-first-frame")
def _(c):
    def make(p):
        frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    path = c.image("anim.gif", make)
    assert Image.open(path).n_frames == 3
    assert tuple(_rgb(path)[8, 8]) == (255, 0, 0)
    assert tuple(np.asarray(open_upload(path))[8, 8]) == (255, 0, 0)


@case("image/exif-rotated-photo")
def _(c):
    def make(p):
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        _halves(p, "RGB", (255, 0, 0), (0, 0, 255), fmt="JPEG", quality=95, exif=exif.tobytes())
    path = c.image("photo.jpg", make)
    pixels = _rgb(path)
    assert pixels.shape == (32, 16, 3)  # stored 32 wide x 16 high, shown 16 wide x 32 high
    assert pixels[4, 8, 0] > 200 and pixels[4, 8, 2] < 60  # the stored left (red) half is now on top
    assert pixels[28, 8, 2] > 200 and pixels[28, 8, 0] < 60
    assert np.asarray(open_upload(path)).shape == (32, 16, 3)


# one behaviour for the same input everywhere

def _truncated(c, name: str = "cut.png") -> Path:
    """A 64 x 64 picture cut short: its header whole, its pixel data half there."""
    fmt = "PNG" if name.endswith(".png") else "JPEG"
    return c.image(name, lambda p: _noise(fmt)[:600 if fmt == "PNG" else 700])


def _data_with_a_truncated_image(c) -> tuple[Path, str]:
    """A copy of the shapes data whose first test question's image is cut in half."""
    data = Path(shutil.copytree(c.data, c.tmp / "data"))
    first = json.loads((data / "test.json").read_text())[0]
    image = data / first["image"]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return data, Path(first["image"]).name


def _eval_argv(c, model: Path, data: Path, device: str = "cpu") -> list:
    return ["--benchmark", "shapes", "--model", model, "--data", data, "--limit", 1, "--device", device,
            "--out", c.tmp / "eval", "--quiet"]


@case("image/api-truncated-refused")
def _(c):
    path = _truncated(c)
    c.api(lambda: c.vlm.generate(path, "What?", max_new_tokens=1), TRUNCATED.format("cut.png"))


@case("image/api-truncated-pil-image-refused")
def _(c):
    path = _truncated(c, "cut.jpg")
    c.api(lambda: c.vlm.chat().ask(Image.open(path), "What?"), TRUNCATED.format("cut.jpg"))


@case("image/api-truncated-allowed")
def _(c):
    path = _truncated(c, "cut.jpg")
    with tinyllava_edge.load(c.bundle, allow_truncated_images=True, **EXACT) as vlm:
        assert isinstance(vlm.generate(path, "What?", max_new_tokens=1), str)
        assert isinstance("".join(vlm.stream(path, "Why?", max_new_tokens=1)), str)
        assert isinstance(vlm.chat().ask(path, "What colour?", max_new_tokens=1), str)


@case("image/api-allow-truncated-not-a-bool")
def _(c):
    c.api(lambda: tinyllava_edge.load(c.bundle, allow_truncated_images="yes", **EXACT),
          "allow_truncated_images must be True or False")


@case("image/chat-cli-truncated-refused")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--image", _truncated(c), "--prompt", "hi"],
          TRUNCATED.format("cut.png"))


@case("image/chat-cli-truncated-allowed")
def _(c):
    c.capsys.readouterr()
    assert _chat(["--model", str(c.bundle), "--device", "cpu", "--threads", "1", "--image", str(_truncated(c)),
                  "--prompt", "hi", "--max-new-tokens", "1", "--no-stats", "--allow-truncated-images"]) == 0
    assert "error" not in c.capsys.readouterr().err


@case("image/eval-cli-truncated-refused")
def _(c):
    data, name = _data_with_a_truncated_image(c)
    c.cli(_eval, _eval_argv(c, c.bundle, data), TRUNCATED.format(name))


@case("image/eval-cli-checkpoint-truncated-refused")
def _(c):
    data, name = _data_with_a_truncated_image(c)
    c.cli(_eval, _eval_argv(c, c.ckpt, data), TRUNCATED.format(name))


@case("image/eval-cli-truncated-allowed")
def _(c):
    data, _ = _data_with_a_truncated_image(c)
    c.capsys.readouterr()
    assert _eval([str(a) for a in _eval_argv(c, c.bundle, data)] + ["--allow-truncated-images"]) == 0
    results = json.loads((c.tmp / "eval" / "results.json").read_text())
    assert results["settings"]["allow_truncated_images"] is True


@case("image/upload-truncated-allowed")
def _(c):
    assert open_upload(_truncated(c), allow_truncated=True).size == (64, 64)


def _server_image(path: Path, allow_truncated: bool = False):
    """A request image as tinyllava-serve receives it (a data: URI), under its image policy."""
    import base64

    pytest.importorskip("starlette")
    from tinyllava_edge.apps.serve.images import ImagePolicy, load_request_image

    policy = ImagePolicy(max_image_bytes=2**20, max_image_pixels=2**20, allow_truncated=allow_truncated)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return load_request_image(url, policy, "messages[0].content[1].image_url")


@case("image/server-truncated-refused")
def _(c):
    from tinyllava_edge.apps.serve.errors import ApiError

    image = _server_image(_truncated(c))
    message = c.api(image.decode, TRUNCATED.format(r"messages\[0\]\.content\[1\]\.image_url"), kind=ApiError)
    assert "--allow-truncated-images" in message


@case("image/server-truncated-allowed")
def _(c):
    assert _server_image(_truncated(c), allow_truncated=True).decode().size == (64, 64)


@case("image/one-refusal-everywhere")
def _(c):
    path = _truncated(c)
    said = [c.api(lambda: c.vlm.generate(path, "What?", max_new_tokens=1), "is truncated"),
            c.upload(path, "is truncated"),
            c.api(_server_image(path).decode, "is truncated"),
            c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--image", path, "--prompt", "hi"],
                  "is truncated").removeprefix("error: ")]
    assert len({re.sub(r"'[^']*'", "IMAGE", message) for message in said}) == 1, said


@case("cli/export-bad-format")
def _(c):
    c.cli(_export, ["--model", c.ckpt, "--out", c.tmp / "o", "--format", "zip"],
          r"^error: argument --format: invalid choice: 'zip' \(choose from .*gguf.*onnx")


@case("cli/export-bits-not-a-number")
def _(c):
    c.cli(_export, ["--model", c.ckpt, "--out", c.tmp / "o", "--bits", "sixteen"],
          r"argument --bits: invalid choice: 'sixteen' \(choose from 4, 8, 16, 32\)")


@case("cli/chat-bad-device")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "tpu"], r"argument --device: invalid choice: 'tpu' .*jetson")


@case("cli/demo-bad-device")
def _(c):
    c.cli(_demo, ["--model", c.bundle, "--device", "npu"], r"argument --device: invalid choice: 'npu' .*cuda")


@case("cli/eval-checkpoint-on-a-device-torch-lacks")
def _(c):
    c.cli(_eval, _eval_argv(c, c.ckpt, c.data, device="tpu"), "device 'tpu' is not a torch device")


@case("cli/train-unknown-option")
def _(c):
    c.cli(_train, ["--model", c.ckpt, "--output", c.tmp / "run", "--learning-rate", 1],
          r"unrecognized arguments: --learning-rate 1 \(see tinyllava-train --help\)")


@case("cli/serve-bad-device")
def _(c):
    def serve(argv):
        from tinyllava_edge.cli.serve import main
        return main(argv)
    c.cli(serve, ["--model", c.bundle, "--device", "tpu"], r"argument --device: invalid choice: 'tpu' .*jetson")


@case("cli/quantize-missing-out")
def _(c):
    c.cli(_quantize, ["--bundle", c.bundle], "the following arguments are required: --out")


@case("net/missing-tokenizer-folder-is-not-looked-up-online")
def _(c):
    from tinyllava_edge.model import load_tokenizer
    from tinyllava_edge.testing.network import NetworkGuard

    with NetworkGuard() as guard:
        c.api(lambda: load_tokenizer("no-such-folder/tokenizer"),
              "tokenizer folder no-such-folder/tokenizer does not exist")
        c.cli(_train, ["--preset", "tiny-shapes", "--tokenizer", "no-such/tokenizer", "--data",
                       c.data / "train.json", "--output", c.tmp / "run", "--quiet"], "no-such/tokenizer does not exist")
    assert guard.attempts == []


@case("files/written-with-the-umask-mode")
def _(c):
    import stat

    from tinyllava_edge.quant.bundle import quantize_bundle

    before = os.umask(0o027)
    try:
        quantize_bundle(c.bundle, c.tmp / "q8", quant="Q8_0", verify=False, progress=False)
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (c.tmp / "q8").iterdir()}
    assert set(modes.values()) == {0o640}, modes  # not 0600: the group may read what the user wrote
    assert stat.S_IMODE((c.tmp / "q8").stat().st_mode) == 0o750


# text

@case("text/empty-prompt-stream")
def _(c):
    c.api(lambda: c.vlm.stream(None, "\t \n"), "the prompt is empty")


@case("text/empty-prompt-chat-cli-interactive")
def _(c):
    from tinyllava_edge.cli.chat import main
    c.capsys.readouterr()
    assert main(["--model", str(c.bundle), "--device", "cpu", "--no-stats"], stdin=io.StringIO("\n  \n/quit\n")) == 0
    assert "Traceback" not in c.capsys.readouterr().err


@case("text/prompt-longer-than-the-context")
def _(c):
    c.api(lambda: c.vlm.generate(None, "shapes and colours " * 3000, max_new_tokens=4),
          r"the prompt takes \d+ positions but the context holds \d+, leaving no room")


@case("text/invalid-utf8-api")
def _(c):
    c.api(lambda: c.vlm.generate(None, b"caf\xe9?".decode("utf-8", "surrogateescape"), max_new_tokens=1),
          "the prompt is not valid UTF-8 text")


@case("text/invalid-utf8-chat-cli")
def _(c):
    prompt = os.fsdecode(b"what is \xff\xfe this?")  # what Python gives a program for these argv bytes
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", prompt], "not valid UTF-8")


@case("text/prompt-as-bytes")
def _(c):
    c.api(lambda: c.vlm.generate(None, b"What?"), "a prompt must be a string, got bytes")


@case("text/control-characters-work")
def _(c):
    answer = c.vlm.generate(None, "\x00\x07What\x1b[31m is \x7fthis?\r\x0c", max_new_tokens=3)
    assert isinstance(answer, str)


@case("text/max-new-tokens-as-text")
def _(c):
    c.api(lambda: c.vlm.generate(None, "Hi", max_new_tokens="8"), "max_new_tokens must be an integer")


@case("text/chat-cli-top-p-out-of-range")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", "hi", "--top-p", 2], r"top_p must be a number in")


@case("text/chat-cli-zero-max-new-tokens")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", "hi", "--max-new-tokens", 0],
          "max_new_tokens must be an integer of at least 1")


@case("text/chat-cli-negative-threads")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", "hi", "--threads", -2], "thread")


# training data (through the command: the library's cases are in test_train_data.py)

def _record(image="images/train_000000.png", turns=(("human", "<image>\nWhat colour?"), ("gpt", "red"))):
    return {"id": "x", "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}


def _train_on(c, text: str, pattern: str):
    data = c.data / f"bad-{c.tmp.name}.jsonl"
    data.write_text(text)
    try:
        c.cli(_train, ["--model", c.ckpt, "--data", data, "--image-folder", c.data, "--output", c.tmp / "run",
                       "--max-steps", 1, "--batch-size", 1, "--quiet"], pattern)
    finally:
        data.unlink()
    assert not (c.tmp / "run" / "model.safetensors").exists()


@case("data/missing-image")
def _(c):
    _train_on(c, json.dumps(_record(image="images/nope.png")) + "\n", "nope.png.* not found")


@case("data/broken-json-line")
def _(c):
    _train_on(c, json.dumps(_record()) + '\n{"conversations": [\n', r"line 2 column \d+: invalid JSON")


@case("data/no-assistant-turn")
def _(c):
    _train_on(c, json.dumps(_record(turns=(("human", "<image>\nWhat colour?"),))) + "\n", "no assistant")


@case("data/truncated-image-trains-as-in-the-factory")
def _(c):
    data = Path(shutil.copytree(c.data, c.tmp / "data"))
    records = json.loads((data / "train.json").read_text())[:2]
    for record in records:
        image = data / record["image"]
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    (data / "cut.json").write_text(json.dumps(records))
    with pytest.raises(TinyLlavaError, match="is truncated"):
        load_image(data / records[0]["image"])  # what every other entry point says
    c.capsys.readouterr()
    assert _train(["--model", str(c.ckpt), "--data", str(data / "cut.json"), "--output", str(c.tmp / "run"),
                   "--max-steps", "1", "--batch-size", "1", "--quiet"]) == 0, c.capsys.readouterr().err
    assert (c.tmp / "run" / "model.safetensors").is_file()


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, built, tmp_path, capsys, one_thread):
    CASES[name](Ctx(built, tmp_path, capsys))
