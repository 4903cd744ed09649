"""Bad inputs: images. Each refusal is one sentence; the modes the loader should accept (CMYK, LA,
P, 16-bit grey, animated GIF, EXIF-rotated JPEG, 1x1) are checked on pixels; and a truncated image
is refused by the API, tinyllava-chat, tinyllava-eval, the demo and the server with the same
sentence, accepted by each only when allowed (harness: bad_input_harness.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("onnx")

import tinyllava_edge  # noqa: E402
from tinyllava_edge.apps.uploads import open_upload, upload_path  # noqa: E402
from bad_input_harness import (  # noqa: E402
    EXACT, TRUNCATED, Corpus, _chat, _data_with_a_truncated_image, _eval, _eval_argv, _halves, _noise, _png_header, _rgb,
    _truncated)

CASES = Corpus()
case = CASES.case

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


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ctx):
    CASES[name](ctx)
