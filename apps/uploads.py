"""Checking an uploaded image before it reaches the model: one sentence for anything unusable.

The demo's uploads and the server's images (apps/serve/images.py) go through :func:`open_image`.

The runtime's preprocessing loads truncated files on purpose (TinyLLaVA_Factory does), which is
right for a training set but not for a user's upload: here a truncated file is refused, so the
user learns the upload broke instead of getting an answer about a half-grey picture.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

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


class ImageTooLarge(TinyLlavaError):
    """An image over the pixel caps (the server answers it with 413, other problems with 400)."""


def open_upload(path: Path, name: str | None = None) -> Image.Image:
    """The RGB image in `path`, fully decoded; TinyLlavaError naming the file and the problem otherwise."""
    return open_image(path, name or path.name)


def open_image(source: Path | BinaryIO, name: str, *, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
               taker: str = "the demo") -> Image.Image:
    """The RGB image in `source` (a path or a binary file), fully decoded, if it keeps within
    `max_side` and `max_pixels` (ImageTooLarge otherwise, before any pixel is decoded); `taker`
    names who refuses it ("the demo", "the server")."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max(width, height) > max_side or width * height > max_pixels:
                raise ImageTooLarge(f"image {name} is {width}x{height} pixels; {taker} takes images up to {max_side} "
                                    f"px a side and {max_pixels / 1e6:g} megapixels")
            image.load()  # decodes every byte: a truncated file raises here
            return load_image(image)  # RGB the runtime's way: EXIF rotation, 16-bit grey scaled
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"image {name} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; {taker} "
                            f"takes images up to {max_side} px a side") from None
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
