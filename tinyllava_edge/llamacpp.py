"""A small wrapper over llama-cpp-python's low-level API: a GGUF LLM fed tokens *and* image rows.

The high-level `llama_cpp.Llama` only takes token ids; a LLaVA-style model needs the image's
feature rows spliced between text tokens. llama.cpp takes them as an embeddings batch
(`llama_batch_init(n, n_embd, 1)` + `batch.embd` + `llama_decode`, docs/architecture.md), in a batch of its
own: a batch holds either tokens or embeddings, never both.

    with LlamaCppModel("llm-F16.gguf", n_ctx=2048) as llm:
        ids = llm.generate([prompt_ids, image_rows, more_ids], max_new_tokens=32)

A *segment* is a list of token ids or a float32 array (n, n_embd) of input embeddings (what the
vision graph returns for one image). Decoding is greedy: what the export checks compare.

No torch here (docs/architecture.md: the edge runtime runs with numpy and llama-cpp-python alone).

llama.cpp's own log goes through one module-level callback that keeps the last lines in memory
(`recent_log()`) instead of printing them; the callback object stays referenced for the life of
the process (a collected ctypes callback segfaults, docs/architecture.md). Installing it replaces
llama-cpp-python's printing logger process-wide.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from tinyllava_edge.errors import TinyLlavaError

# KV-cache element types by name (ggml_type values, ggml.h). llama.cpp defaults to F16; F32
# makes the cache exact, so a comparison measures the weights file and nothing else; Q8_0 halves
# the cache (blocks of 32 int8 + one f16 scale) and needs flash attention (llama.cpp refuses a
# quantized V cache without it).
KV_TYPES = MappingProxyType({"f16": 1, "f32": 0, "q8_0": 8})
# (elements per block, bytes per block) of each type: Q8_0 is 32 int8 values and one f16 scale.
KV_BLOCKS = MappingProxyType({"f16": (1, 2), "f32": (1, 4), "q8_0": (32, 34)})
QUANTIZED_KV = frozenset({"q8_0"})
# llama_flash_attn_type (llama.h). "auto" lets llama.cpp choose (on where it helps); flash
# attention on the CPU rounds through F16 even with an F32 cache (measured on the Qwen2 miniature,
# F32 file: max |logit diff| 5e-4 with it, 1e-6 without), so exact comparisons turn it off.
FLASH_ATTN = MappingProxyType({"auto": -1, "off": 0, "on": 1})
DEFAULT_N_BATCH = 512
# An LLM file this small decodes a token faster on one thread than on several: its work per token
# is shorter than waking and joining the other threads at every graph node. The default model's
# Q4_K_M (1.8 MB), AMD EPYC 2 cores, idle: 7,810 tok/s on 1 thread against 5,020 on 2. The
# runtime then decodes on one thread and keeps every thread for the prompt's batches.
SMALL_LLM_BYTES = 32 * 2**20
_LOG_LINES_KEPT = 40

_log_lines: deque[str] = deque(maxlen=_LOG_LINES_KEPT)
_log_callback = None  # the ctypes callback; referenced here for the life of the process
_backend_ready = False


def _keep_log(level: int, text: bytes, user_data) -> None:
    _log_lines.append(text.decode("utf-8", "replace"))


def _install_log() -> None:
    """Route llama.cpp's log into `_log_lines` (and init the backend) once per process."""
    global _log_callback, _backend_ready
    import llama_cpp

    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(_keep_log)
    # Set every time: another library (llama-cpp-python's `Llama`, mtmd helpers) may have put its
    # own back since.
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _extra_bufts_safe() -> bool:
    """Whether to let ggml put weights in its extra CPU buffer types (AMX tiles, repacked layouts).

    Measured 2026-11 on this build (llama-cpp-python 0.3.36, native flags) on a Xeon reporting
    amx_int8: decoding any quantized file (Q8_0, Q6_K, Q4_K_M, Q4_0) segfaults inside
    llama_decode unless `use_extra_bufts` is off; F16/F32 files are unaffected. So they are off
    where the CPU reports AMX; TINYLLAVA_LLAMA_EXTRA_BUFTS=1 / 0 forces either way.

    The cause: with -march=native ggml compiles its AMX buffer type, which takes every quantized
    weight; GCC 12.2's `_tile_loadconfig` declares an 8-byte read, so the compiler drops the
    stores of the tile config's rows/colsb and `ldtilecfg` faults (SIGSEGV, si_code 128, in
    ggml_backend_amx_mul_mat; the kernel does grant AMX). A build with
    CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS=..."
    runs with the extra buffer types on (CPU_REPACK only), but gained at most 5-8 % decode on the
    bench-scale model (whose Q4_K_M is mostly q5_0, with no x86 repack), so the default build
    stays and this switch stays off.
    """
    forced = os.environ.get("TINYLLAVA_LLAMA_EXTRA_BUFTS")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "amx_int8" not in f.read()
    except OSError:
        return True


