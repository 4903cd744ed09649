"""`EdgeBackend`: a bundle run with onnxruntime (vision + connector) and llama.cpp (the LLM).

Reads the bundle through :func:`tinyllava_edge.bundle.read_manifest` (which refuses a
changed, incomplete or self-contradicting bundle), then:

* the image: the manifest's preprocessing, the bundle's ``vision.onnx`` (``pixel_values`` ->
  ``image_embeds``) on the plan's providers, rows times ``image_features_scale`` x
  ``embd_input_scale`` (the llm file record: what the model's own embedding scale and llama.cpp's
  input-embedding path need, measured at export);
* the text: the manifest's chat template, tokenized by llama.cpp itself (parity with
  transformers is checked at export), decoded by :class:`~tinyllava_edge.llamacpp.LlamaCppModel`
  with the image rows injected as an embeddings batch.

Imports numpy, onnxruntime and llama-cpp-python only: no torch.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyllava_edge.bundle import files_by_role, read_manifest
from tinyllava_edge.data.preprocess import PreprocessConfig
from tinyllava_edge.data.template import Template, get_template
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.hub import model_name
from tinyllava_edge.llamacpp import (
    FLASH_ATTN,
    KV_TYPES,
    QUANTIZED_KV,
    SMALL_LLM_BYTES,
    LlamaCppModel,
    LlamaCppTokenizer,
)
from tinyllava_edge.runtime.backend import check_options, check_segments, stop_token_ids
from tinyllava_edge.runtime.devices import TENSORRT_EP, detect, plan_device
from tinyllava_edge.runtime.threads import FreeCores

OPTIONS = ("n_threads", "n_ctx", "n_gpu_layers", "kv_type", "flash_attn", "vision", "check_hashes", "template",
           "prefix_cache_mb", "probes")
# KV states of prompts up to an image's end kept for reuse (llamacpp.PrefixStore): at Qwen2-0.5B
# dims an image prompt's state is ~9 MiB, so this holds a dozen images.
DEFAULT_PREFIX_CACHE_MB = 128
# onnxruntime's session option: whether idle pool threads spin ("1", its default) or block ("0")
ORT_SPINNING = "session.intra_op.allow_spinning"
# The least room a context must leave beyond one image's rows: a short question and answer.
_PROMPT_ROOM = 64


class _ContinuationTokenizer:
    """llama.cpp's tokenizer for a later chat turn: no BOS added (the cache already starts with one)."""

    bos_token_id = None

    def __init__(self, llm: LlamaCppModel):
        self.llm = llm
        self.eos_token_id = llm.eos_id
        self.pad_token_id = None
        self.model_max_length = 1 << 30

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text, add_special=False, parse_special=True)


class _PieceDetokenizer:
    def __init__(self, llm: LlamaCppModel):
        self.llm = llm

    def push(self, token: int) -> bytes:
        return self.llm.token_to_piece(token, special=False)

    def flush(self) -> bytes:
        return b""  # every byte was given out; TextStream's UTF-8 decoder holds cut characters


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types (Fail, InvalidProtobuf, ...: pybind classes deriving from
    Exception directly) and the builtin ones it also raises."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (RuntimeError, ValueError, OSError, *own)


