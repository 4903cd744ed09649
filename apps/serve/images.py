"""Images in a chat request: which URLs the server takes, and the caps on what they decode to.

* ``data:image/...;base64,...``: always. The base64 text is measured before it is decoded, so a
  payload over ``max_image_bytes`` is refused without allocating it (413).
* ``http://`` and ``https://``: never. The server fetches nothing from the network (no SSRF, no
  waiting on someone else's host); the message says to send the image inline.
* ``file://``: only with ``--allow-files DIR``, and only for files below DIR once symlinks and
  ``..`` are resolved.

A request keeps its images encoded (:class:`RequestImage`) while it waits for a worker, so the
queue holds at most its bodies' bytes. A RequestImage is a runtime ImageSource named by the hash
of its bytes: an image the workers' shared cache has seen (a follow-up sends the conversation's
image again) goes to its embeddings without being decoded. Otherwise the worker decodes it
(:meth:`RequestImage.decode`) the demo's way (:func:`tinyllava_edge.apps.uploads.open_image`):
the declared size is checked against ``max_image_pixels`` before any pixel is decoded (a PNG
bomb declares its size in its header), the image is decoded fully (a truncated one is refused
unless the server was started with --allow-truncated-images, as everywhere:
tinyllava_edge/data/images.py) and converted to RGB the runtime's way. A problem found there
is still answered before the first token: 413 over a cap, 400 otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from tinyllava_edge.apps.serve.errors import ApiError, bad_request
from tinyllava_edge.apps.uploads import MAX_SIDE, ImageTooLarge, open_image
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.runtime.images import ImageSource

TAKER = "the server"
_DATA_URI = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(;[^,;]*)*?),(?P<data>.*)", re.DOTALL)
_WHITESPACE = re.compile(rb"[ \t\r\n]+")


@dataclass(frozen=True)
class ImagePolicy:
    """The caps (bytes of one encoded image, pixels of one decoded image) and the folder that
    ``file://`` URLs may read from (None: file URLs refused)."""

    max_image_bytes: int
    max_image_pixels: int
    allow_files: Path | None = None
    allow_truncated: bool = False  # decode a truncated image instead of refusing it (data/images.py)


@dataclass(frozen=True)
class RequestImage(ImageSource):
    data: bytes  # the image file as sent
    param: str  # the request field it came in, for messages
    policy: ImagePolicy
    digest: str  # of `data`: which requests show the same picture (worker affinity, the image cache)

    @property
    def source_key(self) -> str:
        return self.digest

    def decode(self) -> Image.Image:
        """The RGB image, fully decoded; ApiError 413 over the pixel caps, 400 for anything unusable."""
        try:
            return open_image(io.BytesIO(self.data), self.param, max_side=MAX_SIDE,
                              max_pixels=self.policy.max_image_pixels, taker=TAKER,
                              allow_truncated=self.policy.allow_truncated)
        except ImageTooLarge as err:
            raise ApiError(413, str(err), param=self.param, code="image_too_large") from None
        except TinyLlavaError as err:
            raise bad_request(str(err), self.param, "invalid_image") from None


def load_request_image(url: str, policy: ImagePolicy, param: str) -> RequestImage:
    """The image an ``image_url`` names, still encoded, or an ApiError about `param` (the request field)."""
    if not isinstance(url, str) or not url:
        raise bad_request("an image_url needs a non-empty 'url' string (a data: URI)", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_uri_bytes(url, policy, param)
    elif scheme in ("http", "https"):
        raise bad_request(f"{scheme}:// image URLs are refused: the server fetches nothing from the network; send "
                          "the image inline as a data: URI (data:image/png;base64,...)", param,
                          "image_url_not_allowed")
    elif scheme == "file":
        data = _allowed_file(url, policy, param).read_bytes()
    else:
        shown = url if len(url) <= 40 else url[:40] + "..."
        raise bad_request(f"image URL {shown!r} is not a data: URI; the server takes images inline as "
                          "data:image/...;base64,...", param, "invalid_image_url")
    return RequestImage(data, param, policy, hashlib.blake2b(data, digest_size=16).hexdigest())


def _data_uri_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    match = _DATA_URI.fullmatch(url)
    if match is None:
        raise bad_request("the data: URI has no ',' before its data; expected data:image/...;base64,...", param,
                          "invalid_image_url")
    media_type = match["type"].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise bad_request(f"the data: URI says {media_type!r}; expected an image (data:image/...;base64,...)", param,
                          "invalid_image")
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise bad_request("the data: URI is not base64; expected data:image/...;base64,...", param,
                          "invalid_image_url")
    text = _WHITESPACE.sub(b"", match["data"].encode("ascii", "replace"))
    if len(text) // 4 * 3 > policy.max_image_bytes:  # base64 carries 3 bytes in 4 characters
        raise ApiError(413, f"the image is about {len(text) // 4 * 3} bytes; the server takes images up to "
                            f"{policy.max_image_bytes} bytes", param=param, code="image_too_large")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data: URI's base64 is invalid (characters outside A-Z a-z 0-9 + / = or a wrong "
                          "length)", param, "invalid_image") from None


def _allowed_file(url: str, policy: ImagePolicy, param: str) -> Path:
    if policy.allow_files is None:
        raise bad_request("file:// image URLs are refused; start the server with --allow-files DIR to read images "
                          "below DIR, or send the image as a data: URI", param, "image_url_not_allowed")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"file:// URL names host {parsed.netloc!r}; only local files (file:///path) are read", param,
                          "image_url_not_allowed")
    root = policy.allow_files.resolve()
    path = Path(unquote(parsed.path)).resolve()  # symlinks and .. resolved before the check
    if not path.is_relative_to(root):
        raise bad_request(f"file {path} is outside the folder the server may read images from", param,
                          "image_url_not_allowed")
    if not path.is_file():
        raise bad_request(f"image file {path} does not exist", param, "invalid_image")
    if path.stat().st_size > policy.max_image_bytes:
        raise ApiError(413, f"image file {path.name} is {path.stat().st_size} bytes; the server takes images up to "
                            f"{policy.max_image_bytes} bytes", param=param, code="image_too_large")
    return path
