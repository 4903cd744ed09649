"""The server's Prometheus metrics (GET /metrics), in a registry of its own per app.

A registry per app rather than prometheus_client's global one: tests and benchmarks build several
apps in one process, and each must count only its own requests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tinyllava_edge.runtime.stats import GenerationStats

# Paths counted by name; anything else is "other", so a scanner cannot grow the label set.
KNOWN_PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKENS_PER_S = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tinyllava_http_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.queue_depth = Gauge("tinyllava_queue_depth", "requests waiting for a worker", registry=r)
        self.workers_busy = Gauge("tinyllava_workers_busy", "workers answering a request now", registry=r)
        self.workers = Gauge("tinyllava_workers", "workers loaded", registry=r)
        self.ttft = Histogram("tinyllava_time_to_first_token_seconds",
                              "from the request's arrival to its first token (queueing included)", buckets=_SECONDS,
                              registry=r)
        self.latency = Histogram("tinyllava_request_seconds", "from a completion request's arrival to its last token",
                                 buckets=_SECONDS, registry=r)
        self.decode_rate = Histogram("tinyllava_decode_tokens_per_second", "decode speed of each answer",
                                     buckets=_TOKENS_PER_S, registry=r)
        self.prompt_tokens = Counter("tinyllava_prompt_tokens", "prompt positions (image rows included)", registry=r)
        self.prefill_tokens = Counter("tinyllava_prefill_tokens", "prompt positions evaluated", registry=r)
        self.cached_tokens = Counter("tinyllava_prefix_cached_tokens",
                                     "prompt positions taken from the KV cache or the prefix store", registry=r)
        self.prefix_hits = Counter("tinyllava_prefix_cache_hits", "requests that reused a cached KV prefix",
                                   registry=r)
        self.image_cache_hits = Counter("tinyllava_image_cache_hits", "images whose embeddings came from the cache",
                                        registry=r)
        self.completion_tokens = Counter("tinyllava_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("tinyllava_cancelled_requests",
                                 "requests stopped because their client went away", registry=r)
        self.rejected = Counter("tinyllava_rejected_requests", "requests refused with 429: queue full", registry=r)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in KNOWN_PATHS else "other", str(status)).inc()

    def record(self, stats: GenerationStats, prompt_tokens: int, latency_s: float) -> None:
        """One answered (or cancelled) generation."""
        if stats.decode_tokens:
            self.ttft.observe(stats.ttft_ms / 1e3)
        self.latency.observe(latency_s)
        if stats.decode_tokens_per_s is not None:
            self.decode_rate.observe(stats.decode_tokens_per_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.prefill_tokens.inc(stats.prefill_tokens)
        self.cached_tokens.inc(stats.prefix_reused)
        if stats.prefix_reused:
            self.prefix_hits.inc()
        self.image_cache_hits.inc(stats.image_cache_hits)
        self.completion_tokens.inc(stats.decode_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