def kv_cache_bytes(n_layer: int, n_head_kv: int, key_length: int, value_length: int, kv_type: str,
                   n_ctx: int) -> int:
    """Bytes of the KV cache llama.cpp allocates for `n_ctx` positions: per layer and position one
    K row of n_head_kv x key_length elements and one V row of n_head_kv x value_length, each
    stored in whole blocks of `kv_type`."""
    if kv_type not in KV_BLOCKS:
        raise TinyLlavaError(f"llama.cpp KV-cache type {kv_type!r} is not supported; expected one of "
                             f"{', '.join(KV_TYPES)}")
    per_block, block_bytes = KV_BLOCKS[kv_type]

    def row(width: int) -> int:
        return -(-width // per_block) * block_bytes

    return n_layer * (row(n_head_kv * key_length) + row(n_head_kv * value_length)) * n_ctx


def recent_log() -> list[str]:
    """The last lines llama.cpp logged through this module (oldest first)."""
    return "".join(_log_lines).splitlines()


def _log_reason() -> str:
    """The most telling recent log line: the last error-looking one, else the last one."""
    lines = [line.strip() for line in recent_log() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in ("error", "failed", "invalid", "unknown", "does not", "cannot")):
            return line
    return lines[-1] if lines else "no log output"


class LlamaCppModel:
    """One GGUF model with one context (one sequence), greedy decoding over token/embedding segments.

    `n_ctx` tokens of context (llama.cpp may round it up; `self.n_ctx` is what it made);
    `n_threads` CPU threads (default: up to 4); `n_gpu_layers` layers offloaded where llama.cpp
    was built with a GPU backend; `kv_type` "f16" (llama.cpp's default), "f32" or "q8_0" (needs
    flash attention: not "off"); `flash_attn` "auto" | "on" | "off" ("off" for exact comparisons);
    `n_threads` can change later (`set_threads`); `decode_threads` caps the threads of one-token
    decodes (the prompt's batches keep `n_threads`; see `SMALL_LLM_BYTES`); `vocab_only` loads the tokenizer alone
    (no context: tokenize/detokenize only); `prefix_cache_bytes` > 0 keeps the KV state of
    prompts up to each image's end (`prefill(..., reuse=True)`, `PrefixStore`).
    Raises TinyLlavaError, with llama.cpp's last log line, for a file llama.cpp refuses.
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, kv_type: str = "f16", flash_attn: str = "auto",
                 n_batch: int = DEFAULT_N_BATCH, vocab_only: bool = False, prefix_cache_bytes: int = 0,
                 decode_threads: int | None = None):
        self._model = None
        self.decode_threads = decode_threads
        self._ctx = None
        # One token batch and one embeddings batch per context, made on first use and kept: a
        # llama_batch_init per decoded token costs n_batch small allocations for nothing.
        self._batches: dict[int, object] = {}
        import llama_cpp

        self._lib = llama_cpp
        self.path = Path(path)
        if kv_type not in KV_TYPES:
            raise TinyLlavaError(f"llama.cpp KV-cache type {kv_type!r} is not supported; expected one of "
                                 f"{', '.join(KV_TYPES)}")
        if flash_attn not in FLASH_ATTN:
            raise TinyLlavaError(f"flash_attn {flash_attn!r} is not one of {', '.join(FLASH_ATTN)}")
        if kv_type in QUANTIZED_KV and flash_attn == "off":
            raise TinyLlavaError(f"a {kv_type} KV cache needs flash attention; use flash_attn 'on' or 'auto', or "
                                 "kv_type 'f16'")
        if not self.path.is_file():
            raise TinyLlavaError(f"GGUF model file {self.path} does not exist")
        _install_log()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        params.use_extra_bufts = _extra_bufts_safe()
        self._model = llama_cpp.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self._model:
            self._model = None
            raise TinyLlavaError(f"llama.cpp cannot load {self.path} ({_log_reason()})")
        if params.use_extra_bufts and not vocab_only and n_gpu_layers == 0:
            # weights repacked at load are a copy: the map's pages they were read from go (those of
            # tensors used in place come back when read; bench: phi2-scale Q4_K_M, 1.0 GiB less)
            from tinyllava_edge.memory import drop_mapped_pages

            drop_mapped_pages(self.path)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.n_past = 0
        self.n_ctx = 0
        self.n_batch = 0
        self.n_threads = 0
        self.kv_type = kv_type
        self.kv_bytes = 0  # what the context's KV cache takes (kv_cache_bytes at n_ctx)
        # What the KV cache holds, one key per position (a token id, or (image digest, row)); kept
        # only by the callers that reuse prefixes (prefill(reuse=True)), reset by clear().
        self._keys: list = []
        self.prefix_store = PrefixStore(prefix_cache_bytes)
        self.last_reused = 0  # positions the last prefill took from the cache instead of decoding
        if vocab_only:
            return
        if kv_type in QUANTIZED_KV:
            self._check_quantized_kv(kv_type)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        self.n_batch = min(n_batch, n_ctx)
        ctx_params.n_batch = ctx_params.n_ubatch = self.n_batch
        ctx_params.n_seq_max = 1
        self.n_threads = n_threads or min(4, os.cpu_count() or 1)
        ctx_params.n_threads, ctx_params.n_threads_batch = self._one_token_threads(self.n_threads), self.n_threads
        ctx_params.type_k = ctx_params.type_v = KV_TYPES[kv_type]
        ctx_params.flash_attn_type = FLASH_ATTN[flash_attn]
        ctx_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            self._ctx = None
            self.close()
            raise TinyLlavaError(f"llama.cpp cannot make a {n_ctx}-token context for {self.path} ({_log_reason()})")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.kv_bytes = self.kv_bytes_per_token(kv_type) * self.n_ctx

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        for batch in self._batches.values():
            self._lib.llama_batch_free(batch)
        self._batches.clear()
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lib", None) is not None:
            self.close()

    def set_threads(self, n_threads: int) -> None:
        """Threads for the next decodes (a one-token decode at most `decode_threads` of them)."""
        if n_threads < 1:
            raise TinyLlavaError(f"n_threads must be at least 1, got {n_threads}")
        if n_threads != self.n_threads:
            self._lib.llama_set_n_threads(self._need_ctx(), self._one_token_threads(n_threads), n_threads)
            self.n_threads = n_threads

    def _one_token_threads(self, n_threads: int) -> int:
        return min(n_threads, self.decode_threads) if self.decode_threads else n_threads

    @property
    def one_token_threads(self) -> int:
        """Threads a one-token decode runs on now."""
        return self._one_token_threads(self.n_threads)

    def _need_ctx(self):
        if self._ctx is None:
            raise TinyLlavaError(f"{self.path} was loaded vocab-only (or closed); it has no context to decode in")
        return self._ctx

    # -- metadata ----------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the file lacks it (vocab-only models too:
        llama.cpp leaves their hparams unset, so `llama_model_n_layer` & co. read 0 or abort)."""
        if self._model is None:
            raise TinyLlavaError(f"{self.path} is closed")
        capacity = 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(capacity)
            n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, capacity)
            if n < 0:
                return None
            if n < capacity:
                return buf.value.decode("utf-8", "replace")
            capacity = n + 1
        raise TinyLlavaError(f"llama.cpp could not read the metadata value {key!r} of {self.path.name}")

    def context_length(self) -> int | None:
        """The context the model was trained for (`<arch>.context_length`)."""
        return self._meta_int("context_length")

    def attention_shape(self) -> tuple[int, int, int, int]:
        """(layers, KV heads, key head size, value head size) from the GGUF metadata."""
        n_layer = self._meta_int("block_count")
        n_head = self._meta_int("attention.head_count")
        n_embd = self._meta_int("embedding_length")
        if not (n_layer and n_head and n_embd):
            raise TinyLlavaError(f"{self.path.name} lacks the layer count, head count or width in its metadata")
        n_head_kv = self._meta_int("attention.head_count_kv") or n_head
        key = self._meta_int("attention.key_length") or n_embd // n_head
        value = self._meta_int("attention.value_length") or key
        return n_layer, n_head_kv, key, value

    def kv_bytes_per_token(self, kv_type: str = "f16") -> int:
        """KV-cache bytes per position: layers x KV heads x (key + value head size) x element size."""
        if kv_type not in KV_TYPES:
            raise TinyLlavaError(f"llama.cpp KV-cache type {kv_type!r} is not supported; expected one of "
                                 f"{', '.join(KV_TYPES)}")
        return kv_cache_bytes(*self.attention_shape(), kv_type, 1)

    def _check_quantized_kv(self, kv_type: str) -> None:
        # llama.cpp quantizes each head's row in whole blocks and refuses a head size that is not a
        # multiple of the block (Phi-2's heads are 80 wide: no q8_0 cache for it)
        _, _, key, value = self.attention_shape()
        block = KV_BLOCKS[kv_type][0]
        if key % block or value % block:
            raise TinyLlavaError(f"a {kv_type} KV cache needs attention heads whose size is a multiple of {block}; "
                                 f"{self.path.name} has heads of {key}; use kv_type 'f16'")

    def _meta_int(self, name: str) -> int | None:
        arch = self.meta("general.architecture")
        value = self.meta(f"{arch}.{name}") if arch else None
        try:
            return int(value) if value is not None else None
        except ValueError:  # a per-layer array: not one number
            return None

    # -- text --------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; `add_special` adds the BOS the vocabulary asks for, `parse_special`
        matches special tokens written in the text (as transformers does)."""
        if self._model is None:
            raise TinyLlavaError(f"{self.path} is closed")
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            buf = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n  # too small: llama.cpp says how many it needs
        raise TinyLlavaError(f"llama.cpp could not tokenize a {len(data)}-byte text")

    def detokenize(self, ids: Sequence[int], remove_special: bool = False, unparse_special: bool = False) -> str:
        """Text of token ids (invalid UTF-8 from a cut multi-byte character becomes U+FFFD)."""
        if self._model is None:
            raise TinyLlavaError(f"{self.path} is closed")
        tokens = (self._lib.llama_token * max(1, len(ids)))(*ids)
        capacity = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(capacity)
            n = self._lib.llama_detokenize(self._vocab, tokens, len(ids), buf, capacity, remove_special,
                                           unparse_special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            capacity = -n
        raise TinyLlavaError(f"llama.cpp could not detokenize {len(ids)} tokens")

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (a piece of a multi-byte character may be cut; streaming
        decoders join them); control tokens give b"" unless `special`."""
        if self._model is None:
            raise TinyLlavaError(f"{self.path} is closed")
        capacity = 32
        for _ in range(2):
            buf = ctypes.create_string_buffer(capacity)
            n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, capacity, 0, special)
            if n >= 0:
                return buf.raw[:n]
            capacity = -n
        raise TinyLlavaError(f"llama.cpp could not render token {token}")

    def is_eog(self, token: int) -> bool:
        """True for a token that ends generation in this vocabulary (EOS, EOT, ...)."""
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # -- decoding ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Empty the KV cache: the next decode starts at position 0."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._need_ctx()), True)
        self.n_past = 0
        self._keys.clear()

    def _truncate(self, n_keep: int) -> None:
        """Drop every cached position from `n_keep` on."""
        if n_keep == 0:
            self.clear()
            return
        memory = self._lib.llama_get_memory(self._need_ctx())
        if not self._lib.llama_memory_seq_rm(memory, 0, n_keep, -1):
            self.clear()  # llama.cpp could not cut this cache (a recurrent model): start over
            return
        self.n_past = n_keep
        del self._keys[n_keep:]

    def decode_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """Append token ids at the current position; returns the last position's logits (n_vocab,)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise TinyLlavaError("decode_tokens needs at least one token id")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise TinyLlavaError(f"token id {bad[0]} is outside the vocabulary of {self.path.name} "
                                 f"(0..{self.n_vocab - 1})")
        logits = self._decode(len(ids), lambda batch, start, n: _fill_tokens(batch, ids[start:start + n]), embd=0)
        self._keys.extend(ids)
        return logits

    def decode_embeddings(self, rows: np.ndarray, keys: list | None = None) -> np.ndarray:
        """Append input-embedding rows (n, n_embd) at the current position; returns the last logits.
        `keys`: the rows' cache keys when the caller has them (prefill), else hashed here."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd or len(rows) == 0:
            raise TinyLlavaError(f"embeddings for {self.path.name} must have shape (n, {self.n_embd}) with n >= 1; "
                                 f"got {rows.shape}")
        logits = self._decode(len(rows), lambda batch, start, n: _fill_embd(batch, rows[start:start + n]),
                              embd=self.n_embd)
        self._keys.extend(_row_keys(rows) if keys is None else keys)
        return logits

    def _decode(self, total: int, fill, embd: int) -> np.ndarray:
        ctx = self._need_ctx()
        if self.n_past + total > self.n_ctx:
            raise TinyLlavaError(f"{self.n_past + total} positions do not fit the {self.n_ctx}-token context of "
                                 f"{self.path.name}")
        batch = self._batches.get(embd)
        if batch is None:
            batch = self._batches[embd] = self._lib.llama_batch_init(self.n_batch, embd, 1)
        for start in range(0, total, self.n_batch):
            n = min(self.n_batch, total - start)
            fill(batch, start, n)
            batch.n_tokens = n
            for i in range(n):
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            last = start + n == total
            batch.logits[n - 1] = 1 if last else 0
            status = self._lib.llama_decode(ctx, batch)
            if status != 0:
                raise TinyLlavaError(f"llama_decode failed with status {status} at position {self.n_past} "
                                     f"({_log_reason()})")
            self.n_past += n
        return self.logits()

    def logits(self) -> np.ndarray:
        """A copy of the logits (n_vocab,) of the last position decoded."""
        ptr = self._lib.llama_get_logits_ith(self._need_ctx(), -1)
        if not ptr:
            raise TinyLlavaError("llama.cpp holds no logits yet; decode something first")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, segments: Iterable, reuse: bool = False) -> np.ndarray:
        """Decode `segments` (token-id lists and (n, n_embd) arrays) from position 0; returns the
        last position's logits.

        Without `reuse` the cache is emptied first. With it, the positions the cache already holds
        for the same prompt prefix are kept (the longest common prefix, as llama.cpp's server does),
        or, when longer, a prefix ending after an image is restored from `prefix_store`; only the
        rest is decoded (`last_reused` says how many positions were not). The last position is
        always decoded, for its logits.
        """
        segments = [s if isinstance(s, np.ndarray) and s.dtype.kind == "f" else [int(i) for i in s]
                    for s in segments if len(s)]
        if not segments:
            raise TinyLlavaError("a prompt needs at least one token or embedding row")
        self.last_reused = 0
        if not reuse:
            self.clear()
            return self._decode_segments(segments, store=False)
        keys, boundaries = _prompt_keys(segments)
        n_keep = _common_prefix(self._keys, keys, len(keys) - 1)
        restored = False
        for end, digest in reversed(boundaries):  # the longest stored image prefix beats a shorter match
            if end <= n_keep or end >= len(keys):
                continue
            state = self.prefix_store.get(digest)
            if state is not None and self._restore(state, keys[:end]):
                n_keep, restored = end, True
                break
        if not restored:
            self._truncate(min(n_keep, len(self._keys)))  # a refused restore has emptied the cache
            n_keep = self.n_past
        self.last_reused = n_keep
        return self._decode_segments(_skip_positions(segments, n_keep), store=self.prefix_store.capacity > 0,
                                     boundaries=dict(boundaries), keys=keys)

    def _decode_segments(self, segments: list, store: bool, boundaries: dict | None = None,
                         keys: list | None = None) -> np.ndarray:
        """Decode segments at the current position; `keys` (the whole prompt's, from position 0)
        spare hashing image rows again, and keep a cut image segment keyed as the whole one."""
        logits = None
        for segment in segments:
            if isinstance(segment, np.ndarray):
                own = None if keys is None else keys[self.n_past:self.n_past + len(segment)]
                logits = self.decode_embeddings(segment, own)
                digest = (boundaries or {}).get(self.n_past)
                if store and digest is not None and digest not in self.prefix_store:
                    state = self._save(self.prefix_store.capacity)
                    if state is not None:
                        self.prefix_store.put(digest, state)
            else:
                logits = self.decode_tokens(segment)
        return logits

    def _save(self, limit: int) -> bytearray | None:
        """The KV state of sequence 0 (what llama_state_seq_set_data takes back), or None when it
        is larger than `limit` bytes (then not copied at all: at Phi-2 dims a prompt's state is
        ~270 MB). llama.cpp writes straight into the returned buffer: no second copy (slicing a
        ctypes array instead would build a list of one int per byte)."""
        ctx = self._need_ctx()
        size = int(self._lib.llama_state_seq_get_size(ctx, 0))
        if size > limit:
            return None
        state = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(state)
        written = int(self._lib.llama_state_seq_get_data(ctx, view, size, 0))
        del view  # releases the export, so the buffer may be cut
        del state[written:]
        return state

    def _restore(self, state: bytearray, keys: list) -> bool:
        """Replace the cache with a saved state of the positions `keys`; False if llama.cpp refuses."""
        ctx = self._need_ctx()
        self.clear()
        buf = (ctypes.c_uint8 * len(state)).from_buffer(state)
        if not int(self._lib.llama_state_seq_set_data(ctx, buf, len(state), 0)):
            self.clear()
            return False
        self.n_past = len(keys)
        self._keys = list(keys)
        return True

    def generate(self, segments: Iterable, max_new_tokens: int, stop_ids: Iterable[int] | None = None,
                 return_logits: bool = False):
        """Greedy continuation of `segments`: up to `max_new_tokens` ids, stopping after a stop id
        (default: the vocabulary's end-of-generation tokens; pass `()` for exactly
        `max_new_tokens`). With `return_logits`, also the prompt's last-position logits."""
        first = logits = self.prefill(segments)
        stops = None if stop_ids is None else {int(i) for i in stop_ids}
        out: list[int] = []
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if (self.is_eog(token) if stops is None else token in stops) or step == max_new_tokens - 1:
                break
            logits = self.decode_tokens([token])
        return (out, first) if return_logits else out


