"""What one generation cost: image encoding, time to first token, prefill and decode speed, memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tinyllava_edge.memory import peak_rss_bytes  # noqa: F401 (the runtime's callers import it from here)


@dataclass
class GenerationStats:
    """Times in milliseconds, speeds in tokens (KV positions) per second.

    `image_encode_ms` covers preprocessing and the vision encoder (0 when every image came from
    the cache; in `generate_batch` a batch's time is shared out over its images);
    `ttft_ms` runs from the call to the first token chosen (encode + prefill + first sample);
    `prefill_tokens` counts the positions evaluated before the first token (image rows included;
    in a chat turn only the new ones; not those `prefix_reused` took from the KV cache, the
    edge backend's prefix reuse); `decode_tokens` the tokens generated, whose speed is
    measured from the first token to the last; `peak_rss_mb` is the process's peak so far.
    `finish_reason`: "stop" (EOS or a stop string), "length" (max_new_tokens), "context" (the
    KV cache is full) or "cancelled" (a stream closed early).
    """

    image_encode_ms: float = 0.0
    images: int = 0
    image_cache_hits: int = 0
    prefill_tokens: int = 0
    prefix_reused: int = 0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    context_used: int = 0
    n_ctx: int = 0
    peak_rss_mb: float = 0.0
    finish_reason: str = ""

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prefill_tokens / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        # the first token comes with the prefill; speed counts the ones after it
        return (self.decode_tokens - 1) / (self.decode_ms / 1e3) if self.decode_tokens > 1 and self.decode_ms > 0 \
            else None

    def as_dict(self) -> dict:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}

    def line(self) -> str:
        """One human line, e.g. for the chat command."""
        def speed(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        image = (f"image {self.image_encode_ms:.0f} ms" + (" (cached)" if self.image_cache_hits else "")
                 if self.images else "no image")
        return (f"[{image} | TTFT {self.ttft_ms:.0f} ms | prefill {self.prefill_tokens} tok "
                f"{speed(self.prefill_tokens_per_s)} tok/s"
                + (f" (+{self.prefix_reused} cached)" if self.prefix_reused else "")
                + f" | decode {self.decode_tokens} tok "
                f"{speed(self.decode_tokens_per_s)} tok/s | context {self.context_used}/{self.n_ctx} | "
                f"peak RSS {self.peak_rss_mb:.0f} MiB | {self.finish_reason}]")
