"""Reading an image: one implementation, one policy for every entry point.

``tinyllava-chat``, ``tinyllava-eval``, the demo, the HTTP server and the Python API
(``tinyllava_edge.load(...).generate / stream / chat``) all read images through
:func:`load_image`, so the same file gets the same answer everywhere:

* a file that is not an image, or is damaged beyond decoding, is refused with one sentence that
  names it;
* a **truncated** file (its data ends before the picture does: an interrupted download or copy)
  is refused too, unless the caller allows it explicitly: ``allow_truncated=True`` here,
  ``allow_truncated_images=True`` for ``tinyllava_edge.load``, ``--allow-truncated-images`` on the
  command line. Allowed, it is decoded as far as its data goes and the rest is left blank (PIL
  fills it: grey in a JPEG, black in a PNG): an answer about half a picture, which a user should
  ask for rather than get silently.

Training (``train/data.py``) and GPTQ calibration read their data sets permissively, on purpose:
TinyLLaVA_Factory sets ``ImageFile.LOAD_TRUNCATED_IMAGES`` for its whole training process, and a
few damaged files in a large scraped set should not stop a long run.

RGB conversion follows Factory (``convert("RGB")``: alpha dropped, palette expanded, CMYK
converted), plus EXIF orientation (on request of this project) and 16-bit grey scaled to 8 bits.
No torch here: the edge runtime reads images with numpy and pillow alone.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tinyllava_edge.errors import TinyLlavaError

ImageInput = Union[str, "os.PathLike[str]", BinaryIO, Image.Image, np.ndarray]

# The option's names and what it does, for every entry point's help (one source).
ALLOW_TRUNCATED_KEYWORD = "allow_truncated_images"
ALLOW_TRUNCATED_OPTION = "--allow-truncated-images"
ALLOW_TRUNCATED_HELP = ("decode a truncated image file as far as its data goes, leaving the rest blank (grey in a "
                        "JPEG, black in a PNG), instead of refusing it")

# PIL decides whether to accept a truncated file from a module global (ImageFile.LOAD_TRUNCATED_IMAGES),
# not per image. Every decode here holds this lock, so a permissive decode in one thread never lets
# a strict one in another accept a truncated file.
_DECODE_LOCK = threading.Lock()

_NOT_AN_IMAGE = "not a format PIL reads (PNG, JPEG, WebP, GIF, BMP, TIFF...)"


def load_image(image: ImageInput, exif_transpose: bool = True, *, allow_truncated: bool = False,
               name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, a binary file (the server's request bodies), a PIL image or a
    uint8 array (H, W), (H, W, 3) or (H, W, 4).

    Other modes become RGB with PIL's ``convert("RGB")``, as Factory's loaders do. EXIF
    orientation is applied unless ``exif_transpose`` is False. A truncated file is refused unless
    ``allow_truncated``; unreadable ones always are (:class:`TinyLlavaError`). ``name`` is what
    messages call the image (default: its path).
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        img = _decode(lambda: _read(path), name or path, allow_truncated)
    elif hasattr(image, "read") and hasattr(image, "seek"):
        img = _decode(lambda: _read(image), name or "the image", allow_truncated)
    elif isinstance(image, Image.Image):
        # A lazily opened file is decoded here, under the same policy as a path.
        img = _decode(lambda: _loaded(image), name or getattr(image, "filename", "") or "the image",
                      allow_truncated)
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    else:
        raise TinyLlavaError(
            f"an image must be a path, a PIL image or a numpy array, got {type(image).__name__}"
        )
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_GREY:
        img = _grey_to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(read, name: str, allow_truncated: bool) -> Image.Image:
    """`read()` strictly; a file that only decodes leniently is truncated: refused unless allowed."""
    with _DECODE_LOCK:
        try:
            return read()
        except FileNotFoundError:
            raise TinyLlavaError(f"image file {name!r} does not exist") from None
        except UnidentifiedImageError:
            raise TinyLlavaError(f"image file {name!r} cannot be read as an image: {_NOT_AN_IMAGE}") from None
        except (ValueError, Image.DecompressionBombError) as err:
            raise TinyLlavaError(f"image file {name!r} cannot be read as an image ({err})") from None
        except (OSError, SyntaxError) as err:  # PIL's words for a truncated file, and for some damaged ones
            strict_error = err
        try:
            with _lenient():
                image = read()
        except (OSError, SyntaxError, ValueError) as err:
            raise TinyLlavaError(f"image file {name!r} cannot be read as an image ({_reason(err)})") from None
    if not allow_truncated:
        raise TinyLlavaError(f"image file {name!r} is truncated ({_reason(strict_error)}); pass "
                             f"{ALLOW_TRUNCATED_KEYWORD}=True ({ALLOW_TRUNCATED_OPTION}) to decode what it holds, "
                             "leaving the rest blank")
    return image


@contextmanager
def _lenient():
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read(source) -> Image.Image:
    if not isinstance(source, str):
        source.seek(0)  # a binary file is read again for the lenient retry
    with Image.open(source) as img:
        img.load()
        return img.copy()  # detached from the file; keeps `info` (EXIF) for exif_transpose


def _loaded(img: Image.Image) -> Image.Image:
    img.load()  # no-op for a decoded image
    return img


# 16-bit greyscale (PNG/TIFF) opens as one of these; PIL's convert("RGB") clips every value above
# 255 to white instead of scaling, so a 16-bit picture came out blank (Factory's loader too).
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)  # (H, W)
    if img.mode == "I" and values.max(initial=0) <= 255:
        return Image.fromarray(values.astype(np.uint8))  # 32-bit storage of 8-bit values
    return Image.fromarray((values >> 8).astype(np.uint8))


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise TinyLlavaError(f"an image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(arr))  # uint8: L, RGB or RGBA by shape
    raise TinyLlavaError(
        f"an image array must have shape (H, W), (H, W, 3) or (H, W, 4) (channels last), got {arr.shape}"
    )
