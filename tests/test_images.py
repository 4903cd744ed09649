"""The one policy for reading images (tinyllava_edge/data/images.py): a truncated file is refused
with one sentence naming it unless the caller allows it; allowed, it decodes with the rest blank.
Every entry point's use of it is in tests/bad_inputs/test_bad_images.py."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image, ImageFile

from tinyllava_edge.data.images import ALLOW_TRUNCATED_HELP, ALLOW_TRUNCATED_OPTION, load_image
from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
from tinyllava_edge.errors import TinyLlavaError

REFUSAL = r"image file '.*cut\.{}' is truncated \(.*\); pass allow_truncated_images=True \(--allow-truncated-images\)"


def _cut(tmp_path, fmt: str):
    """A 64 x 64 noise picture in `fmt`, cut to half its bytes, and the picture's pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    return path, pixels


@pytest.mark.parametrize("fmt, blank", [("PNG", 0), ("JPEG", 128)])
def test_a_truncated_file_is_refused_unless_allowed(tmp_path, fmt, blank):
    path, pixels = _cut(tmp_path, fmt)
    with pytest.raises(TinyLlavaError, match=REFUSAL.format(fmt.lower())) as info:
        load_image(path)
    assert "\n" not in str(info.value)
    with pytest.raises(TinyLlavaError, match="is truncated"):
        preprocess(path, PreprocessConfig(size=(32, 32)))
    image = np.asarray(load_image(path, allow_truncated=True))
    assert image.shape == (64, 64, 3)
    assert (image[-1] == blank).all()  # the rows the file lacks: PIL's fill
    if fmt == "PNG":  # lossless: the rows it holds are the picture's
        assert np.array_equal(image[0], pixels[0])
    assert preprocess(path, PreprocessConfig(size=(32, 32)), allow_truncated=True).shape == (1, 3, 32, 32)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # PIL's global is left as it was


def test_a_lazily_opened_truncated_image_is_refused_too(tmp_path):
    path, _ = _cut(tmp_path, "PNG")
    with pytest.raises(TinyLlavaError, match=REFUSAL.format("png")):
        load_image(Image.open(path))
    assert load_image(Image.open(path), allow_truncated=True).size == (64, 64)


def test_a_file_cut_inside_its_header_cannot_be_read_even_when_allowed(tmp_path):
    path, _ = _cut(tmp_path, "PNG")
    path.write_bytes(path.read_bytes()[:30])  # the 8-byte signature and part of IHDR
    for allowed in (False, True):
        with pytest.raises(TinyLlavaError, match="cannot be read as an image"):
            load_image(path, allow_truncated=allowed)


def test_the_name_in_the_message_can_be_given(tmp_path):
    path, _ = _cut(tmp_path, "JPEG")
    with pytest.raises(TinyLlavaError, match="image file 'holiday.jpg' is truncated"):
        load_image(path, name="holiday.jpg")


def test_a_strict_read_never_sees_another_threads_leniency(tmp_path):
    """PIL's switch is a module global: a permissive read in one thread must not let a strict read
    in another accept a truncated file."""
    path, _ = _cut(tmp_path, "JPEG")
    refused, errors = [], []

    def strict():
        for _ in range(20):
            try:
                load_image(path)
            except TinyLlavaError:
                refused.append(1)

    def lenient():
        for _ in range(20):
            try:
                load_image(path, allow_truncated=True)
            except TinyLlavaError as err:  # pragma: no cover - would fail the test below
                errors.append(err)

    threads = [threading.Thread(target=f) for f in (strict, lenient, strict, lenient)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refused) == 40 and not errors


def test_the_option_says_what_it_does():
    assert ALLOW_TRUNCATED_OPTION == "--allow-truncated-images"
    assert "truncated" in ALLOW_TRUNCATED_HELP and "blank" in ALLOW_TRUNCATED_HELP