class PrefixStore:
    """KV states of prompt prefixes that end after an image, least recently used dropped first.

    Keyed by a digest of the prefix (its token ids and image rows, `_prompt_keys`); holds at most
    `capacity` bytes (0: nothing). A state is what llama.cpp saves for one sequence: the prefix's
    K and V at the context's cache type (Qwen2-0.5B, F16: ~12 KiB per position).
    """

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._states: OrderedDict[bytes, bytearray] = OrderedDict()
        self.bytes = 0

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._states

    def __len__(self) -> int:
        return len(self._states)

    def get(self, digest: bytes) -> bytearray | None:
        state = self._states.get(digest)
        if state is not None:
            self._states.move_to_end(digest)
        return state

    def put(self, digest: bytes, state: bytearray) -> None:
        if len(state) > self.capacity:
            return
        old = self._states.pop(digest, None)
        self.bytes -= len(old) if old is not None else 0
        self._states[digest] = state
        self.bytes += len(state)
        while self.bytes > self.capacity:
            _, dropped = self._states.popitem(last=False)
            self.bytes -= len(dropped)

    def clear(self) -> None:
        self._states.clear()
        self.bytes = 0


def _row_keys(rows: np.ndarray) -> list:
    digest = hashlib.blake2b(np.ascontiguousarray(rows, np.float32).tobytes(), digest_size=16).digest()
    return [(digest, i) for i in range(len(rows))]


