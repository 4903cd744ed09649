"""Miniatures: checkpoints with the exact config keys, weight names and tokenizer kind of the
released TinyLLaVA models, tiny dimensions and random weights, built on the fly.

`MINIATURES` maps a released model's name to what it is made of; `build_miniature(name, dir)`
writes one. `write_layout(model, dir, layout)` saves the same weights in any of the three layouts
(Factory, legacy TinyLLaVABench, HF LLaVA with transformers 4.x names) so tests can compare each
layout with an independent reference of its own forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from tinyllava_edge.atomic import atomic_file, write_text
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, _tied_names
from tinyllava_edge.model.configuration import TinyLlavaConfig
from tinyllava_edge.model.modeling import TinyLlavaForConditionalGeneration

# Released LLM configs (values from each model's config.json), with the dims the miniature
# shrinks. Only architecture-defining settings are kept; sizes are overridden below.
_TEXT: Mapping[str, Mapping[str, Any]] = {
    "phi": {  # microsoft/phi-2
        "model_type": "phi", "hidden_act": "gelu_new", "layer_norm_eps": 1e-5,
        "partial_rotary_factor": 0.4, "qk_layernorm": False, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 2048, "resid_pdrop": 0.1,
        "_name_or_path": "microsoft/phi-2",
    },
    "qwen2": {  # Qwen/Qwen2-0.5B
        "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 32768, "use_sliding_window": False,
        "_name_or_path": "Qwen/Qwen2-0.5B",
    },
    "llama": {  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
        "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 2048,
        "_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    },
    "stablelm": {  # stabilityai/stablelm-2-zephyr-1_6b
        "model_type": "stablelm", "hidden_act": "silu", "layer_norm_eps": 1e-5,
        "partial_rotary_factor": 0.25, "use_qkv_bias": True, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 4096,
        "_name_or_path": "stabilityai/stablelm-2-zephyr-1_6b",
    },
    "gemma": {  # google/gemma-2b-it
        "model_type": "gemma", "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "_name_or_path": "google/gemma-2b-it",
    },
}
# Miniature sizes; the key/value head ratio follows each released model (GQA for Qwen2,
# TinyLlama and Gemma's multi-query attention).
_TEXT_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_KV_HEADS = {"phi": 4, "qwen2": 2, "llama": 2, "stablelm": 4, "gemma": 1}

_VISION: Mapping[str, Mapping[str, Any]] = {
    "siglip": {  # google/siglip-so400m-patch14-384: 384 px / 14 px patches -> 27x27 (not divisible)
        "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "_name_or_path": "google/siglip-so400m-patch14-384",
    },
    "clip": {  # openai/clip-vit-large-patch14-336
        "model_type": "clip_vision_model", "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 16, "_name_or_path": "openai/clip-vit-large-patch14-336",
    },
    "dinov2": {  # facebook/dinov2-large (a TinyLLaVA_Factory tower; no released TinyLLaVA uses it)
        "model_type": "dinov2", "hidden_act": "gelu", "layer_norm_eps": 1e-6, "layerscale_value": 1.0,
        "mlp_ratio": 2, "use_swiglu_ffn": False, "_name_or_path": "facebook/dinov2-large",
    },
}
_VISION_DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                "patch_size": 7}
# 4x4 patches of 7 px. SigLIP gets 30 px: like SigLIP-384/14 its size is not a multiple of the
# patch (the conv drops the rest); CLIP checks the input size, and 336/14 divides evenly; DINOv2
# at its own size, so its position table is used as stored, not interpolated.
_IMAGE_SIZE = {"siglip": 30, "clip": 28, "dinov2": 28}
# DINOv2 sizes its MLP by mlp_ratio, not intermediate_size
_NOT_IN_CONFIG = {"dinov2": ("intermediate_size",)}

TOKENIZER_OF_FAMILY = {"phi": "phi2", "qwen2": "qwen2", "llama": "tinyllama", "stablelm": "stablelm2", "gemma": "gemma"}
LEGACY_MODEL_TYPE = {"phi": "tiny_llava_phi", "llama": "tiny_llava", "stablelm": "tiny_llava_stablelm", "qwen2": "tiny_llava_qwen"}
LAYOUTS = ("factory", "legacy", "hf_llava")


@dataclass(frozen=True)
class Miniature:
    name: str  # the released model this imitates
    family: str
    tower: str
    layout: str = "factory"
    max_length: int = 2048


MINIATURES: Mapping[str, Miniature] = {
    m.name: m
    for m in (
        Miniature("TinyLLaVA-Phi-2-SigLIP-3.1B", "phi", "siglip", max_length=3072),
        Miniature("TinyLLaVA-Qwen2-0.5B-SigLIP", "qwen2", "siglip"),
        Miniature("TinyLLaVA-TinyLlama-SigLIP", "llama", "siglip"),
        Miniature("TinyLLaVA-StableLM-2-SigLIP", "stablelm", "siglip"),
        Miniature("TinyLLaVA-Gemma-SigLIP-2.4B", "gemma", "siglip"),
        Miniature("TinyLLaVA-Phi-2-CLIP", "phi", "clip", max_length=3072),
        # TinyLLaVABench releases (legacy layout; the SigLIP tower shipped without its last layer)
        Miniature("TinyLLaVA-3.1B", "phi", "siglip", layout="legacy", max_length=3072),
        Miniature("TinyLLaVA-2.0B", "stablelm", "siglip", layout="legacy"),
        Miniature("TinyLLaVA-1.5B", "llama", "siglip", layout="legacy"),
        # transformers' LLaVA layout (llava-hf conversions)
        Miniature("tiny-llava-v1-hf", "llama", "siglip", layout="hf_llava"),
        Miniature("llava-1.5-hf", "llama", "clip", layout="hf_llava"),
    )
}


def miniature_config(family: str, tower: str, vocab_size: int, max_length: int = 2048, **overrides: Any) -> TinyLlavaConfig:
    """A Factory config for any family x tower with tiny dims and the released settings."""
    if family not in _TEXT:
        raise TinyLlavaError(f"unknown miniature family {family!r}; known: {', '.join(sorted(_TEXT))}")
    if tower not in _VISION:
        raise TinyLlavaError(f"unknown miniature tower {tower!r}; known: {', '.join(sorted(_VISION))}")
    text = {**_TEXT[family], **_TEXT_DIMS, "num_key_value_heads": _KV_HEADS[family], "vocab_size": vocab_size}
    if family == "gemma":
        text["head_dim"] = _TEXT_DIMS["hidden_size"] // _TEXT_DIMS["num_attention_heads"]
    vision = {**_VISION[tower], **_VISION_DIMS, "image_size": _IMAGE_SIZE[tower]}
    for key in _NOT_IN_CONFIG.get(tower, ()):
        del vision[key]
    fields = dict(
        text_config=text,
        vision_config=vision,
        connector_type="mlp2x_gelu",
        llm_model_name_or_path=text["_name_or_path"],
        vision_model_name_or_path=vision["_name_or_path"],
        tokenizer_model_max_length=max_length,
        tune_type_llm="full",
        tune_type_connector="full",
        tune_vision_tower_from_layer=0,
    )
    fields.update(overrides)
    return TinyLlavaConfig(**fields)


def build_miniature(name: str, out_dir: str | Path, seed: int = 0, layout: str | None = None) -> Path:
    """Write the miniature of a released model (config, random weights, tokenizer) to `out_dir`."""
    if name not in MINIATURES:
        raise TinyLlavaError(f"unknown miniature {name!r}; known: {', '.join(MINIATURES)}")
    spec = MINIATURES[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(spec.family, out)
    vocab = _padded(len(tokenizer))
    config = miniature_config(spec.family, spec.tower, vocab, spec.max_length,
                              pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id)
    model = random_model(config, seed)
    write_layout(model, out, layout or spec.layout, image_token_id=_image_token_id(tokenizer, vocab))
    return out


def _padded(n: int, multiple: int = 64) -> int:
    """Released vocab sizes are padded past the tokenizer (Phi-2: 51200 for 50295 tokens)."""
    return -(-(n + 1) // multiple) * multiple


def _image_token_id(tokenizer, vocab: int) -> int:
    # HF LLaVA puts a real `<image>` token in the vocabulary; the padded tail of the embedding
    # table holds a spare row for it.
    return vocab - 1


def _write_tokenizer(family: str, out: Path):
    from tinyllava_edge.model.tokenizer import load_tokenizer
    from tinyllava_edge.testing.tokenizers import build_tokenizer

    build_tokenizer(TOKENIZER_OF_FAMILY[family], out)
    return load_tokenizer(out, model_type=family)


def random_model(config: TinyLlavaConfig, seed: int = 0) -> TinyLlavaForConditionalGeneration:
    """A model with deterministic random weights, larger than the default init so logits differ."""
    torch.manual_seed(seed)
    model = TinyLlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


# -- writing the other layouts ---------------------------------------------------------------------

def write_layout(model: TinyLlavaForConditionalGeneration, out_dir: str | Path, layout: str,
                 image_token_id: int | None = None, drop_last_tower_layer: bool | None = None) -> Path:
    """Save `model`'s weights in `layout` with the names and config keys that layout's releases use.

    `legacy` SigLIP towers ship without their last encoder layer, as the TinyLLaVABench releases
    did (`drop_last_tower_layer` defaults to True there).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "factory":
        model.save_pretrained(out)
        return out
    if layout not in LAYOUTS:
        raise TinyLlavaError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    tied = _tied_names(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    config = model.config
    if layout == "legacy":
        if drop_last_tower_layer is None:
            drop_last_tower_layer = config.vision_config.model_type == "siglip_vision_model"
        raw, tensors = _legacy(config, state, out, drop_last_tower_layer)
    else:
        raw, tensors = _hf_llava(config, state, image_token_id)
    from safetensors.torch import save_file

    with atomic_file(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text(out / CONFIG_NAME, json.dumps(raw, indent=2))
    return out


def _legacy(config: TinyLlavaConfig, state: dict[str, torch.Tensor], out: Path, drop_last: bool):
    family = config.text_config.model_type
    if family not in LEGACY_MODEL_TYPE:
        raise TinyLlavaError(f"TinyLLaVABench had no {family} model; it had {', '.join(LEGACY_MODEL_TYPE)}")
    vision = config.vision_config.to_dict()
    layers = vision["num_hidden_layers"]
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("vision_tower._vision_tower."):
            rest = k[len("vision_tower._vision_tower."):]
            if drop_last and f"encoder.layers.{layers - 1}." in rest:
                continue
            tensors["model.vision_tower.vision_tower." + rest] = v
        elif k.startswith("connector._connector."):
            tensors["model.mm_projector." + k[len("connector._connector."):]] = v
        else:
            tensors[k[len("language_model."):]] = v
    # The legacy code read the tower's config from its own directory (mm_vision_tower).
    tower_dir = out / "vision_tower"
    tower_dir.mkdir(exist_ok=True)
    (tower_dir / CONFIG_NAME).write_text(json.dumps(vision, indent=2), encoding="utf-8")
    raw = config.text_config.to_dict()
    if family == "stablelm":  # StableLM-epoch names, flat as 4.x-era configs were
        rope = raw.pop("rope_parameters", None) or {}
        raw["rope_pct"] = rope.get("partial_rotary_factor", raw.pop("partial_rotary_factor", 0.25))
        raw["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        raw["norm_eps"] = raw.pop("layer_norm_eps")
    raw.update(
        model_type=LEGACY_MODEL_TYPE[family],
        architectures=[{"phi": "TinyLlavaPhiForCausalLM", "llama": "TinyLlavaLlamaForCausalLM",
                        "stablelm": "TinyLlavaStablelmForCausalLM", "qwen2": "TinyLlavaQwen2ForCausalLM"}[family]],
        mm_vision_tower="vision_tower",
        mm_projector_type=config.connector_type,
        mm_hidden_size=vision["hidden_size"],
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tokenizer_model_max_length=config.tokenizer_model_max_length,
        tokenizer_padding_side="right",
        use_mm_proj=True,
    )
    return raw, tensors


def _hf_llava(config: TinyLlavaConfig, state: dict[str, torch.Tensor], image_token_id: int | None):
    if config.connector_type != "mlp2x_gelu":
        raise TinyLlavaError(f"HF LLaVA has only the mlp2x_gelu projector, not {config.connector_type!r}")
    if config.vision_feature_select_strategy != "patch":
        raise TinyLlavaError("HF LLaVA miniatures use the 'default' (patch) feature selection")
    tensors: dict[str, torch.Tensor] = {}
    projector = {"connector._connector.0.": "multi_modal_projector.linear_1.",
                 "connector._connector.2.": "multi_modal_projector.linear_2."}
    for k, v in state.items():
        if k.startswith("vision_tower._vision_tower."):
            tensors["vision_tower." + k[len("vision_tower._vision_tower."):]] = v
        elif (src := next((p for p in projector if k.startswith(p)), None)) is not None:
            tensors[projector[src] + k[len(src):]] = v
        else:
            tensors[k] = v  # language_model.model.* / language_model.lm_head.* as in 4.x
    vision = config.vision_config
    n_tokens = (vision.image_size // vision.patch_size) ** 2
    raw = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": config.text_config.to_dict(),
        "vision_config": vision.to_dict(),
        "image_token_index": image_token_id if image_token_id is not None else config.text_config.vocab_size - 1,
        "image_seq_length": n_tokens,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": "default",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(getattr(config.text_config, "tie_word_embeddings", False)),
        "pad_token_id": config.pad_token_id,
    }
    return raw, tensors


def build_miniature_bundle(name: str, out_dir: str | Path, bits: int = 32) -> tuple[Path, Path]:
    """A miniature checkpoint in `out_dir/ckpt` and its edge bundle in `out_dir/bundle` (export checks off).

    The runtime, demo and reliability tests share it: fast, and exact at 32 bits.
    """
    from tinyllava_edge.export import export_bundle

    out = Path(out_dir)
    ckpt = build_miniature(name, out / "ckpt")
    export_bundle(ckpt, out / "bundle", fmt="gguf", bits=bits, verify=False, progress=False)
    return ckpt, out / "bundle"
