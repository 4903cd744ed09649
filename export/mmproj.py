"""Vision tower + connector -> an mmproj GGUF that stock llama.cpp (mtmd) loads.

Stock llama.cpp has no TinyLLaVA projector; the closest it runs is its llava graph
(`general.architecture = "clip"`, `clip.projector_type = "mlp"`, tools/mtmd/models/llava.cpp in
the llama.cpp that llama-cpp-python 0.3.36 vendors). What that graph can express decides what
this writer accepts, and what it cannot express is reported, never hidden (docs/architecture.md):

* Towers: SigLIP and CLIP (ViT with learned position embeddings). DINOv2 (layer scale,
  interpolated positions) has no counterpart.
* Connector: exactly `mlp2x_gelu` (the graph always runs `mm.0` -> GELU -> `mm.2`; `mm.2` is
  what mtmd reads the output width from), and llama.cpp's GELU is the tanh form where torch's
  `nn.GELU()` is exact erf: small, measurable differences.
* Feature layer: written explicitly as `clip.vision.feature_layer` (non-negative hidden-state
  indices), with only the blocks the selection needs. Without that key the graph runs
  `block_count - 1` blocks, which llama.cpp issue 25817 / PR 25845 proposes to change; with it
  the graph runs to the deepest listed layer either way.
* No `post_ln` (the graph would apply it to the selected layer) and no SigLIP head.
* Token selection: the graph keeps rows 1..N when a `class_embd` exists and all N otherwise. So
  a SigLIP model with the Factory's `patch` strategy gets one extra (first) token from stock
  llama.cpp, and every CLIP tower is hit by llama.cpp issue 25814 (the CLS token is appended
  after the patches: positions shift by one, patch 0 is dropped and the CLS row is projected).

The file is written to a temporary name beside the destination and renamed when complete.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from tinyllava_edge.atomic import atomic_file
from tinyllava_edge.data.preprocess import PreprocessConfig
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model.connector import connector_key

FTYPES: Mapping[str, int] = MappingProxyType({"f32": 0, "f16": 1})  # general.file_type (LLAMA_FTYPE_*)

# Tower state-dict names (below `vision_model.`) -> mmproj names, tools/mtmd/clip-impl.h TN_*.
_EMBEDDING_NAMES: Mapping[str, str] = MappingProxyType({
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",  # SigLIP only
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "embeddings.class_embedding": "v.class_embd",  # CLIP only
    "pre_layrnorm.weight": "v.pre_ln.weight",  # CLIP only
    "pre_layrnorm.bias": "v.pre_ln.bias",
})
_BLOCK_NAMES: Mapping[str, str] = MappingProxyType({
    "layer_norm1": "ln1",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
})
# Left out on purpose: the graph would apply post_ln to the selected features, and the SigLIP
# pooling head is not part of a LLaVA image encoder.
_DROPPED = re.compile(r"^(post_layernorm|head)\.")
_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_FFN = re.compile(r"\.ffn_(up|down)\.")
_FFN_SWAPPED: Mapping[str, str] = MappingProxyType({".ffn_up.": ".ffn_down.", ".ffn_down.": ".ffn_up."})
_CONNECTOR_NAMES: Mapping[str, str] = MappingProxyType({"0": "mm.0", "2": "mm.2"})

# Towers the llava graph can run, by the exact tower registry key.
MMPROJ_TOWERS = ("clip", "siglip")
MMPROJ_CONNECTORS = ("mlp2x_gelu",)
# Tower activation -> (clip.use_gelu, exact?). use_gelu selects ggml_gelu (tanh form); without
# it the graph uses quick GELU (clip.cpp load_hparams).
_ACTIVATIONS: Mapping[str, tuple[bool, bool]] = MappingProxyType({
    "gelu_pytorch_tanh": (True, True),
    "gelu_new": (True, True),
    "quick_gelu": (False, True),
    "gelu": (True, False),
})


def mmproj_tensor_name(name: str, n_blocks: int) -> str | None:
    """GGUF name of a tower weight (relative to `vision_model.`); None when left out on purpose.

    Blocks at or past `n_blocks` are left out (the selected feature layer does not need them).
    Raises KeyError for a name no rule covers.
    """
    if name in _EMBEDDING_NAMES:
        return _EMBEDDING_NAMES[name]
    if _DROPPED.match(name):
        return None
    match = _BLOCK.match(name)
    if match and match.group(2) in _BLOCK_NAMES:
        index = int(match.group(1))
        return None if index >= n_blocks else f"v.blk.{index}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
    raise KeyError(name)


def feature_layers(layer: int | list[int], n_layers: int) -> list[int]:
    """The checkpoint's `vision_feature_layer` as ascending hidden-state indices 0..n_layers.

    hidden_states[0] is the embedding output and hidden_states[i] the output of block i, as in
    transformers; the llava graph uses the same numbering for `clip.vision.feature_layer` (it
    keeps the input of block i for index i, and with 0 alone runs no block at all).
    """
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    indices = [i + n_layers + 1 if i < 0 else i for i in layers]
    if any(not 0 <= i <= n_layers for i in indices):
        raise TinyLlavaError(
            f"vision_feature_layer {layer!r} does not select a hidden state of a {n_layers}-layer tower; "
            "the mmproj needs indices 0..n_layers (or -n_layers-1..-1)"
        )
    if indices != sorted(set(indices)):
        # llama.cpp concatenates the listed layers in block order.
        raise TinyLlavaError(
            f"vision_feature_layer {layer!r} must list distinct layers in ascending order for the mmproj"
        )
    return indices


def plan_mmproj(model) -> dict:
    """Check that stock llama.cpp can express `model` and work out the keys; no file I/O."""
    from tinyllava_edge.model.vision import tower_for_config

    config = model.config
    vision = config.vision_config
    tower = tower_for_config(vision).key
    if tower not in MMPROJ_TOWERS:
        raise TinyLlavaError(
            f"vision tower {tower!r} cannot be written as a stock llama.cpp mmproj; "
            f"supported towers: {', '.join(MMPROJ_TOWERS)}"
        )
    if config.connector_type not in MMPROJ_CONNECTORS:
        raise TinyLlavaError(
            f"connector {config.connector_type!r} cannot be written as a stock llama.cpp mmproj (its "
            f"'mlp' projector always runs Linear -> GELU -> Linear); supported: {', '.join(MMPROJ_CONNECTORS)}"
        )
    act = vision.hidden_act
    if act not in _ACTIVATIONS:
        raise TinyLlavaError(
            f"vision tower activation {act!r} has no llama.cpp counterpart; supported: {', '.join(_ACTIVATIONS)}"
        )
    use_gelu, exact_act = _ACTIVATIONS[act]
    n_layers = vision.num_hidden_layers
    layers = feature_layers(config.vision_feature_layer, n_layers)
    strategy = config.vision_feature_select_strategy
    has_cls = tower == "clip"
    n_patches = (vision.image_size // vision.patch_size) ** 2
    # What the model computes vs what the llava graph returns (rows 1..N with a CLS, else all N).
    model_tokens = n_patches + (1 if has_cls else 0) - (1 if strategy == "patch" else 0)
    stock_tokens = n_patches
    preprocessing = PreprocessConfig.for_tower(vision.model_type, vision.image_size, config.image_aspect_ratio)

    deviations = [(
        "the connector's GELU is exact (erf) in PyTorch and the tanh approximation in llama.cpp, "
        "so embeddings differ slightly (about 5e-4 of the largest value on the test miniatures)"
    )]
    if not exact_act:
        deviations.append(
            f"the tower's {act!r} activation is exact (erf) GELU; llama.cpp runs the tanh approximation"
        )
    if tower == "siglip" and strategy == "patch":
        deviations.append(
            f"stock llama.cpp returns all {stock_tokens} patch tokens where the model was trained on "
            f"{model_tokens} (the Factory 'patch' strategy drops the first SigLIP patch, "
            "TinyLLaVA_Factory issue 203): the first stock row is extra"
        )
    if has_cls:
        deviations.append(
            "CLIP towers are computed wrongly by stock llama.cpp (llama.cpp issue 25814, fix PR 25844 "
            "unmerged): the CLS token is appended after the patches, so every patch gets its neighbour's "
            "position embedding, patch 0 is dropped and the CLS row goes to the LLM; use the ONNX vision graph"
        )
        if strategy == "cls_patch":
            deviations.append(
                f"the model keeps the CLS token ({model_tokens} tokens); the llava graph never returns it "
                f"({stock_tokens} tokens)"
            )
    if vision.intermediate_size == vision.hidden_size:
        deviations.append(
            "the tower's feed-forward width equals its hidden width, so the up/down weights are stored under "
            "each other's names for clip.cpp's legacy swap check; a llama.cpp without that check would misread them"
        )
    deviations.append(
        f"mtmd preprocesses images itself (letterbox onto (122, 116, 104), its own bicubic resize to "
        f"{vision.image_size} px) while the model uses {preprocessing.resize_mode!r} with aspect "
        f"{preprocessing.aspect!r}; pixels agree only for square images already {vision.image_size} px wide"
    )
    return {
        "tower": tower,
        "use_gelu": use_gelu,
        "feature_layer": layers,
        # At least one block: the graph runs no block for layer 0 alone, and a tower of zero
        # blocks has not been tried against mtmd's loader (one unused block is what the test checks).
        "block_count": max(1, max(layers)),
        "n_tokens_model": model_tokens,
        "n_tokens_stock": stock_tokens,
        "hidden": config.hidden_size,
        "preprocess": preprocessing,
        "deviations": deviations,
    }


def write_mmproj_gguf(model, out_path: str | os.PathLike, *, ftype: str = "f16", progress: bool = False) -> dict:
    """Write `model`'s tower + connector as a stock-llama.cpp mmproj (projector type `mlp`).

    `ftype` `f16` stores matrices in float16 and norms/biases in float32 (as llama.cpp's own
    converters do); `f32` stores everything in float32. Returns the path, size, the keys that
    decide the graph, and `deviations`: sentences naming where stock llama.cpp will not compute
    what the model computes. Raises TinyLlavaError, writing nothing, for a model it cannot express.
    """
    import gguf

    if ftype not in FTYPES:
        raise TinyLlavaError(f"mmproj ftype {ftype!r} is not supported; expected one of {', '.join(FTYPES)}")
    for part in ("vision_tower", "connector", "config"):
        if not hasattr(model, part):
            raise TinyLlavaError(f"write_mmproj_gguf needs a TinyLLaVA model; {type(model).__name__} has no {part}")
    plan = plan_mmproj(model)
    tensors = _collect_tensors(model, plan, ftype)

    vision = model.config.vision_config
    final = Path(out_path)
    if final.is_dir():
        raise TinyLlavaError(f"mmproj output path {final} is a directory; expected a file name such as mmproj-F16.gguf")
    with atomic_file(final) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="clip")
        try:
            writer.add_name(str(getattr(model.config, "_name_or_path", "") or "tinyllava") + " vision")
            writer.add_description("TinyLLaVA vision tower + connector for llama.cpp mtmd (tinyllava-edge)")
            writer.add_file_type(FTYPES[ftype])
            writer.add_string("clip.projector_type", "mlp")  # gguf has no constant for it
            writer.add_bool("clip.has_vision_encoder", True)
            writer.add_bool("clip.use_gelu", plan["use_gelu"])  # absent means quick GELU
            writer.add_uint32("clip.vision.image_size", vision.image_size)
            writer.add_uint32("clip.vision.patch_size", vision.patch_size)
            writer.add_uint32("clip.vision.embedding_length", vision.hidden_size)
            writer.add_uint32("clip.vision.feed_forward_length", vision.intermediate_size)
            writer.add_uint32("clip.vision.block_count", plan["block_count"])
            writer.add_uint32("clip.vision.projection_dim", plan["hidden"])
            writer.add_uint32("clip.vision.attention.head_count", vision.num_attention_heads)
            writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.layer_norm_eps)
            writer.add_array("clip.vision.image_mean", list(plan["preprocess"].image_mean))
            writer.add_array("clip.vision.image_std", list(plan["preprocess"].image_std))
            writer.add_array("clip.vision.feature_layer", plan["feature_layer"])
            for name, array in tensors.items():
                writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
        finally:
            writer.close()  # flushes the file before atomic_file renames it; after an error, releases it

    return {
        "path": str(final),
        "ftype": ftype,
        "size_bytes": final.stat().st_size,
        "n_tensors": len(tensors),
        "tower": plan["tower"],
        "block_count": plan["block_count"],
        "feature_layer": plan["feature_layer"],
        "use_gelu": plan["use_gelu"],
        "n_tokens_model": plan["n_tokens_model"],
        "n_tokens_stock": plan["n_tokens_stock"],
        "hidden": plan["hidden"],
        "deviations": plan["deviations"],
    }


def _collect_tensors(model, plan: dict, ftype: str) -> dict[str, np.ndarray]:
    """Every tensor of the mmproj, in GGUF names and storage types; unmapped names reported at once."""
    vision = model.config.vision_config
    inner = getattr(model.vision_tower._vision_tower, "vision_model", model.vision_tower._vision_tower)
    # clip.cpp load_tensors swaps ffn_up/ffn_down back for old files whose "ffn_down" has the
    # hidden width as its first ggml dim; with an FFN as wide as the hidden size that check fires
    # on correct files too, so store them the legacy way round for it to undo.
    swap_ffn = vision.intermediate_size == vision.hidden_size
    out: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    for name, tensor in inner.state_dict().items():
        if name.endswith("position_ids"):
            continue  # a buffer, derived
        try:
            gguf_name = mmproj_tensor_name(name, plan["block_count"])
        except KeyError:
            unmapped.append(name)
            continue
        if gguf_name is None:
            continue
        if swap_ffn:
            gguf_name = _FFN.sub(lambda m: _FFN_SWAPPED[m.group(0)], gguf_name)
        out[gguf_name] = _storage(tensor, ftype)
    if unmapped:
        raise TinyLlavaError(
            f"{len(unmapped)} vision tower weights have no mmproj name: {', '.join(sorted(unmapped)[:8])}"
        )
    linears = model.connector._connector
    if connector_key(model.config.connector_type) != "mlp{N}x_gelu" or len(linears) != 3:
        raise TinyLlavaError(f"connector {model.config.connector_type!r} is not a two-layer GELU MLP")
    for index, gguf_name in _CONNECTOR_NAMES.items():
        layer = linears[int(index)]
        out[f"{gguf_name}.weight"] = _storage(layer.weight, ftype)
        out[f"{gguf_name}.bias"] = _storage(layer.bias, ftype)
    return out


def _storage(tensor: torch.Tensor, ftype: str) -> np.ndarray:
    """float16 for matrices and the patch kernel under f16, float32 for everything 1-D."""
    array = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return array.astype(np.float16) if ftype == "f16" and array.ndim >= 2 else array