def release_freed_memory() -> None:
    """Hand memory freed inside the process back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    onnxruntime parses the whole vision graph (protobuf) before it copies the weights out and frees
    it; glibc keeps those freed pages in its heaps, and in about half the loads (measured on the
    bench-scale bundle, fp32 SigLIP-so400m graph of 1.6 GB) the process stayed ~960 MB larger after
    load (3.03 vs 2.07 GB resident) until something reused them. Trimming once after the session
    is made costs milliseconds.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


def _tensorrt_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "tinyllava-edge", "tensorrt")
    os.makedirs(path, exist_ok=True)
    return path


class EdgeBackend:
    """A bundle directory on `device` ("auto" | "cpu" | "cuda" | "jetson").

    Options: `n_threads`, `n_ctx`, `n_gpu_layers` (default: the device plan's, see
    runtime/devices.py; without `n_threads` the LLM runs on the plan's threads less the cores
    other processes keep busy, looked at before each prompt and every second of decoding:
    runtime/threads.py); `kv_type` "f16" (default) | "f32" | "q8_0" (half the cache, with flash
    attention); `flash_attn` "auto" | "on" | "off" (default: "off" on the CPU with an f16/f32
    cache, "auto" on GPUs and with q8_0; "f32" + "off" make llama.cpp match PyTorch as closely
    as it can); `vision` the quant of
    the vision graph to run (default: the manifest's `vision_default`, which
    quantized bundles set, else "fp32"; "fp16", "int8", "int4" where the bundle has them); `check_hashes`
    (default True: every file's sha256 against the manifest); `template` a chat template name
    instead of the manifest's; `prefix_cache_mb` (default 128; 0 turns prefix reuse off) the
    memory for KV states of prompt prefixes: a new prompt keeps what the cache already holds of
    its prefix, or gets the state saved after the same system prompt + image, and decodes only the
    rest (a second question on an image skips the image rows' prefill); `probes` (tests:
    simulated hardware).
    """

    kind = "edge"

    def __init__(self, path: str | os.PathLike, device: str = "auto", **options):
        check_options(self.kind, options, OPTIONS)
        import onnxruntime as ort

        self.path = Path(path)
        self.model_id = model_name(self.path)  # a Hub snapshot is called by its repository id
        self.manifest = read_manifest(self.path, check_hashes=options.get("check_hashes", True))
        kv_type = options.get("kv_type", "f16")
        if kv_type not in KV_TYPES:
            raise TinyLlavaError(f"kv_type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
        flash_attn = options.get("flash_attn")  # default: per device, below
        if flash_attn is not None and flash_attn not in FLASH_ATTN:
            raise TinyLlavaError(f"flash_attn {flash_attn!r} is not one of {', '.join(FLASH_ATTN)}")
        llm_files = files_by_role(self.manifest, "llm")
        if not llm_files:
            raise TinyLlavaError(f"bundle {self.path} has no LLM GGUF (an onnx-format bundle); the runtime needs a "
                                 "bundle exported with --format gguf")
        llm_file = llm_files[0]
        vision_file = self._vision_file(options.get("vision") or self.manifest.get("vision_default", "fp32"))
        model = self.manifest["model"]
        self.preprocess = PreprocessConfig.from_dict(self.manifest["preprocess"])
        self.template = (get_template(options["template"]) if options.get("template")
                         else Template.from_dict(self.manifest["template"]))
        self.image_tokens = int(vision_file["n_tokens"])
        self.row_scale = float(llm_file.get("image_features_scale", 1.0)) * float(llm_file.get("embd_input_scale", 1.0))

        llm_path = self.path / llm_file["name"]
        with LlamaCppModel(llm_path, vocab_only=True) as shapes:  # sizes the context before making one
            kv_per_token = shapes.kv_bytes_per_token(kv_type)
            trained = shapes.context_length() or int(model.get("max_length") or 2048)
        # the LLM's own context, and no more than the sequence length the VLM was trained with
        max_context = min(trained, int(model.get("max_length") or trained))
        prefix_mb = options.get("prefix_cache_mb", DEFAULT_PREFIX_CACHE_MB)
        if isinstance(prefix_mb, bool) or not isinstance(prefix_mb, (int, float)) or prefix_mb < 0:
            raise TinyLlavaError(f"prefix_cache_mb must be a number >= 0 (0: no prefix reuse), got {prefix_mb!r}")
        # what stays resident besides the KV cache: both files (mapped, read whole) and the prefix store
        weights = llm_file["size"] + vision_file["size"] + int(prefix_mb * 2**20)
        self.hardware = detect(options.get("probes"))
        self.plan = plan_device(device, self.hardware, kv_bytes_per_token=kv_per_token, weights_bytes=weights,
                                max_context=max_context, min_context=min(max_context, self.image_tokens + _PROMPT_ROOM),
                                n_threads=options.get("n_threads"), n_ctx=options.get("n_ctx"),
                                n_gpu_layers=options.get("n_gpu_layers"))
        self.device = self.plan.device
        if flash_attn is None:
            # On the CPU, llama.cpp's "auto" turns flash attention on, which made decode ~17 % slower
            # here (Qwen2-0.5B dims, Q4_K_M, 850-position context: 18.2 vs 22.0 tok/s) for a ~7 %
            # faster prefill; decoded tokens are most of a chat's time. GPUs keep "auto", and a
            # quantized cache needs it.
            flash_attn = "off" if self.device == "cpu" and kv_type not in QUANTIZED_KV else "auto"

        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        session_options.intra_op_num_threads = self.plan.n_threads
        # onnxruntime's pool threads spin after a run, waiting for more work, and llama.cpp's
        # prefill starts right then on the same cores: on the default model a first question's
        # TTFT was 3.3-3.6 ms instead of 1.6 (2-core AMD EPYC, docs/serve.md). Blocking costs
        # the vision graph itself 0.04 ms there and nothing measurable at bench-scale (1.53 s).
        session_options.add_session_config_entry(ORT_SPINNING, "0")
        providers = [(p, {"trt_engine_cache_enable": "True", "trt_engine_cache_path": _tensorrt_cache_dir()})
                     if p == TENSORRT_EP else p for p in self.plan.providers]
        try:
            self.session = ort.InferenceSession(str(self.path / vision_file["name"]), session_options,
                                                providers=providers)
        except _ort_errors() as err:
            raise TinyLlavaError(f"onnxruntime cannot load {vision_file['name']} with {', '.join(self.plan.providers)} "
                                 f"({str(err).splitlines()[0]})") from None
        release_freed_memory()
        self.vision_file = vision_file["name"]
        self.prefix_reuse = prefix_mb > 0
        # a tiny LLM decodes fastest on one thread (llamacpp.SMALL_LLM_BYTES); a caller's thread count stands
        small = (options.get("n_threads") is None and self.plan.n_gpu_layers == 0
                 and llm_path.stat().st_size < SMALL_LLM_BYTES)
        self.llm = LlamaCppModel(llm_path, n_ctx=self.plan.n_ctx, n_threads=self.plan.n_threads,
                                 n_gpu_layers=self.plan.n_gpu_layers, kv_type=kv_type, flash_attn=flash_attn,
                                 prefix_cache_bytes=int(prefix_mb * 2**20), decode_threads=1 if small else None)
        self.llm_file = llm_file["name"]
        self.kv_type, self.flash_attn = kv_type, flash_attn
        # Threads follow the free cores only when the caller did not fix them, and only on the CPU
        # (offloaded layers do not wait on CPU threads).
        self.free_cores = (FreeCores(self.plan.n_threads)
                           if options.get("n_threads") is None and self.plan.n_gpu_layers == 0 else None)
        self.n_ctx = self.llm.n_ctx
        self.n_vocab = self.llm.n_vocab
        self.positions_decoded = 0
        self.last_reused = 0  # positions of the last fresh prompt taken from the cache
        self._fresh = False  # reset() asked for: the next feed is a whole prompt from position 0
        eos = self.manifest.get("tokenizer", {}).get("eos_token_id")
        eos = self.llm.eos_id if eos is None else eos
        self.stop_ids = stop_token_ids(eos, self.template, self._single_token)
        self._first_tokenizer = LlamaCppTokenizer(self.llm)
        self._next_tokenizer = _ContinuationTokenizer(self.llm)

    def _vision_file(self, quant: str) -> dict:
        visions = files_by_role(self.manifest, "vision")
        for record in visions:
            if record.get("quant") == quant:
                return record
        raise TinyLlavaError(f"bundle {self.path} has no {quant!r} vision graph; it has "
                             f"{', '.join(repr(r.get('quant')) for r in visions) or 'none'}")

    def _single_token(self, text: str) -> int | None:
        ids = self.llm.tokenize(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    # -- what the VLM uses --------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return 0 if self._fresh else self.llm.n_past

    def prompt_tokenizer(self, first: bool):
        return self._first_tokenizer if first else self._next_tokenizer

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        (rows,) = self.session.run(["image_embeds"], {"pixel_values": np.ascontiguousarray(pixels, np.float32)})
        rows = np.asarray(rows, dtype=np.float32)  # (B, N, n_embd)
        return rows * np.float32(self.row_scale) if self.row_scale != 1.0 else rows

    def reset(self) -> None:
        # Lazy: the next feed is a whole prompt, which may share a prefix with what the cache holds.
        self._fresh = True
        self.last_reused = 0

    def _adapt_threads(self, fresh: bool) -> None:
        if self.free_cores is not None and (fresh or self.free_cores.due()):
            self.llm.set_threads(self.free_cores.threads())

    def feed(self, segments: Sequence) -> np.ndarray:
        total = check_segments(segments, self.n_past, self.n_ctx, self.n_vocab, self.llm_file)
        self._adapt_threads(self._fresh)
        if self._fresh:
            self._fresh = False
            logits = self.llm.prefill(segments, reuse=self.prefix_reuse)
            self.last_reused = self.llm.last_reused
            self.positions_decoded += total - self.last_reused
            return logits
        logits = None
        for segment in segments:
            if isinstance(segment, np.ndarray):
                logits = self.llm.decode_embeddings(segment)
            elif len(segment):
                logits = self.llm.decode_tokens(segment)
        self.positions_decoded += total
        return logits

    def clear_caches(self) -> None:
        """Empty the KV cache and the prefix store: nothing of an earlier prompt is reused."""
        self.llm.clear()
        self.llm.prefix_store.clear()
        self._fresh = True

    def detokenizer(self) -> _PieceDetokenizer:
        return _PieceDetokenizer(self.llm)

    def info(self) -> dict:
        return {
            "backend": self.kind,
            "path": str(self.path),
            **self.plan.as_dict(),
            "n_ctx": self.n_ctx,
            "providers_used": list(self.session.get_providers()),
            "hardware": self.hardware.describe(),
            "vision": self.vision_file,
            "llm": self.llm_file,
            "kv_type": self.kv_type,
            "kv_cache_mb": self.llm.kv_bytes / 2**20,
            "llm_threads": self.llm.n_threads,
            "decode_threads": self.llm.one_token_threads,
            "adaptive_threads": self.free_cores is not None,
            "flash_attn": self.flash_attn,
            "prefix_cache_mb": self.llm.prefix_store.capacity / 2**20,
            "image_tokens": self.image_tokens,
            "template": self.template.name,
        }

    def close(self) -> None:
        self.llm.close()
