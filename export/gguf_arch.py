"""What each LLM family becomes in GGUF: architecture, tensor names, tensor transforms, hyper-parameters.

One :class:`ArchSpec` per family, keyed exactly by ``text_config.model_type`` in :data:`GGUF_ARCHS`.
Tensor names are data: a table from the HF module path (``model.layers.{bid}.self_attn.q_proj``) to
gguf-py's ``MODEL_TENSOR``, whose GGUF spelling (``blk.{bid}.attn_q``) comes from
``gguf.TENSOR_NAMES``. :func:`map_tensor_names` maps a whole state dict and reports every tensor it
cannot place at once.

The facts below are read from llama.cpp (``src/models/<arch>.cpp``: which tensors each graph loads,
which are optional, the RoPE type per architecture) and are checked numerically by
tests/test_export_gguf.py against transformers' forward for every family.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry

T = MODEL_TENSOR

# HF module paths of the Llama-style decoder (LlamaForCausalLM and the families that copy its
# names: Qwen2, Gemma, StableLM). `{bid}` is the layer index.
_LLAMA_STYLE: Mapping[str, MODEL_TENSOR] = MappingProxyType({
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
    "model.layers.{bid}.input_layernorm": T.ATTN_NORM,
    "model.layers.{bid}.self_attn.q_proj": T.ATTN_Q,
    "model.layers.{bid}.self_attn.k_proj": T.ATTN_K,
    "model.layers.{bid}.self_attn.v_proj": T.ATTN_V,
    "model.layers.{bid}.self_attn.o_proj": T.ATTN_OUT,
    "model.layers.{bid}.post_attention_layernorm": T.FFN_NORM,
    "model.layers.{bid}.mlp.gate_proj": T.FFN_GATE,
    "model.layers.{bid}.mlp.up_proj": T.FFN_UP,
    "model.layers.{bid}.mlp.down_proj": T.FFN_DOWN,
})

# Gemma's graph has no `output` tensor: the projection is always token_embd (tied).
_GEMMA: Mapping[str, MODEL_TENSOR] = MappingProxyType({k: v for k, v in _LLAMA_STYLE.items() if v is not T.OUTPUT})

# transformers' PhiForCausalLM (microsoft/phi-2 in its HF-native names).
_PHI: Mapping[str, MODEL_TENSOR] = MappingProxyType({
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.final_layernorm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
    "model.layers.{bid}.input_layernorm": T.ATTN_NORM,
    "model.layers.{bid}.self_attn.q_proj": T.ATTN_Q,
    "model.layers.{bid}.self_attn.k_proj": T.ATTN_K,
    "model.layers.{bid}.self_attn.v_proj": T.ATTN_V,
    "model.layers.{bid}.self_attn.dense": T.ATTN_OUT,
    "model.layers.{bid}.mlp.fc1": T.FFN_UP,
    "model.layers.{bid}.mlp.fc2": T.FFN_DOWN,
})


@dataclass(frozen=True)
class Hyper:
    """The hyper-parameters llama.cpp reads, taken from the HF text config."""

    context_length: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dims: int
    rope_theta: float
    norm_eps: float


# -- tensor transforms (pure: array in, array out) ---------------------------------------------

def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k layout -> llama.cpp's interleaved pairs (LLAMA_ROPE_TYPE_NORM).

    HF rotates dims (i, i + d/2) of each head; llama.cpp's `llama` graph rotates (2i, 2i + 1).
    Rows of each head (d of them) are reordered 0, d/2, 1, d/2 + 1, ...; works for weights
    (n_head * d, n_in) and biases (n_head * d,).
    """
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


def _permute_q(w: np.ndarray, hp: Hyper) -> np.ndarray:
    return rope_permute(w, hp.n_head)


def _permute_k(w: np.ndarray, hp: Hyper) -> np.ndarray:
    return rope_permute(w, hp.n_head_kv)


def _plus_one(w: np.ndarray, hp: Hyper) -> np.ndarray:
    # GemmaRMSNorm scales by (1 + weight); llama.cpp's RMS norm multiplies by the stored weight.
    return w + 1.0


