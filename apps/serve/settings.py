"""What a server is started with: one dataclass, the defaults in one place (the CLI reads them here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"  # this machine only, unless --host says otherwise
DEFAULT_PORT = 8000
DEFAULT_WORKERS = 1  # one runtime instance (model + KV cache); on a CPU more workers share the cores
DEFAULT_QUEUE = 32  # requests waiting for a worker before 429
DEFAULT_MAX_BODY_MB = 20.0
DEFAULT_MAX_IMAGE_MB = 10.0  # the demo's upload cap too
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # a 12-16 MP phone photo passes; the towers take <= 384 px anyway
DEFAULT_STREAM_INTERVAL_MS = 10.0  # least time between two chunks of a stream (faster tokens are joined)
DEFAULT_MAX_TOKENS = 256  # answer length when a request does not say (the runtime's default), capped by the context
API_KEY_ENV = "TINYLLAVA_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    model: Path  # a bundle or a checkpoint directory
    served_model_name: str
    device: str = "auto"
    workers: int = DEFAULT_WORKERS
    queue: int = DEFAULT_QUEUE
    api_key: str | None = None
    allow_files: Path | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    max_image_bytes: int = int(DEFAULT_MAX_IMAGE_MB * 2**20)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    stream_interval_s: float = DEFAULT_STREAM_INTERVAL_MS / 1e3
    threads: int | None = None  # CPU threads per worker; None: the physical cores shared out among the workers
    allow_truncated_images: bool = False  # decode truncated images instead of refusing them (data/images.py)
    load_options: dict = field(default_factory=dict)  # more options for tinyllava_edge.load
