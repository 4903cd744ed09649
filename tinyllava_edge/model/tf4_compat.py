"""What a transformers 4.x reader needs in the checkpoints we write (TinyLLaVA_Factory pins 4.40.1).

transformers 5 moved settings that change what a model computes, and a 4.x reader that does not
find them where it looks silently falls back to its defaults (docs/interop.md lists them):

* RoPE: 5.x writes `text_config.rope_parameters` (`rope_theta`, `partial_rotary_factor`,
  `rope_type` and the scaling settings); 4.x reads the flat `rope_theta`,
  `partial_rotary_factor` and `rope_scaling`. Phi-2 read by 4.40 without them rotates half of
  each head instead of 40 %, Qwen2 uses theta 10 000 instead of 1 000 000.
* dtype: 5.x writes `dtype`, 4.x reads `torch_dtype`.
* SigLIP's pooling head: 5.x builds it only with `vision_use_head`, 4.x always builds it. A
  tower without one gets a zero placeholder in the file, so a 4.x reader finds every weight;
  the head's pooled output is never read (features come from the hidden states).
* DINOv2's weight names: 5.x renamed the attention (`attention.attention.query` ->
  `attention.q_proj`, ..., `attention.output.dense` -> `attention.o_proj`) and split the SwiGLU
  input projection (`mlp.weights_in` -> `mlp.gate_proj` + `mlp.up_proj`, `mlp.weights_out` ->
  `mlp.down_proj`). Files keep the 4.x names, as every released checkpoint has them (and as
  SigLIP/CLIP keep their 4.x `vision_model.` level, vision.py).

`add_4x_keys` writes the 4.x config spellings beside the 5.x ones with the same values;
`drop_4x_keys` removes them again when we read our own files, so that transformers 5 builds
exactly the config it wrote. `dinov2_to_4x` / `dinov2_from_4x` map the tower's weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

# rope_parameters entries that 4.x keeps as top-level keys of the LLM config
_FLAT_ROPE = ("rope_theta", "partial_rotary_factor")
# the scalings 4.40 reads, as exactly {"type": ..., "factor": ...}; others it cannot compute
_SCALINGS_4_40 = ("linear", "dynamic")
HEAD_PREFIX = "vision_model.head."


def _rope_scaling(rope: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    rest = {k: v for k, v in rope.items() if k not in _FLAT_ROPE and k != "rope_type"}
    if kind in _SCALINGS_4_40 and set(rest) == {"factor"}:
        return {"type": kind, "factor": rest["factor"]}
    # Later 4.x spelling; 4.40 refuses it with an error rather than computing something else.
    return {"type": kind, "rope_type": kind, **rest}


def _add_to_llm_config(text: dict[str, Any]) -> None:
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        for key in _FLAT_ROPE:
            if key in rope:
                text[key] = rope[key]
        text["rope_scaling"] = _rope_scaling(rope)
    if "dtype" in text:
        text["torch_dtype"] = text["dtype"]


def add_4x_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Add the transformers 4.x spellings to a Factory config dict written by 5.x (in place)."""
    if "dtype" in raw:
        raw["torch_dtype"] = raw["dtype"]
    if isinstance(raw.get("text_config"), dict):
        _add_to_llm_config(raw["text_config"])
    vision = raw.get("vision_config")
    if isinstance(vision, dict) and "dtype" in vision:
        vision["torch_dtype"] = vision["dtype"]
    return raw


def drop_4x_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Remove the 4.x spellings that `add_4x_keys` wrote (in place); 4.x-only configs are left alone.

    A flat RoPE value that differs from `rope_parameters` was changed by a 4.x writer (the
    Factory carries our `rope_parameters` along as an unknown key when it saves a config it read
    from us): 4.x computed with the flat one, so it wins.
    """
    for part in (raw, raw.get("text_config"), raw.get("vision_config")):
        if not isinstance(part, dict):
            continue
        if "dtype" in part:
            part.pop("torch_dtype", None)
        rope = part.get("rope_parameters")
        if isinstance(rope, dict):
            for key in _FLAT_ROPE:
                if key in part:
                    rope[key] = part.pop(key)
            part.pop("rope_scaling", None)
    return raw


def siglip_head_placeholder(vision_config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero tensors named and shaped as the pooling head 4.x's SiglipVisionModel always builds.

    Names are relative to the tower (`vision_model.head.*`); shapes come from transformers' own
    head class, built on the meta device (no memory, no initialisation).
    """
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    with torch.device("meta"):
        head = SiglipMultiheadAttentionPoolingHead(vision_config)
    return {HEAD_PREFIX + k: torch.zeros(v.shape, dtype=dtype) for k, v in head.state_dict().items()}


# (4.x name piece, 5.x name piece) inside a DINOv2 tower
_DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".mlp.weights_out.", ".mlp.down_proj."),
)
_SWIGLU_IN, _SWIGLU_GATE, _SWIGLU_UP = ".mlp.weights_in.", ".mlp.gate_proj.", ".mlp.up_proj."


def _rename(name: str, pairs) -> str:
    for old, new in pairs:
        if old in name:
            return name.replace(old, new)
    return name


def dinov2_to_4x(tower: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINOv2 tower's weights (names relative to the tower) from 5.x's names to 4.x's."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tower.items():
        if _SWIGLU_UP in name:
            continue  # joined with its gate below
        if _SWIGLU_GATE in name:
            # 4.x runs one projection and splits its output in two halves: gate first, then up
            out[name.replace(_SWIGLU_GATE, _SWIGLU_IN)] = torch.cat([tensor, tower[name.replace(_SWIGLU_GATE, _SWIGLU_UP)]])
        else:
            out[_rename(name, [(new, old) for old, new in _DINOV2_RENAMES])] = tensor
    return out


def dinov2_from_4x(tower: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `dinov2_to_4x`; names already in 5.x's spelling pass unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tower.items():
        if _SWIGLU_IN in name:
            gate, up = tensor.chunk(2, dim=0)
            out[name.replace(_SWIGLU_IN, _SWIGLU_GATE)], out[name.replace(_SWIGLU_IN, _SWIGLU_UP)] = gate, up
        else:
            out[_rename(name, _DINOV2_RENAMES)] = tensor
    return out