# -- the spec ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # exact text_config.model_type
    arch: MODEL_ARCH
    tensors: Mapping[str, MODEL_TENSOR]  # HF module path -> GGUF tensor
    biases: frozenset[MODEL_TENSOR]  # tensors whose `.bias` llama.cpp's graph loads
    norm: str  # "rms" (layer_norm_rms_epsilon) or "layer" (layer_norm_epsilon)
    eps_key: str  # the text-config attribute holding the norm epsilon
    # llama.cpp's graph hard-codes one activation per architecture (LLM_FFN_SILU / LLM_FFN_GELU,
    # GELU being the tanh approximation); these are the HF spellings of the same function.
    activations: tuple[str, ...]
    # "optional": a tied lm_head is left out (the graph reuses token_embd);
    # "required": the graph always reads `output`, so a tied lm_head is written as a copy;
    # "tied": the graph always reads token_embd, so an untied lm_head cannot be represented.
    output: str
    transforms: Mapping[MODEL_TENSOR, Callable[[np.ndarray, Hyper], np.ndarray]] = field(
        default_factory=lambda: MappingProxyType({}))
    # text-config settings llama.cpp's graph for this arch does not implement: (attribute,
    # the value we can convert, what the setting does).
    fixed: tuple[tuple[str, Any, str], ...] = ()

    def __post_init__(self) -> None:
        allowed = set(gguf.MODEL_TENSORS[self.arch])
        wrong = sorted(t.name for t in set(self.tensors.values()) | self.biases if t not in allowed)
        if wrong:
            raise ValueError(f"{self.model_type}: gguf has no {', '.join(wrong)} for {self.arch.name}")

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


GGUF_ARCHS: Registry[ArchSpec] = Registry("GGUF LLM architecture")

_QKV = frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V})
_SILU = ("silu", "swish")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

for _spec in (
    # llama.cpp `llama` uses LLAMA_ROPE_TYPE_NORM: q/k rows need the permute above.
    ArchSpec("llama", MODEL_ARCH.LLAMA, _LLAMA_STYLE, frozenset(), "rms", "rms_norm_eps", _SILU,
             "optional", MappingProxyType({T.ATTN_Q: _permute_q, T.ATTN_K: _permute_k})),
    # Qwen2 (NEOX RoPE, HF layout as is) loads q/k/v biases; no sliding window in llama.cpp's graph.
    ArchSpec("qwen2", MODEL_ARCH.QWEN2, _LLAMA_STYLE, _QKV, "rms", "rms_norm_eps", _SILU, "optional",
             fixed=(("use_sliding_window", False, "sliding-window attention"),)),
    # Phi-2: parallel attention + MLP from one layer norm, partial NEOX RoPE, biases everywhere.
    ArchSpec("phi", MODEL_ARCH.PHI2, _PHI,
             _QKV | {T.ATTN_NORM, T.ATTN_OUT, T.FFN_UP, T.FFN_DOWN, T.OUTPUT_NORM, T.OUTPUT},
             "layer", "layer_norm_eps", _GELU_TANH, "required",
             fixed=(("qk_layernorm", False, "per-head q/k layer norms"),)),
    # StableLM-2: layer norms with biases, partial NEOX RoPE, optional q/k/v biases. With
    # use_parallel_residual HF has no post_attention_layernorm, and llama.cpp's graph feeds the
    # attention norm's output to the MLP when ffn_norm is absent: the same model.
    ArchSpec("stablelm", MODEL_ARCH.STABLELM, _LLAMA_STYLE,
             _QKV | {T.ATTN_NORM, T.FFN_NORM, T.OUTPUT_NORM}, "layer", "layer_norm_eps", _SILU, "required",
             fixed=(("qk_layernorm", False, "per-head q/k layer norms"),)),
    # Gemma: RMSNorm weights stored as (w - 1); llama.cpp scales token embeddings by sqrt(n_embd)
    # itself and takes the output projection from token_embd (src/models/gemma.cpp).
    ArchSpec("gemma", MODEL_ARCH.GEMMA, _GEMMA, frozenset(), "rms", "rms_norm_eps", _GELU_TANH, "tied",
             MappingProxyType({T.ATTN_NORM: _plus_one, T.FFN_NORM: _plus_one, T.OUTPUT_NORM: _plus_one})),
):
    GGUF_ARCHS.add(_spec.model_type, _spec)


