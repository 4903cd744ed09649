"""Image preprocessing against transformers' PIL processors (what TinyLLaVA_Factory called).

The references are transformers 5's ``SiglipImageProcessorPil`` / ``CLIPImageProcessorPil`` (the
slow, PIL-based classes; the plain names need torchvision). Factory's ``pad`` step is written out
here from its ``expand2square`` so that the module is not checked against itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinyllava_edge.data.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessConfig,
    expand_to_square,
    load_image,
    preprocess,
)
from tinyllava_edge.errors import TinyLlavaError

TOL = 1e-5

# Literal preprocessor_config.json contents of the towers Factory uses.
SIGLIP_384 = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
SIGLIP_TINY = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32}}
CLIP_336 = {  # openai/clip-vit-large-patch14-336: old-style int sizes
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD), "resample": 3, "size": 336,
}
CLIP_TINY = {
    "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 30},
    "crop_size": {"height": 28, "width": 28},
}
# Crop larger than the resized image: transformers zero-pads inside center_crop.
CLIP_TINY_PADDED_CROP = {
    "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 24},
    "crop_size": {"height": 32, "width": 32},
}
PROCESSORS = {
    "siglip384": SIGLIP_384,
    "siglip32": SIGLIP_TINY,
    "clip336": CLIP_336,
    "clip30crop28": CLIP_TINY,
    "clip24crop32": CLIP_TINY_PADDED_CROP,
}
SIZES = [(640, 480), (480, 640), (333, 517), (517, 333), (1, 1), (7, 3), (3, 7), (1000, 20), (384, 384)]  # (w, h)


def _image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7 * w + h)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode == "RGBA":  # opaque: alpha handling is tested separately
        return Image.fromarray(np.dstack([np.asarray(rgb), np.full((h, w), 255, np.uint8)]), "RGBA")
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)  # L, CMYK


def _processor(d: dict):
    """The transformers PIL processor for a config dict (skips the test without transformers)."""
    transformers = pytest.importorskip("transformers")
    siglip = d.get("image_processor_type", "").startswith("Siglip")
    cls = transformers.SiglipImageProcessorPil if siglip else transformers.CLIPImageProcessorPil
    return cls.from_dict(d)


def _factory_expand2square(img: Image.Image, bg: tuple) -> Image.Image:
    # TinyLLaVA_Factory tinyllava/data/image_preprocess.py, ImagePreprocess.expand2square.
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), bg)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new(img.mode, (h, h), bg)
        out.paste(img, ((h - w) // 2, 0))
    return out


def _reference(img: Image.Image, proc, aspect: str) -> np.ndarray:
    # Factory: Image.open(...).convert("RGB"), optional expand2square, then the processor.
    img = img.convert("RGB")
    if aspect == "pad":
        img = _factory_expand2square(img, tuple(int(x * 255) for x in proc.image_mean))
    return proc(img, return_tensors="np")["pixel_values"]


@pytest.fixture(scope="module", params=sorted(PROCESSORS))
def processor_case(request):
    d = PROCESSORS[request.param]
    return d, _processor(d)


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_matches_transformers_processors(processor_case, aspect):
    d, proc = processor_case
    cfg = PreprocessConfig.from_image_processor_config(d, aspect=aspect)
    images = [_image(w, h) for w, h in SIZES]
    for img in images:
        ours = preprocess(img, cfg)
        ref = _reference(img, proc, aspect)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (1, 3) + cfg.size
        assert np.abs(ours - ref).max() <= TOL, (img.size, aspect)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA"])
@pytest.mark.parametrize("case", ["siglip32", "clip30crop28"])
def test_modes_match_processor_on_raw_input(mode, case):
    d = PROCESSORS[case]
    proc = _processor(d)
    cfg = PreprocessConfig.from_image_processor_config(d)
    for w, h in [(45, 31), (31, 45), (1, 1)]:
        img = _image(w, h, "L" if mode == "LA" else mode)
        if mode == "LA":  # opaque grey + alpha
            img = Image.merge("LA", [img, Image.new("L", img.size, 255)])
        # The processor gets the raw image and converts it itself.
        ref = proc(img, return_tensors="np")["pixel_values"]
        assert np.abs(preprocess(img, cfg) - ref).max() <= TOL, (mode, img.size)


def test_transparency_is_dropped_like_factory_not_composited_like_transformers5():
    d = PROCESSORS["siglip32"]
    proc = _processor(d)
    cfg = PreprocessConfig.from_image_processor_config(d)
    rgba = np.asarray(_image(40, 24, "RGBA")).copy()
    rgba[:, :20, 3] = 0  # left half fully transparent
    img = Image.fromarray(rgba, "RGBA")
    ours = preprocess(img, cfg)
    # Factory converts with PIL's convert("RGB"), which drops alpha ...
    assert np.abs(ours - proc(img.convert("RGB"), return_tensors="np")["pixel_values"]).max() <= TOL
    # ... while transformers 5's own convert_to_rgb composites onto white.
    assert np.abs(ours - proc(img, return_tensors="np")["pixel_values"]).max() > 0.1


def test_batch_and_inputs():
    cfg = PreprocessConfig.siglip(16)
    img = _image(20, 10)
    arr = np.asarray(img)
    batch = preprocess([img, arr, arr[..., 0], np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])], cfg)
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(batch[0], batch[3])
    assert preprocess(arr, cfg).shape == (1, 3, 16, 16)  # one array is one image
    with pytest.raises(TinyLlavaError, match="at least one image"):
        preprocess([], cfg)


def test_presets_equal_processor_configs():
    assert PreprocessConfig.siglip(384) == PreprocessConfig.from_image_processor_config(SIGLIP_384)
    assert PreprocessConfig.clip(336) == PreprocessConfig.from_image_processor_config(CLIP_336)
    assert PreprocessConfig.clip(336, aspect="pad").background_rgb == (122, 116, 104)
    assert PreprocessConfig.siglip().background_rgb == (127, 127, 127)


def test_from_image_processor_config_variants():
    cfg = PreprocessConfig.from_image_processor_config(
        {**SIGLIP_TINY, "do_normalize": False, "do_rescale": False, "resample": 2}
    )
    assert (cfg.image_mean, cfg.image_std, cfg.rescale_factor, cfg.resample) == ((0.0,) * 3, (1.0,) * 3, 1.0, 2)
    fast = PreprocessConfig.from_image_processor_config({**CLIP_TINY, "image_processor_type": "CLIPImageProcessorFast"})
    assert fast == PreprocessConfig.from_image_processor_config(CLIP_TINY)
    assert fast.size == (28, 28) and fast.shortest_edge == 30
    for bad, match in [
        ({**SIGLIP_TINY, "do_resize": False}, "do_resize"),
        ({**SIGLIP_TINY, "size": 32}, "without a centre crop"),
        ({**SIGLIP_TINY, "do_center_crop": True, "crop_size": 16}, "only an equal crop"),
        ({**SIGLIP_TINY, "size": {"longest_edge": 32}}, "not supported"),
        ({"size": {"height": 8, "width": 8}}, "no 'resample'"),
    ]:
        with pytest.raises(TinyLlavaError, match=match):
            PreprocessConfig.from_image_processor_config(bad)


def test_config_round_trip_and_validation():
    for cfg in (PreprocessConfig.clip(336, aspect="pad"), PreprocessConfig.siglip(384)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert PreprocessConfig.from_dict(d) == cfg
    with pytest.raises(TinyLlavaError, match="unknown keys"):
        PreprocessConfig.from_dict({"size": [8, 8], "crop": 3})
    for kwargs, match in [
        ({"size": (8,)}, "two positive integers"),
        ({"size": (8, 8), "aspect": "anyres"}, "aspect"),
        ({"size": (8, 8), "resize_mode": "crop"}, "resize_mode"),
        ({"size": (8, 8), "image_std": (0.5, 0.0, 0.5)}, "must not contain 0"),
        ({"size": (8, 8), "image_mean": (0.5, 0.5)}, "3 values"),
        ({"size": (8, 8), "resample": 9}, "resample"),
        ({"size": (8, 8), "shortest_edge": 8}, "only applies"),
    ]:
        with pytest.raises(TinyLlavaError, match=match):
            PreprocessConfig(**kwargs)


def test_expand_to_square_offsets():
    bg = (1, 2, 3)
    wide = Image.new("RGB", (5, 2), (200, 200, 200))  # h=2 -> paste at y=(5-2)//2=1
    out = np.asarray(expand_to_square(wide, bg))
    assert out.shape == (5, 5, 3)
    assert (out[1:3] == 200).all() and (out[[0, 3, 4]] == bg).all()
    tall = Image.new("RGB", (2, 5), (200, 200, 200))  # w=2 -> paste at x=1
    out = np.asarray(expand_to_square(tall, bg))
    assert (out[:, 1:3] == 200).all() and (out[:, [0, 3, 4]] == bg).all()
    square = Image.new("RGB", (3, 3))
    assert expand_to_square(square, bg) is square


def test_load_image_files(tmp_path):
    img = _image(30, 20)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 30)
    raw = load_image(str(path), exif_transpose=False)
    assert raw.size == (30, 20)
    cfg = PreprocessConfig.siglip(8)
    factory_pixels = preprocess(path, cfg, exif_transpose=False)
    np.testing.assert_array_equal(factory_pixels, preprocess(raw, cfg, exif_transpose=False))
    assert not np.array_equal(factory_pixels, preprocess(path, cfg))

    png = tmp_path / "grey.png"
    _image(9, 4, "L").save(png)
    loaded = load_image(png)
    assert loaded.mode == "RGB" and loaded.size == (9, 4)

    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    with pytest.raises(TinyLlavaError, match="cannot be read as an image"):
        load_image(bad)
    with pytest.raises(TinyLlavaError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TinyLlavaError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TinyLlavaError, match="channels last"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TinyLlavaError, match="path, a PIL image or a numpy array"):
        load_image(42)


def test_imports_without_torch_or_transformers():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "import tinyllava_edge.data.preprocess, tinyllava_edge.data.template"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
