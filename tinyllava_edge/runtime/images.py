"""Images for the runtime: one preprocessing for every backend, and an LRU cache of their embeddings.

An image (a path, a PIL image, or a numpy array (H, W, 3) uint8) goes through the same
``tinyllava_edge.data.preprocess`` code as training, with the config the bundle's manifest (or
the checkpoint) records. The cache key is a hash of the preprocessed pixels: the same picture
given again (another path to the same file, the same array) skips the vision encoder, and
anything that changes what the encoder sees changes the key.
"""

from __future__ import annotations

import abc
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
from tinyllava_edge.errors import TinyLlavaError

DEFAULT_CACHE_SIZE = 32  # images' embeddings kept (a 728 x 896 float32 image is ~2.6 MB)


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # (3, H, W) float32, what the encoder takes
    key: str  # blake2b of the pixels and their shape


def prepare_image(image, config: PreprocessConfig, allow_truncated: bool = False) -> PreparedImage:
    """Preprocess one image (raises TinyLlavaError for a missing or unreadable one, and for a
    truncated one unless `allow_truncated`: tinyllava_edge/data/images.py)."""
    if not isinstance(image, (str, os.PathLike, Image.Image, np.ndarray)):
        raise TinyLlavaError(f"an image must be a path, a PIL image or a numpy array (H, W, 3) uint8, got "
                             f"{type(image).__name__}")
    pixels = preprocess(image, config, allow_truncated=allow_truncated)[0]
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=16)
    digest.update(repr(pixels.shape).encode())
    return PreparedImage(pixels, digest.hexdigest())


class ImageSource(abc.ABC):
    """An image not decoded yet: `decode()` gives it (a PIL image, an array or a path), and
    `source_key` names its encoded bytes (a hash of them), so that a cache finds its embeddings
    without decoding it. Equal keys must mean equal bytes."""

    @property
    @abc.abstractmethod
    def source_key(self) -> str: ...

    @abc.abstractmethod
    def decode(self): ...


class ImageCache:
    """`capacity` embeddings by key, least recently used dropped first (0: no caching); and up to
    `capacity` source keys (:class:`ImageSource`), each naming the key of the pixels it decoded to.

    One cache serves one model (its preprocessing and encoder): VLMs of the same bundle may share it.
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE):
        self.capacity = capacity
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self._sources: OrderedDict[str, str] = OrderedDict()  # source key -> pixel key
        self._lock = threading.Lock()  # threads sharing a VLM encode images before one of them decodes
        self.hits = 0
        self.misses = 0

    def find_source(self, source_key: str) -> tuple[str, np.ndarray] | None:
        """(pixel key, rows) of the image whose bytes `source_key` names, if both are still here
        (a hit); None otherwise (not counted: the caller decodes and looks the pixels up)."""
        with self._lock:
            key = self._sources.get(source_key)
            rows = None if key is None else self._rows.get(key)
            if rows is None:
                return None
            self._sources.move_to_end(source_key)
            self._rows.move_to_end(key)
            self.hits += 1
            return key, rows

    def name_source(self, source_key: str, key: str) -> None:
        """Remember that the bytes `source_key` names decode to the pixels `key` names."""
        if self.capacity <= 0:
            return
        with self._lock:
            _put_bounded(self._sources, source_key, key, self.capacity)

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            rows = self._rows.get(key)
            if rows is None:
                self.misses += 1
                return None
            self._rows.move_to_end(key)
            self.hits += 1
            return rows

    def put(self, key: str, rows: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            _put_bounded(self._rows, key, rows, self.capacity)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._sources.clear()

    def __len__(self) -> int:
        return len(self._rows)


def _put_bounded(entries: OrderedDict, key: str, value, capacity: int) -> None:
    """Set `key` as the most recent entry, dropping the least recent beyond `capacity`."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > capacity:
        entries.popitem(last=False)