def arch_for(model_type: str) -> ArchSpec:
    """The GGUF spec of an LLM family (TinyLlavaError listing the known ones)."""
    return GGUF_ARCHS.get(model_type)


# -- names -------------------------------------------------------------------------------------

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_name(spec: ArchSpec, hf_name: str) -> tuple[str, MODEL_TENSOR] | None:
    """(GGUF name, tensor kind) of one HF state-dict name, or None where the spec has no place."""
    module, _, kind = hf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    bid = None
    if (m := _LAYER.match(module)) is not None:
        bid, module = int(m[1]), "model.layers.{bid}." + m[2]
    tensor = spec.tensors.get(module)
    if tensor is None or (kind == "bias" and tensor not in spec.biases):
        return None
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=bid)}.{kind}", tensor


def map_tensor_names(spec: ArchSpec, hf_names: Iterable[str]) -> dict[str, tuple[str, MODEL_TENSOR]]:
    """HF name -> (GGUF name, kind) for every name; raises naming all that have no place."""
    mapped, unmapped = {}, []
    for name in hf_names:
        target = gguf_tensor_name(spec, name)
        if target is None:
            unmapped.append(name)
        else:
            mapped[name] = target
    if unmapped:
        raise TinyLlavaError(
            f"{len(unmapped)} {spec.model_type} tensors have no place in llama.cpp's {spec.arch_name} graph: "
            f"{', '.join(unmapped)}"
        )
    return mapped


def transform(spec: ArchSpec, tensor: MODEL_TENSOR, array: np.ndarray, hp: Hyper) -> np.ndarray:
    fn = spec.transforms.get(tensor)
    return fn(array, hp) if fn is not None else array


# -- hyper-parameters ----------------------------------------------------------------------------

def _rope(config: Any) -> tuple[float, float]:
    """(theta, partial rotary factor) from transformers 5's `rope_parameters` (or 4.x flat keys)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise TinyLlavaError(
            f"the {config.model_type} config uses RoPE scaling {rope_type!r}; the GGUF writer supports "
            "only unscaled RoPE ('default')"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise TinyLlavaError(f"the {config.model_type} config has no rope_theta")
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return float(theta), float(factor)


def hyperparameters(spec: ArchSpec, config: Any) -> Hyper:
    """The llama.cpp hyper-parameters of a text config; unsupported settings raise TinyLlavaError."""
    for attr, supported, what in spec.fixed:
        value = getattr(config, attr, supported)
        if bool(value) != supported:
            raise TinyLlavaError(
                f"the {spec.model_type} config sets {attr}={value!r}; llama.cpp's {spec.arch_name} graph "
                f"does not implement {what}"
            )
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in spec.activations:
        raise TinyLlavaError(
            f"the {spec.model_type} config uses activation {act!r}; llama.cpp's {spec.arch_name} graph "
            f"computes {spec.activations[0]!r}"
        )
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    theta, factor = _rope(config)
    # HF's partial rotary: int(head_dim * factor) leading dims of each head (PhiAttention,
    # StableLmAttention `rotary_ndims`).
    rope_dims = int(head_dim * factor)
    return Hyper(
        context_length=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_ff=config.intermediate_size,
        n_layer=config.num_hidden_layers,
        n_head=n_head,
        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=head_dim,
        rope_dims=rope_dims,
        rope_theta=theta,
        norm_eps=float(getattr(config, spec.eps_key)),
    )


def write_hyperparameters(writer: gguf.GGUFWriter, spec: ArchSpec, hp: Hyper) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    # Written always: llama.cpp's default (n_embd / n_head) is wrong where head_dim is set apart
    # (Gemma-7B: 16 heads x 256 on 3072).
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.rope_dims)
    if spec.norm == "rms":
        writer.add_layer_norm_rms_eps(hp.norm_eps)
    else:
        writer.add_layer_norm_eps(hp.norm_eps)
