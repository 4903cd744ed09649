"""`TorchBackend`: a checkpoint directory run with transformers (the reference the edge path is checked against).

The model is `TinyLlavaForConditionalGeneration.from_pretrained` (any layout it reads), the
tokenizer the checkpoint's own, the template the LLM family's default (as the eval predictor
uses). Text rows come from the LLM's input embeddings, image rows from `encode_images` times
`image_features_scale` (exactly what `prepare_inputs_for_multimodal` splices), and decoding
keeps transformers' KV cache between calls, so chat turns add only their new tokens here too.

torch is imported when a TorchBackend is made, never at module import.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from tinyllava_edge.data.preprocess import PreprocessConfig
from tinyllava_edge.data.template import default_template_for_family, get_template
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.hub import model_name
from tinyllava_edge.runtime.backend import check_options, check_segments, stop_token_ids
from tinyllava_edge.runtime.devices import DEVICES, JETSON_MARKER

OPTIONS = ("dtype", "quantization", "quantize_vision", "n_threads", "n_ctx", "template")
DTYPES = MappingProxyType({"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"})
# Quantized torch loading belongs to the model package (model/bnb.py: TORCH_SCHEMES, bitsandbytes
# nf4 / fp4 / int8, applied at load time), so the runtime depends on model only. GPTQ is not applied at load time: a
# checkpoint written by `tinyllava-quantize --torch gptq` holds its LLM GPTQ-quantized and loads as
# it is (model/gptq.py, needs GPTQModel: .venv-gptq).


def _torch_device(device: str, torch) -> str:
    """cpu | cuda | jetson | auto -> the device name (cpu or cuda), or one sentence saying what was found."""
    if device not in DEVICES:
        raise TinyLlavaError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    if device == "jetson":
        model = Path("/proc/device-tree/model")
        jetson = Path("/etc/nv_tegra_release").exists() or (
            model.is_file() and JETSON_MARKER in model.read_bytes().decode("utf-8", "replace"))
        if not jetson:
            raise TinyLlavaError("device 'jetson' was asked for but this machine is not a Jetson")
    if device in ("cuda", "jetson") and not has_cuda:
        raise TinyLlavaError(f"device {device!r} was asked for but torch {torch.__version__} sees no CUDA GPU")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return "cpu" if device == "cpu" else "cuda"


class _ContinuationTokenizer:
    """The checkpoint's tokenizer without special tokens added (a later chat turn)."""

    bos_token_id = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class _DiffDetokenizer:
    """Text of all tokens so far, minus what was given out; waits while it ends in a cut character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.given = ""

    def push(self, token: int) -> bytes:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return b""
        return self._take(text)

    def flush(self) -> bytes:
        """What was held back at the end (a character that never completed comes out as U+FFFD)."""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> bytes:
        new = text[len(self.given):] if text.startswith(self.given) else ""
        self.given = text
        return new.encode("utf-8")


class TorchBackend:
    """A checkpoint directory on `device` ("auto" | "cpu" | "cuda" | "jetson").

    Options: `dtype` "fp32" (default) | "bf16" | "fp16" (the compute dtype); `quantization`
    "nf4" | "fp4" | "int8" (bitsandbytes, the LLM's linears) with `quantize_vision` True to quantize
    tower + connector too; "gptq" only confirms that the checkpoint holds a GPTQ LLM (written by
    `tinyllava-quantize --torch gptq`; such a checkpoint loads GPTQ without the option, on CPU);
    `n_threads` (sets torch's intra-op threads, process-wide); `n_ctx` (default: the
    checkpoint's `tokenizer_model_max_length`); `template` a chat template name.
    """

    kind = "torch"

    def __init__(self, path: str | os.PathLike, device: str = "auto", **options):
        check_options(self.kind, options, OPTIONS)
        from tinyllava_edge.model.gptq import gptq_llm_dir

        gptq = gptq_llm_dir(path) is not None  # the LLM is stored GPTQ-quantized (model/gptq.py)
        quantization = options.get("quantization")
        if quantization == "gptq" and gptq:
            quantization = None  # what the checkpoint holds: loaded as it is
        elif quantization is not None:
            from tinyllava_edge.model.bnb import GPTQ_REASON, torch_scheme

            if quantization == "gptq":
                raise TinyLlavaError(f"{path} holds no GPTQ LLM; {GPTQ_REASON}")
            torch_scheme(quantization)  # unknown: one sentence before any loading
            if gptq:
                raise TinyLlavaError(f"{path} holds a GPTQ-quantized LLM already; load it without quantization "
                                     f"(or with quantization='gptq'), not with {quantization!r}")
        if options.get("quantize_vision") and quantization is None:
            raise TinyLlavaError("quantize_vision needs a quantization (nf4, fp4 or int8)")
        dtype = options.get("dtype", "fp32")
        if dtype not in DTYPES:
            raise TinyLlavaError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        import torch

        from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer

        self._torch = torch
        self.path = Path(path)
        self.model_id = model_name(self.path)  # a Hub snapshot is called by its repository id
        self.device = _torch_device(device, torch)
        if gptq and self.device != "cpu":
            if device != "auto":
                raise TinyLlavaError(f"{path} holds a GPTQ LLM, which runs on CPU here (GPTQModel's torch fused "
                                     f"kernel); device {device!r} was asked for: load it with device='cpu'")
            self.device = "cpu"
        if options.get("n_threads") is not None:
            if options["n_threads"] < 1:
                raise TinyLlavaError(f"n_threads must be at least 1, got {options['n_threads']}")
            torch.set_num_threads(int(options["n_threads"]))
        self.dtype = getattr(torch, DTYPES[dtype])
        if quantization is None:
            self.model = TinyLlavaForConditionalGeneration.from_pretrained(self.path, dtype=self.dtype,
                                                                           device=self.device).eval()
        else:
            from tinyllava_edge.model.bnb import load_quantized

            self.model = load_quantized(self.path, quantization, vision=bool(options.get("quantize_vision")),
                                        device=self.device, dtype=self.dtype)
        self.quantization = "gptq" if gptq else quantization
        self.tokenizer = load_tokenizer(self.path)
        config = self.model.config
        self.template = get_template(options.get("template") or default_template_for_family(config.llm_family))
        vision = config.vision_config
        self.preprocess = PreprocessConfig.for_tower(vision.model_type, vision.image_size, config.image_aspect_ratio)
        self.feature_scale = float(self.model.image_features_scale)
        limit = int(config.tokenizer_model_max_length or config.text_config.max_position_embeddings)
        n_ctx = options.get("n_ctx")
        if n_ctx is not None and not 1 <= n_ctx <= limit:
            raise TinyLlavaError(f"n_ctx {n_ctx} must be between 1 and the model's context of {limit} positions")
        self.n_ctx = int(n_ctx or limit)
        self.n_vocab = int(config.text_config.vocab_size)
        self.image_tokens = 0  # known after the first image
        self.n_past = 0
        self.positions_decoded = 0
        self._cache = None
        # transformers renamed `past_key_values` to `cache` during 5.x (the old name warns until 5.40)
        forward = inspect.signature(self.model.language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = stop_token_ids(self.tokenizer.eos_token_id, self.template, vocab.get)
        self._next_tokenizer = _ContinuationTokenizer(self.tokenizer)

    def prompt_tokenizer(self, first: bool):
        return self.tokenizer if first else self._next_tokenizer

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            rows = self.model.encode_images(torch.from_numpy(np.ascontiguousarray(pixels, np.float32)))
            if self.feature_scale != 1.0:
                rows = rows * self.feature_scale
        out = rows.float().cpu().numpy()  # (B, N, hidden)
        self.image_tokens = out.shape[1]
        return out

    def reset(self) -> None:
        self._cache = None
        self.n_past = 0

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.language_model.config)

    def feed(self, segments: Sequence) -> np.ndarray:
        torch = self._torch
        total = check_segments(segments, self.n_past, self.n_ctx, self.n_vocab, self.model_id)
        embed = self.model.get_input_embeddings()
        with torch.inference_mode():
            parts = []
            for segment in segments:
                if isinstance(segment, np.ndarray):
                    parts.append(torch.from_numpy(np.ascontiguousarray(segment)).to(self.device, self.dtype))
                elif len(segment):
                    parts.append(embed(torch.tensor(list(segment), device=self.device)))
            inputs = torch.cat(parts)[None]  # (1, T, hidden)
            positions = torch.arange(self.n_past, self.n_past + total, device=self.device)[None]
            if self._cache is None:
                self._cache = self._new_cache()
            out = self.model.language_model(inputs_embeds=inputs, position_ids=positions, use_cache=True,
                                            logits_to_keep=1, **{self._cache_kwarg: self._cache})  # cache grows in place
        self.n_past += total
        self.positions_decoded += total
        return out.logits[0, -1].float().cpu().numpy()

    def detokenizer(self) -> _DiffDetokenizer:
        return _DiffDetokenizer(self.tokenizer)

    def info(self) -> dict:
        return {"backend": self.kind, "path": str(self.path), "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."), "quantization": self.quantization,
                "n_threads": self._torch.get_num_threads(),
                "n_ctx": self.n_ctx, "template": self.template.name}

    def close(self) -> None:
        self._cache = None