def _prompt_keys(segments: list) -> tuple[list, list[tuple[int, bytes]]]:
    """Per-position keys of a prompt, and (end position, digest of the prompt up to there) after
    each image segment."""
    keys: list = []
    boundaries = []
    running = hashlib.blake2b(digest_size=16)
    for segment in segments:
        if isinstance(segment, np.ndarray):
            row_keys = _row_keys(segment)
            keys.extend(row_keys)
            running.update(b"E" + row_keys[0][0])  # the rows' own digest stands for them
            boundaries.append((len(keys), running.copy().digest()))
        else:
            keys.extend(segment)
            running.update(b"T" + np.asarray(segment, dtype=np.int64).tobytes())
    return keys, boundaries


def _common_prefix(a: Sequence, b: Sequence, limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


def _skip_positions(segments: list, n: int) -> list:
    """`segments` without their first `n` positions."""
    out = []
    for segment in segments:
        if n >= len(segment):
            n -= len(segment)
            continue
        out.append(segment[n:])
        n = 0
    return out


def _fill_tokens(batch, ids: Sequence[int]) -> None:
    for i, token in enumerate(ids):
        batch.token[i] = token


def _fill_embd(batch, rows: np.ndarray) -> None:
    # batch.embd holds n_batch * n_embd floats, row-major like `rows`
    ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)


