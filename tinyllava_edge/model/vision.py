"""Vision towers: a registry with exact keys, chosen by `vision_config.model_type`.

Each tower wraps a transformers vision model so that the state-dict names are the ones every
released checkpoint uses (saved by transformers 4.x): `vision_tower._vision_tower.vision_model.…`
for SigLIP and CLIP (transformers 5 dropped that `vision_model.` level inside `SiglipVisionModel`
/ `CLIPVisionModel`, so we keep it ourselves), `vision_tower._vision_tower.…` for DINOv2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedConfig

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry


@dataclass(frozen=True)
class TowerSpec:
    key: str
    config_model_type: str  # exact `vision_config.model_type`
    build: Callable[[PreTrainedConfig], nn.Module]
    has_cls_token: bool
    # The substring TinyLLaVA_Factory's VisionTowerFactory looks for in `vision_model_name_or_path`
    factory_key: str


VISION_TOWERS: Registry[TowerSpec] = Registry("vision tower")


class _VisionModelHolder(nn.Module):
    """Keeps the 4.x `vision_model.` level in the parameter names."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.vision_model = inner

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True):
        return self.vision_model(pixel_values=pixel_values, output_hidden_states=output_hidden_states)


def _siglip(config: PreTrainedConfig) -> nn.Module:
    from transformers import SiglipVisionModel

    return _VisionModelHolder(SiglipVisionModel(config))


def _clip(config: PreTrainedConfig) -> nn.Module:
    from transformers import CLIPVisionModel

    return _VisionModelHolder(CLIPVisionModel(config))


def _dinov2(config: PreTrainedConfig) -> nn.Module:
    from transformers import Dinov2Model

    return Dinov2Model(config)


VISION_TOWERS.add("siglip", TowerSpec("siglip", "siglip_vision_model", _siglip, has_cls_token=False, factory_key="siglip"))
VISION_TOWERS.add("clip", TowerSpec("clip", "clip_vision_model", _clip, has_cls_token=True, factory_key="clip"))
VISION_TOWERS.add("dinov2", TowerSpec("dinov2", "dinov2", _dinov2, has_cls_token=True, factory_key="dinov2"))


def tower_for_config(vision_config: PreTrainedConfig) -> TowerSpec:
    """The registered tower whose config model_type is exactly `vision_config.model_type`."""
    return tower_for_model_type(getattr(vision_config, "model_type", None))


def tower_for_model_type(model_type: str | None) -> TowerSpec:
    for key in VISION_TOWERS:
        spec = VISION_TOWERS.get(key)
        if spec.config_model_type == model_type:
            return spec
    known = ", ".join(VISION_TOWERS.get(k).config_model_type for k in VISION_TOWERS)
    raise TinyLlavaError(f"unknown vision tower model_type {model_type!r}; known: {known}")


def select_features(
    hidden_states: tuple[torch.Tensor, ...], layer: int | list[int], strategy: str
) -> torch.Tensor:
    """Factory feature selection: hidden_states[layer], then `patch` drops token 0.

    hidden_states: (embeddings, layer_1, ..., layer_L), each (B, T, C); a list of layers is
    concatenated on C (as HF LLaVA does). Returns (B, T or T-1, C').
    """
    if isinstance(layer, (list, tuple)):
        features = torch.cat([hidden_states[i] for i in layer], dim=-1)
    else:
        features = hidden_states[layer]
    if strategy == "patch":
        return features[:, 1:]
    if strategy == "cls_patch":
        return features
    raise TinyLlavaError(f"unknown vision_feature_select_strategy {strategy!r}; known: cls_patch, patch")


class VisionTower(nn.Module):
    """pixel_values (B, 3, H, W) -> selected hidden states (B, N, C_vision)."""

    def __init__(self, vision_config: PreTrainedConfig):
        super().__init__()
        self.spec = tower_for_config(vision_config)
        self._vision_tower = self.spec.build(vision_config)

    def forward(self, pixel_values: torch.Tensor, layer: int | list[int], strategy: str) -> torch.Tensor:
        out = self._vision_tower(pixel_values, output_hidden_states=True)
        return select_features(out.hidden_states, layer, strategy)

    @property
    def encoder_layers(self) -> nn.ModuleList:
        inner = getattr(self._vision_tower, "vision_model", self._vision_tower)
        encoder = inner.encoder
        return encoder.layers if hasattr(encoder, "layers") else encoder.layer
