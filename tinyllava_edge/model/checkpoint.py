"""Checkpoint directories: detect the layout, convert its config, map its weight names, load.

Three layouts are read (safetensors only):

* **factory** - TinyLLaVA_Factory: `model_type: "tinyllava"`, weights `language_model.*`,
  `vision_tower._vision_tower.*`, `connector._connector.*`. Also what we write.
* **legacy** - TinyLLaVABench (`tiny_llava_phi` / `tiny_llava` / `tiny_llava_stablelm` /
  `tiny_llava_qwen`): a flat LLM config plus `mm_*` keys; weights `model.layers.*`, `lm_head.*`,
  `model.vision_tower.vision_tower.*`, `model.mm_projector.*`. Its SigLIP tower ran every encoder
  layer present in the weights (the released towers had the last one deleted) and kept all
  tokens, without the post-layernorm; CLIP used `mm_vision_select_layer/feature` like the Factory.
* **hf_llava** - transformers' `LlavaForConditionalGeneration`, with the 4.x names of the
  released llava-hf checkpoints (`language_model.model.*`, `vision_tower.vision_model.*`,
  `multi_modal_projector.linear_{1,2}.*`) or the 5.x ones (`model.language_model.*`, `lm_head.*`).

Each layout becomes a `TinyLlavaConfig` whose feature selection reproduces what that layout's
own code computed, and a state dict in our (= Factory) names. What we write also carries what
transformers 4.x readers (the Factory's 4.40) need, and reading drops it again: tf4_compat.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from tinyllava_edge.atomic import atomic_file, write_text
from tinyllava_edge.errors import CheckpointError
from tinyllava_edge.model.configuration import TinyLlavaConfig
from tinyllava_edge.model.gptq import attach_gptq_llm, gptq_llm_dir
from tinyllava_edge.model.tf4_compat import (HEAD_PREFIX, add_4x_keys, dinov2_from_4x, dinov2_to_4x, drop_4x_keys,
                                             siglip_head_placeholder)
from tinyllava_edge.model.weights import LazyWeights, write_safetensors

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

LEGACY_FAMILIES = {
    "tiny_llava_phi": "phi",
    "tiny_llava": "llama",
    "tiny_llava_stablelm": "stablelm",
    "tiny_llava_qwen": "qwen2",
}
# StableLM-epoch (the legacy StableLM-2 code) named two settings differently from HF StableLm.
_STABLELM_EPOCH_KEYS = {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}
# Keys of the legacy config that describe the multimodal parts, not the LLM.
_LEGACY_MM_KEYS = {
    "mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token",
    "mm_patch_merge_type", "image_aspect_ratio", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj", "vision_tower",
    "architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "image_grid_pinpoints", "unfreeze_mm_vision_tower", "tokenizer_use_fast",
}

# Vision towers a legacy config may name without shipping their config (dims from their
# config.json on the hub, recorded here so nothing is fetched).
KNOWN_TOWERS: Mapping[str, Mapping[str, Any]] = {
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
        "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
    },
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "projection_dim": 768,
    },
    "openai/clip-vit-large-patch14": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
        "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "projection_dim": 768,
    },
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory read into our terms (config + state dict in our names)."""

    path: Path
    layout: str
    config: TinyLlavaConfig
    state_dict: Mapping[str, torch.Tensor]  # our names; each tensor read from the files when accessed


# -- reading files ----------------------------------------------------------------------------

def read_config_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory holding config.json")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path} has no config.json; expected a TinyLLaVA checkpoint (Factory, legacy "
            "TinyLLaVABench or HF LLaVA layout)"
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} holds a {type(raw).__name__}; expected a JSON object")
    return raw


def read_safetensors(path: Path) -> LazyWeights:
    """The tensors of `model.safetensors` or of the shards its index names, each read when asked
    for (model/weights.py): a part of the model is loaded without the rest."""
    single, index = path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickles:
            raise CheckpointError(
                f"{path} holds only {', '.join(pickles)}; tinyllava-edge reads safetensors only "
                "(pickle files can run code): convert the weights to model.safetensors first"
            )
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME})")
    return LazyWeights(files)