def split_segments(input_ids: Sequence[int], images: Sequence[np.ndarray], image_token: int = -200) -> list:
    """Prompt ids with `image_token` placeholders -> segments, the i-th placeholder taking images[i]."""
    segments: list = []
    text: list[int] = []
    used = 0
    for token in input_ids:
        if token != image_token:
            text.append(int(token))
            continue
        if used == len(images):
            raise TinyLlavaError(f"the prompt has more image placeholders than the {len(images)} images given")
        if text:
            segments.append(text)
            text = []
        segments.append(np.asarray(images[used], dtype=np.float32))
        used += 1
    if used != len(images):
        raise TinyLlavaError(f"the prompt has {used} image placeholders for {len(images)} images")
    if text:
        segments.append(text)
    return segments


class LlamaCppTokenizer:
    """What `Template.encode` needs of a tokenizer, from llama.cpp (the edge runtime's and the export checks').

    `reference` (the transformers tokenizer) only lends the pad id and `legacy` flag, which
    eval-mode encoding does not read.
    """

    def __init__(self, llm: "LlamaCppModel", reference=None):
        self.llm = llm
        self.bos_token_id = llm.bos_id if llm.add_bos else None
        self.eos_token_id = llm.eos_id
        self.pad_token_id = getattr(reference, "pad_token_id", None)
        self.model_max_length = getattr(reference, "model_max_length", 1 << 30)

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.llm.tokenize(text, add_special=True, parse_special=True)}

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text, add_special=True, parse_special=True)
