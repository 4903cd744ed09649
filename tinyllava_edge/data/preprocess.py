"""Image preprocessing for the vision towers: one numpy + PIL implementation for all stages.

Torch training, ONNX export validation and the edge runtime all call :func:`preprocess`, so a
bundle sees exactly the pixels the model was trained on. It reproduces, value for value:

* TinyLLaVA_Factory ``tinyllava/data/image_preprocess.py``: ``Image.open(f).convert("RGB")``,
  then for ``image_aspect_ratio == "pad"`` its ``expand2square`` with the background
  ``tuple(int(m * 255) for m in image_mean)``, then the tower's image processor;
* the slow (PIL) transformers processors that Factory called: ``SiglipImageProcessor`` (straight
  resize) and ``CLIPImageProcessor`` (shortest edge, then centre crop). In transformers 5 those
  are ``SiglipImageProcessorPil`` / ``CLIPImageProcessorPil`` (``image_processing_backends.py``,
  ``PilBackend``); the plain names are torchvision backends.

Images are read by :func:`tinyllava_edge.data.images.load_image` (its policy for truncated
files is the same at every entry point). A deliberate difference from a bare transformers 5
processor, Factory's behaviour: an image with an alpha channel loses it (PIL ``convert("RGB")``;
transformers 5 composites it onto white). One on request of this project: EXIF orientation is
applied (Factory did not; pass ``exif_transpose=False`` for its exact pixels on rotated JPEGs).

No torch or transformers imports here: the edge runtime runs with numpy and pillow alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from tinyllava_edge.data.images import ImageInput, load_image
from tinyllava_edge.errors import TinyLlavaError

RESIZE_MODES = ("resize", "shortest_edge_crop")
ASPECTS = ("square", "pad")
PIL_RESAMPLE = MappingProxyType(
    {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
)

# transformers.image_utils OPENAI_CLIP_MEAN / OPENAI_CLIP_STD and IMAGENET_STANDARD_* (SigLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


# torchvision / DINOv2 normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes ``pixel_values``; saved in every checkpoint and bundle manifest.

    ``size`` is the (height, width) of the output. ``resize_mode`` ``"resize"`` resizes straight
    to it (SigLIP); ``"shortest_edge_crop"`` resizes the shorter side to ``shortest_edge``
    (default: the shorter side of ``size``) keeping the aspect ratio, then centre-crops to
    ``size`` (CLIP). ``aspect`` ``"pad"`` first pads the image to a square with the mean colour.
    """

    size: tuple[int, int]
    resize_mode: str = "resize"
    resample: int = 3  # PIL code; 3 = bicubic, what both towers' processors use
    image_mean: tuple[float, float, float] = SIGLIP_MEAN
    image_std: tuple[float, float, float] = SIGLIP_STD
    rescale_factor: float = 1 / 255
    aspect: str = "square"
    shortest_edge: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (from JSON) and store tuples, so the config stays hashable and immutable.
        size = tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 1:
            raise TinyLlavaError(f"preprocess size must be two positive integers (height, width), got {self.size!r}")
        object.__setattr__(self, "size", size)
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise TinyLlavaError(f"preprocess {name} must have 3 values (R, G, B), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if 0.0 in self.image_std:
            raise TinyLlavaError(f"preprocess image_std must not contain 0, got {self.image_std!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise TinyLlavaError(
                f"preprocess resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if self.aspect not in ASPECTS:
            raise TinyLlavaError(f"preprocess aspect must be one of {', '.join(ASPECTS)}, got {self.aspect!r}")
        if self.resample not in PIL_RESAMPLE:
            raise TinyLlavaError(
                f"preprocess resample must be a PIL filter code {dict(PIL_RESAMPLE)}, got {self.resample!r}"
            )
        object.__setattr__(self, "resample", int(self.resample))
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        if self.resize_mode == "shortest_edge_crop":
            edge = min(size) if self.shortest_edge is None else int(self.shortest_edge)
            if edge < 1:
                raise TinyLlavaError(f"preprocess shortest_edge must be positive, got {self.shortest_edge!r}")
            object.__setattr__(self, "shortest_edge", edge)
        elif self.shortest_edge is not None:
            raise TinyLlavaError(
                f"preprocess shortest_edge={self.shortest_edge} only applies to resize_mode 'shortest_edge_crop'"
            )

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """Colour of the ``pad`` border: Factory's ``tuple(int(x * 255) for x in image_mean)``."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    # ---- presets and (de)serialisation ---------------------------------------------------

    @classmethod
    def for_tower(cls, vision_model_type: str, image_size: int, aspect: str = "square") -> "PreprocessConfig":
        """The processor each tower kind was trained with, at the checkpoint's image size.

        `vision_model_type` is the exact `vision_config.model_type`; `aspect` the checkpoint's
        `image_aspect_ratio`. DINOv2 towers get CLIP-style resizing with ImageNet statistics.
        """
        if vision_model_type == "siglip_vision_model":
            return cls.siglip(size=image_size, aspect=aspect)
        if vision_model_type == "clip_vision_model":
            return cls.clip(size=image_size, aspect=aspect)
        if vision_model_type == "dinov2":
            return cls(size=(image_size, image_size), resize_mode="shortest_edge_crop", shortest_edge=image_size,
                       image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, aspect=aspect)
        raise TinyLlavaError(
            f"no image preprocessing known for vision tower {vision_model_type!r}; "
            "known: clip_vision_model, dinov2, siglip_vision_model"
        )

    @classmethod
    def siglip(cls, size: int = 384, aspect: str = "square") -> "PreprocessConfig":
        """``SiglipImageProcessor`` of google/siglip-so400m-patch14-384 (at another ``size`` if given)."""
        return cls(size=(size, size), image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, aspect=aspect)

    @classmethod
    def clip(cls, size: int = 336, aspect: str = "square") -> "PreprocessConfig":
        """``CLIPImageProcessor`` of openai/clip-vit-large-patch14-336 (at another ``size`` if given)."""
        return cls(
            size=(size, size), resize_mode="shortest_edge_crop", shortest_edge=size,
            image_mean=CLIP_MEAN, image_std=CLIP_STD, aspect=aspect,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("size", "image_mean", "image_std"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TinyLlavaError(f"preprocess config has unknown keys {unknown}; known: {sorted(known)}")
        if "size" not in d:
            raise TinyLlavaError("preprocess config has no 'size'")
        return cls(**dict(d))

    @classmethod
    def from_image_processor_config(cls, d: Mapping[str, Any], aspect: str = "square") -> "PreprocessConfig":
        """From a transformers ``preprocessor_config.json`` dict (SigLIP or CLIP processors).

        Missing keys take the defaults of the processor class named by ``image_processor_type``
        (or ``feature_extractor_type``), as transformers does. An integer ``size`` means the
        shortest edge and an integer ``crop_size`` a square, as transformers 5 reads them.
        ``aspect`` is the model's ``image_aspect_ratio`` (it is not part of the processor).
        ``do_convert_rgb`` is not read: images are always made RGB (the towers take 3 channels).
        """
        kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
        defaults = _PROCESSOR_DEFAULTS.get(_processor_family(kind), _GENERIC_DEFAULTS)

        def get(key: str) -> Any:
            if key in d and d[key] is not None:
                return d[key]
            if key in defaults:
                return defaults[key]
            raise TinyLlavaError(
                f"image processor config of type {kind or 'unknown'!r} has no {key!r} and no default for it"
            )

        if not get("do_resize"):
            raise TinyLlavaError("image processor config has do_resize=false; the towers need a fixed input size")
        size = _size_dict(get("size"), "size")
        crop = _size_dict(get("crop_size"), "crop_size") if get("do_center_crop") else None
        if "shortest_edge" in size:
            if crop is None:
                raise TinyLlavaError(
                    f"image processor config resizes the shortest edge to {size['shortest_edge']} without a "
                    "centre crop, which gives images of varying shape; expected do_center_crop with crop_size"
                )
            out = dict(size=(crop["height"], crop["width"]), resize_mode="shortest_edge_crop",
                       shortest_edge=size["shortest_edge"])
        else:
            target = (size["height"], size["width"])
            if crop is not None and (crop["height"], crop["width"]) != target:
                raise TinyLlavaError(
                    f"image processor config resizes to {target} and then crops to "
                    f"{(crop['height'], crop['width'])}; only an equal crop is supported"
                )
            out = dict(size=target, resize_mode="resize")
        normalize = get("do_normalize")
        return cls(
            **out,
            resample=int(get("resample")),
            image_mean=tuple(get("image_mean")) if normalize else (0.0, 0.0, 0.0),
            image_std=tuple(get("image_std")) if normalize else (1.0, 1.0, 1.0),
            rescale_factor=float(get("rescale_factor")) if get("do_rescale") else 1.0,
            aspect=aspect,
        )


# What a config of another processor type may leave out (transformers' usual defaults).
_GENERIC_DEFAULTS = MappingProxyType(
    {"do_resize": True, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}
)
# Class defaults of transformers 5's SiglipImageProcessorPil / CLIPImageProcessorPil.
_PROCESSOR_DEFAULTS = MappingProxyType(
    {
        "SiglipImageProcessor": MappingProxyType(
            {**_GENERIC_DEFAULTS, "resample": 3, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD,
             "size": {"height": 224, "width": 224}}
        ),
        "CLIPImageProcessor": MappingProxyType(
            {**_GENERIC_DEFAULTS, "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
             "size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}
        ),
    }
)


def _processor_family(kind: str) -> str:
    if kind == "CLIPFeatureExtractor":  # the name old CLIP configs (e.g. clip-vit-large-patch14-336) carry
        return "CLIPImageProcessor"
    for suffix in ("Fast", "Pil"):
        kind = kind.removesuffix(suffix)
    return kind


def _size_dict(value: Any, key: str) -> dict[str, int]:
    if isinstance(value, int):
        # transformers 5 (get_size_dict, default_to_square=False for both towers): an int
        # size is the shortest edge; an int crop_size is a square.
        return {"shortest_edge": value} if key == "size" else {"height": value, "width": value}
    if isinstance(value, Mapping):
        if set(value) == {"height", "width"} or set(value) == {"shortest_edge"}:
            return {k: int(v) for k, v in value.items()}
    raise TinyLlavaError(
        f"image processor {key} {value!r} is not supported; expected an int, "
        "{'height': H, 'width': W} or {'shortest_edge': S}"
    )


def expand_to_square(img: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """Factory's ``expand2square``: pad the short side to a square, the image centred (floor).

    A square image is returned as is. A landscape image goes at (0, (w - h) // 2), a portrait one
    at ((h - w) // 2, 0), on a canvas of the image's own mode filled with ``background_rgb``.
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), tuple(background_rgb))
    canvas.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return canvas


# ---- pixels ----------------------------------------------------------------------------------


def preprocess(
    images: ImageInput | Sequence[ImageInput], cfg: PreprocessConfig, exif_transpose: bool = True, *,
    allow_truncated: bool = False,
) -> np.ndarray:
    """``pixel_values`` float32 of shape (B, 3, H, W) for one image or a sequence of them.

    Each image goes through :func:`~tinyllava_edge.data.images.load_image` (``exif_transpose``
    and ``allow_truncated`` are passed on), then the ``pad`` step, resize, crop, rescale and
    normalisation of ``cfg``.
    """
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise TinyLlavaError("preprocess needs at least one image")
    return np.stack([_pixels(load_image(img, exif_transpose, allow_truncated=allow_truncated), cfg)
                     for img in images])


def _pixels(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """(3, H, W) float32 for one RGB image, step for step as transformers' PilBackend."""
    if cfg.aspect == "pad":
        img = expand_to_square(img, cfg.background_rgb)
    if cfg.resize_mode == "resize":
        out_h, out_w = cfg.size
    else:
        out_h, out_w = _shortest_edge_size(img.height, img.width, cfg.shortest_edge)
    # transformers.image_transforms.resize: PIL resize to (w, h), reducing_gap None.
    img = img.resize((out_w, out_h), resample=cfg.resample, reducing_gap=None)
    pixels = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    if cfg.resize_mode == "shortest_edge_crop":
        pixels = _center_crop(pixels, cfg.size)
    # transformers rescale: multiply in float64, then cast to float32; normalize in float32.
    x = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    # transformers.image_transforms.get_resize_output_image_size(default_to_square=False): the
    # short side becomes `edge`, the long side int(edge * long / short), truncated.
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers.image_transforms.center_crop on (H, W, C): floor offsets; zero-pad if too small."""
    height, width = pixels.shape[:2]
    crop_h, crop_w = size
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    # The image is smaller than the crop on some side: centre it on a zero canvas (ceil offset),
    # then cut the crop window from the canvas.
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    top_pad = math.ceil((new_h - height) / 2)
    left_pad = math.ceil((new_w - width) / 2)
    canvas = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top += top_pad
    left += left_pad
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]