class _Renamed(Mapping):
    """A view of `source` under other names (ours -> the file's); values read on access."""

    def __init__(self, source: LazyWeights, names: Mapping[str, str]):
        self._source, self._names = source, dict(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._source[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source.shape(self._names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self._source.dtype(self._names[name])

    def nbytes(self, name: str | None = None) -> int:
        names = [name] if name is not None else list(self._names)
        return sum(self._source.nbytes(self._names[n]) for n in names)

    def under(self, prefix: str) -> "_Renamed":
        """The tensors whose names start with `prefix`, named without it (still unread)."""
        return _Renamed(self._source, {k[len(prefix):]: v for k, v in self._names.items() if k.startswith(prefix)})


def weights_under(state: Mapping[str, torch.Tensor], prefix: str) -> Mapping[str, torch.Tensor]:
    if isinstance(state, _Renamed):
        return state.under(prefix)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- layout detection ---------------------------------------------------------------------------

def detect_layout(raw: Mapping[str, Any], where: Path) -> str:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type == "tinyllava" or "TinyLlavaForConditionalGeneration" in architectures:
        return "factory"
    if model_type in LEGACY_FAMILIES:
        return "legacy"
    if model_type == "llava" or "LlavaForConditionalGeneration" in architectures:
        return "hf_llava"
    raise CheckpointError(
        f"{where / CONFIG_NAME} has model_type {model_type!r} (architectures {architectures}); "
        "expected 'tinyllava' (Factory), one of "
        f"{', '.join(sorted(LEGACY_FAMILIES))} (legacy TinyLLaVABench) or 'llava' (HF LLaVA)"
    )


# -- weight-name mapping: immutable tables + one pure function -----------------------------------

# (source prefix, our prefix), first match wins; order matters only where prefixes nest.
_PREFIXES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "factory": (("", ""),),
    "legacy": (
        ("model.vision_tower.vision_tower.", "vision_tower._vision_tower."),
        ("model.mm_projector.", "connector._connector."),
        ("", "language_model."),
    ),
    "hf_llava": (
        # transformers 4.x names (the released llava-hf checkpoints)
        ("language_model.", "language_model."),
        ("vision_tower.", "vision_tower._vision_tower."),
        ("multi_modal_projector.linear_1.", "connector._connector.0."),
        ("multi_modal_projector.linear_2.", "connector._connector.2."),
        # transformers 5.x names
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower._vision_tower."),
        ("model.multi_modal_projector.linear_1.", "connector._connector.0."),
        ("model.multi_modal_projector.linear_2.", "connector._connector.2."),
    ),
}
_TOWER = "vision_tower._vision_tower."
# Derivable buffers some released files carry; never parameters.
_DROP = re.compile(r"(^|\.)position_ids$|(^|\.)rotary_emb\.inv_freq$")


def map_weight_names(
    names: list[str], layout: str, tower_has_vision_model_level: bool
) -> tuple[dict[str, str], list[str]]:
    """Source name -> our name for one layout; also the names no rule maps (dropped buffers aside)."""
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for name in names:
        if _DROP.search(name):
            continue
        for src, dst in _PREFIXES[layout]:
            if name.startswith(src):
                ours = dst + name[len(src):]
                break
        else:
            unmapped.append(name)
            continue
        # transformers 5 saves SigLIP/CLIP towers without the `vision_model.` level.
        if tower_has_vision_model_level and ours.startswith(_TOWER) and not ours.startswith(_TOWER + "vision_model."):
            ours = _TOWER + "vision_model." + ours[len(_TOWER):]
        mapping[name] = ours
    return mapping, unmapped


# -- config conversion --------------------------------------------------------------------------

def _tower_weights(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _vision_dims_from_weights(tower: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Dims a SigLIP/CLIP tower's weights pin down (names relative to `vision_model.`)."""
    dims: dict[str, Any] = {}
    layers = {int(m.group(1)) for k in tower if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if layers:
        dims["num_hidden_layers"] = max(layers) + 1
    patch = tower.get("embeddings.patch_embedding.weight")
    if patch is not None:  # (C, 3, p, p)
        dims["hidden_size"], dims["patch_size"] = int(patch.shape[0]), int(patch.shape[-1])
        pos = tower.get("embeddings.position_embedding.weight")
        if pos is not None:
            n_patches = pos.shape[0] - (1 if "embeddings.class_embedding" in tower else 0)
            dims["image_size"] = int(round(n_patches ** 0.5)) * dims["patch_size"]
    fc1 = tower.get("encoder.layers.0.mlp.fc1.weight")
    if fc1 is not None:
        dims["intermediate_size"] = int(fc1.shape[0])
    return dims


def _legacy_vision_config(raw: Mapping[str, Any], path: Path, tower: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if isinstance(raw.get("vision_config"), dict):
        base = dict(raw["vision_config"])
    elif name and (local := _local_tower_dir(name, path)) is not None:
        found = json.loads((local / CONFIG_NAME).read_text(encoding="utf-8"))
        base = dict(found.get("vision_config", found))
    elif name in KNOWN_TOWERS:
        base = dict(KNOWN_TOWERS[name])
    else:
        raise CheckpointError(
            f"cannot tell the vision tower config of {path}: mm_vision_tower {name!r} is neither a "
            f"local directory with config.json nor one of the known towers ({', '.join(KNOWN_TOWERS)})"
        )
    # The tower kind follows the weights (the legacy code chose by a substring of the name).
    base["model_type"] = "clip_vision_model" if "embeddings.class_embedding" in tower else "siglip_vision_model"
    dims = _vision_dims_from_weights(tower)
    size, patch = base.get("image_size"), dims.get("patch_size", base.get("patch_size"))
    if size and patch and (size // patch) == dims.get("image_size", 0) // patch:
        dims.pop("image_size", None)  # the config's size fits the weights (it may not divide evenly)
    base.update(dims)
    if base["model_type"] == "siglip_vision_model":
        base["vision_use_head"] = any(k.startswith("head.") for k in tower)
    base.setdefault("_name_or_path", name or "")
    return base


def _local_tower_dir(name: str, path: Path) -> Path | None:
    for candidate in (Path(name), path / name):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def _legacy_config(raw: Mapping[str, Any], path: Path, state: Mapping[str, torch.Tensor]) -> TinyLlavaConfig:
    family = LEGACY_FAMILIES[raw["model_type"]]
    text = {k: v for k, v in raw.items() if k not in _LEGACY_MM_KEYS and not k.startswith("mm_")}
    text["model_type"] = family
    if family == "stablelm":
        for old, new in _STABLELM_EPOCH_KEYS.items():
            if old in text:
                text[new] = text.pop(old)
    tower = _tower_weights(state, "model.vision_tower.vision_tower.vision_model.")
    vision = _legacy_vision_config(raw, path, tower)
    if vision["model_type"] == "siglip_vision_model":
        # Legacy SigLIP: last hidden state of the layers present, all tokens kept.
        layer, strategy = -1, "cls_patch"
    else:
        layer = raw.get("mm_vision_select_layer", -2)
        strategy = raw.get("mm_vision_select_feature", "patch")
    return TinyLlavaConfig(
        text_config=text,
        vision_config=vision,
        connector_type=raw.get("mm_projector_type", "linear"),
        llm_model_name_or_path=raw.get("_name_or_path", ""),
        vision_model_name_or_path=vision.get("_name_or_path", ""),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_aspect_ratio=raw.get("image_aspect_ratio", "pad"),
        tokenizer_model_max_length=raw.get("tokenizer_model_max_length", 2048),
        tokenizer_padding_side=raw.get("tokenizer_padding_side", "right"),
    )


def _hf_llava_config(raw: Mapping[str, Any], path: Path) -> TinyLlavaConfig:
    act = raw.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: projector_hidden_act {act!r} is not supported; expected 'gelu'")
    if raw.get("multimodal_projector_bias", True) is not True:
        raise CheckpointError(f"{path}: a projector without bias is not supported")
    strategies = {"default": "patch", "full": "cls_patch"}
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in strategies:
        raise CheckpointError(
            f"{path}: vision_feature_select_strategy {strategy!r} is not one of {', '.join(strategies)}"
        )
    text, vision = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise CheckpointError(f"{path / CONFIG_NAME} lacks a text_config or vision_config object")
    text = dict(text)
    text.setdefault("model_type", "llama")
    return TinyLlavaConfig(
        text_config=text,
        vision_config=vision,
        connector_type="mlp2x_gelu",
        llm_model_name_or_path=text.get("_name_or_path", ""),
        vision_model_name_or_path=vision.get("_name_or_path", ""),
        vision_feature_layer=raw.get("vision_feature_layer", -2),
        vision_feature_select_strategy=strategies[strategy],
        # LLaVA-1.5 padded to a square; a folder written by `tinyllava-export --format hf` records
        # the model's own aspect and length (export/hf_llava.py)
        image_aspect_ratio=raw.get("image_aspect_ratio", "pad"),
        tokenizer_model_max_length=raw.get("tokenizer_model_max_length", 2048),
        scale_image_features=False,  # transformers 5's and vLLM's LLaVA add image rows unscaled
        pad_token_id=raw.get("pad_token_id"),
    )


def _factory_config(raw: Mapping[str, Any], path: Path, state: Mapping[str, torch.Tensor]) -> TinyLlavaConfig:
    for key in ("text_config", "vision_config"):
        if not isinstance(raw.get(key), dict):
            raise CheckpointError(f"{path / CONFIG_NAME} lacks a {key} object")
    raw = drop_4x_keys(copy.deepcopy(dict(raw)))  # the 4.x spellings we write beside 5.x's
    vision = raw["vision_config"]
    if vision.get("model_type") == "siglip_vision_model" and "vision_use_head" not in vision:
        # Files written by 4.x: the Factory's towers keep SigLIP's pooling head; respect a file
        # saved without it. 5.x files say it (a zero placeholder stands in when false: tf4_compat).
        vision["vision_use_head"] = any(k.startswith(_TOWER + HEAD_PREFIX) for k in state)
    raw.pop("auto_map", None)  # released configs point at remote code; we never run it
    try:
        return TinyLlavaConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a valid TinyLLaVA config ({exc})") from None


# -- the entry points ------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported layout into our config and weight names (no model built)."""
    from tinyllava_edge.model.vision import tower_for_config

    path = Path(path)
    raw = read_config_json(path)
    layout = detect_layout(raw, path)
    source = read_safetensors(path)
    if layout == "factory":
        config = _factory_config(raw, path, source)
    elif layout == "legacy":
        config = _legacy_config(raw, path, source)
    else:
        config = _hf_llava_config(raw, path)
    config._name_or_path = str(path)
    has_level = tower_for_config(config.vision_config).key in ("siglip", "clip")
    mapping, unmapped = map_weight_names(list(source), layout, has_level)
    if unmapped:
        raise CheckpointError(
            f"{path}: {len(unmapped)} weights have names the {layout} layout does not know: "
            + _preview(unmapped)
        )
    names = {ours: name for name, ours in mapping.items()}
    if layout == "factory" and getattr(config.vision_config, "vision_use_head", True) is False:
        # the placeholder head written for 4.x readers (tf4_compat); our tower has none
        names = {k: v for k, v in names.items() if not k.startswith(_TOWER + HEAD_PREFIX)}
    state: Mapping[str, torch.Tensor] = _Renamed(source, names)  # nothing read yet
    if config.vision_config.model_type == "dinov2":
        state = _map_tower(state, dinov2_from_4x)  # renames tensors of the tower: read (small models only)
    return Checkpoint(path, layout, config, state)


def _map_tower(state: Mapping[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """`convert` applied to the tower's weights (names relative to the tower); the rest unchanged."""
    tower = convert({k[len(_TOWER):]: v for k, v in state.items() if k.startswith(_TOWER)})
    rest = {k: v for k, v in state.items() if not k.startswith(_TOWER)}
    return {**rest, **{_TOWER + k: v for k, v in tower.items()}}


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: Path, *,
               dtype: torch.dtype | None = None) -> None:
    """Copy `state` into `model`, reporting every missing, unexpected or mis-shaped weight at once.

    With `dtype` the tensors become the model's parameters (cast one at a time where they are
    stored in another type) instead of being copied into parameters made beforehand: a model
    built empty (no_init_weights) never holds a second copy of its weights.
    """
    own = model.state_dict()
    tied = _tied_names(model)
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    shape_of = getattr(state, "shape", lambda k: tuple(state[k].shape))  # lazy mappings know it unread
    shapes = [
        f"{k} {tuple(shape_of(k))} in the file, {tuple(own[k].shape)} from the config"
        for k in state
        if k in own and tuple(shape_of(k)) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing ({_preview(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights ({_preview(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} weights of the wrong shape ({'; '.join(shapes[:4])})")
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems))
    if dtype is None:
        model.load_state_dict(dict(state), strict=False)
        return
    tensors = {}
    for name in state:
        tensor = state[name]
        tensors[name] = tensor.to(dtype) if tensor.is_floating_point() and own[name].is_floating_point() else tensor
    model.load_state_dict(tensors, strict=False, assign=True)


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier parameter (e.g. a tied lm_head)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def load_checkpoint(path: str | os.PathLike, dtype: Any = None, device: Any = None,
                    parts: tuple[str, ...] | None = None, keep_buffers: bool = False):
    """The model of a checkpoint directory; `dtype` None keeps the parameters float32, "auto" the
    stored dtype; float buffers (RoPE frequencies, Gemma's embedding scale) follow `dtype` unless
    `keep_buffers` (float32 as built: the export's reference computes in float32). `parts` (top-level module names, e.g. ("vision_tower", "connector")) loads only
    those; the other modules stay on the meta device (shapes, no memory), so the vision graph or
    mmproj of a 3B checkpoint is exported with the vision weights alone in memory."""
    from transformers.initialization import no_init_weights

    from tinyllava_edge.model.modeling import TinyLlavaForConditionalGeneration

    ckpt = read_checkpoint(path)
    if dtype == "auto":  # transformers' meaning: the dtype the weights were saved in
        dtype = getattr(ckpt.config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # no_init_weights: torch.empty tensors, so the LLM a GPTQ checkpoint replaces is never filled
    with no_init_weights():
        model = TinyLlavaForConditionalGeneration(ckpt.config)
    model.checkpoint_layout = ckpt.layout
    model.quantization = None
    llm_dir = gptq_llm_dir(ckpt.path) if ckpt.layout == "factory" else None
    if llm_dir is not None:  # the LLM stored GPTQ-quantized (model/gptq.py)
        if parts is not None:
            raise CheckpointError(f"{path}: loading only {', '.join(parts)} of a GPTQ checkpoint is not supported")
        model.quantization = attach_gptq_llm(model, ckpt.state_dict, ckpt.path, llm_dir, dtype=dtype, device=device)
        return model.eval()
    state = ckpt.state_dict
    if parts is not None:
        for name, module in model.named_children():
            if name not in parts:
                module.to("meta")  # frees the empty parameters; anything that reads them fails loudly
    model.tie_weights()  # skipped under no_init_weights; the file holds tied tensors once
    if parts is None:
        load_state(model, state, ckpt.path, dtype=dtype or torch.float32)
    else:
        for name in parts:
            load_state(getattr(model, name), weights_under(state, f"{name}."), ckpt.path, dtype=dtype or torch.float32)
    model.tie_weights()  # assign replaced the shared parameter: tie the output layer to it again
    if device is not None or (dtype is not None and not keep_buffers):  # float buffers follow the dtype
        model.to(device=device, dtype=None if keep_buffers else dtype)
    return model.eval()


def save_checkpoint(model, save_directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the Factory layout: config.json + model.safetensors, each through a temporary name."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tied = _tied_names(model)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in tied}
    config = model.config
    config.architectures = ["TinyLlavaForConditionalGeneration"]
    first = next(iter(tensors.values()), None)
    if first is not None and first.is_floating_point():
        config.dtype = first.dtype
    tensors.update(_head_for_4x_readers(config.vision_config, tensors))
    if config.vision_config.model_type == "dinov2":
        tensors = _map_tower(tensors, dinov2_to_4x)
    # transformers 4.x readers (the Factory) find their own spellings too: tf4_compat
    text = json.dumps(add_4x_keys(json.loads(config.to_json_string())), indent=2, sort_keys=True) + "\n"
    with atomic_file(out / WEIGHTS_NAME) as tmp:
        write_safetensors(tensors, tmp, metadata={"format": "pt"})  # one tensor at a time: no second copy
    write_text(out / CONFIG_NAME, text)
    return out


def _head_for_4x_readers(vision_config, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SigLIP without a pooling head: zeros where 4.x expects its weights (none if no tower is saved)."""
    tower = [v for k, v in tensors.items() if k.startswith(_TOWER)]
    if vision_config.model_type != "siglip_vision_model" or vision_config.vision_use_head or not tower:
        return {}
    return {_TOWER + k: v for k, v in siglip_head_placeholder(vision_config, tower[0].dtype).items()}

