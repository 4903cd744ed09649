"""Checking an uploaded image before it reaches the model: one sentence for anything unusable.

The runtime's preprocessing loads truncated files on purpose (TinyLLaVA_Factory does), which is
right for a training set but not for a user's upload: here a truncated file is refused, so the
user learns the upload broke instead of getting an answer about a half-grey picture.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tinyllava_edge.data.preprocess import load_image
from tinyllava_edge.errors import TinyLlavaError

MAX_SIDE = 8192  # px; the towers take 48-384 px, anything larger only costs decode time and memory
MAX_PIXELS = 40_000_000


def upload_path(payload) -> Path | None:
    """The file of an image component's value (a FileData dict, a path, or None)."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        path = payload.get("path")
        return Path(path) if path else None
    if isinstance(payload, (str, os.PathLike)):
        return Path(payload)
    raise TinyLlavaError(f"the image came as a {type(payload).__name__}; expected an uploaded file")


def open_upload(path: Path, name: str | None = None) -> Image.Image:
    """The RGB image in `path`, fully decoded; TinyLlavaError naming the file and the problem otherwise."""
    name = name or path.name
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
                raise TinyLlavaError(f"image {name} is {width}x{height} pixels; the demo takes images up to "
                                     f"{MAX_SIDE} px a side and {MAX_PIXELS // 1_000_000} megapixels")
            image.load()  # decodes every byte: a truncated file raises here
            return load_image(image)  # RGB the runtime's way: EXIF rotation, 16-bit grey scaled
    except Image.DecompressionBombError:
        raise TinyLlavaError(f"image {name} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; the demo "
                             f"takes images up to {MAX_SIDE} px a side") from None
    except UnidentifiedImageError:
        raise TinyLlavaError(f"{name} is not an image PIL can read (PNG, JPEG, WebP, GIF, BMP...)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's words for a damaged file
        reason = " ".join(str(err).split()) or type(err).__name__
        raise TinyLlavaError(f"image {name} could not be decoded ({reason}); the file may be truncated or "
                             "damaged") from None


def file_digest(path: Path) -> str:
    """Identifies an upload, so the same picture is not sent to the model twice in one conversation."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
