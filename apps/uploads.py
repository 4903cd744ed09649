"""Checking an uploaded image before it reaches the model: one sentence for anything unusable.

The demo's uploads and the server's images (apps/serve/images.py) go through :func:`open_image`:
the picture's declared size is checked against the caller's caps from the header, before any
pixel is decoded; the file is then read by :func:`tinyllava_edge.data.images.load_image`, so an
upload gets the same answer as the same file given to tinyllava-chat or the Python API: a
truncated one is refused unless the demo or the server was started with --allow-truncated-images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from tinyllava_edge.data.images import load_image
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


def open_upload(path: Path, name: str | None = None, allow_truncated: bool = False) -> Image.Image:
    """The RGB image in `path`, fully decoded; TinyLlavaError naming the file and the problem otherwise."""
    return open_image(path, name or path.name, allow_truncated=allow_truncated)


def open_image(source: Path | BinaryIO, name: str, *, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
               taker: str = "the demo", allow_truncated: bool = False) -> Image.Image:
    """The RGB image in `source` (a path or a binary file), fully decoded, if it keeps within
    `max_side` and `max_pixels` (ImageTooLarge otherwise, before any pixel is decoded); `taker`
    names who refuses it ("the demo", "the server"). A truncated file is refused unless
    `allow_truncated` (tinyllava_edge/data/images.py)."""
    try:
        with Image.open(source) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"image {name} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; {taker} "
                            f"takes images up to {max_side} px a side") from None
    except (OSError, SyntaxError, ValueError):  # not an image at all: load_image says so, as everywhere
        width = height = 0
    if max(width, height) > max_side or width * height > max_pixels:
        raise ImageTooLarge(f"image {name} is {width}x{height} pixels; {taker} takes images up to {max_side} "
                            f"px a side and {max_pixels / 1e6:g} megapixels")
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)
    return load_image(source, allow_truncated=allow_truncated, name=name)  # EXIF rotation, 16-bit grey scaled


def file_digest(path: Path) -> str:
    """Identifies an upload, so the same picture is not sent to the model twice in one conversation."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
