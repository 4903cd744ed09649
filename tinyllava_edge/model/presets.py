"""Model presets as data, looked up by exact name.

`tiny-shapes` is the project's own default: the real architecture (SigLIP-style tower,
`mlp2x_gelu` connector, Llama-family LLM) at a size that trains on the shapes data on a laptop
CPU, with the LLM wide enough for GGUF K-quants to apply for real (they need rows that are a
multiple of 256: hidden 256, FFN 512). Its tower looks at 48-px images in 16-px patches: nine
image tokens, one per cell of the shapes grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model.configuration import TinyLlavaConfig


@dataclass(frozen=True)
class Preset:
    name: str
    text: Mapping[str, Any]
    vision: Mapping[str, Any]
    connector_type: str = "mlp2x_gelu"
    # Our own towers have no CLS token: keep every patch (`cls_patch`), unlike the released
    # SigLIP models that drop patch 0 (docs/architecture.md, facts).
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "cls_patch"
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Factor on the tower's position embeddings at random initialisation (1: the family's init).
    vision_position_scale: float = 1.0

    def init_weights(self, model) -> None:
        """Preset-specific changes to a freshly initialised model (before any training)."""
        if self.vision_position_scale == 1.0:
            return
        import torch

        tables = [m.position_embedding for m in model.vision_tower.modules()
                  if isinstance(getattr(m, "position_embedding", None), torch.nn.Embedding)]
        if len(tables) != 1:
            raise TinyLlavaError(f"preset {self.name!r} scales the tower's position embeddings, "
                                 f"but the tower has {len(tables)} position-embedding tables")
        with torch.no_grad():
            tables[0].weight.mul_(self.vision_position_scale)

    def part_names(self) -> tuple[str, str]:
        """The LLM's and the tower's names: TinyLLaVA_Factory picks its classes by a substring of each."""
        from tinyllava_edge.model.llm import family_for
        from tinyllava_edge.model.vision import tower_for_model_type

        llm_key = family_for(self.text["model_type"]).factory_key
        tower_key = tower_for_model_type(self.vision["model_type"]).factory_key
        return f"tinyllava-edge/{self.name}-{llm_key}", f"tinyllava-edge/{self.name}-{tower_key}"

    def config(self, vocab_size: int, **overrides: Any) -> TinyLlavaConfig:
        llm_name, vision_name = self.part_names()
        fields = dict(
            text_config={**self.text, "vocab_size": vocab_size},
            vision_config=dict(self.vision),
            connector_type=self.connector_type,
            llm_model_name_or_path=llm_name,
            vision_model_name_or_path=vision_name,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            image_aspect_ratio="square",
            **self.extra,
        )
        fields.update(overrides)
        return TinyLlavaConfig(**fields)


PRESETS: Mapping[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny-shapes",
            text={
                "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "hidden_act": "silu", "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
            },
            vision={
                "model_type": "siglip_vision_model", "hidden_size": 512, "intermediate_size": 2048,
                "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 48, "patch_size": 16,
                "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False,
            },
            # The tower stays at its seeded random initialisation (train/preset_recipes.py says
            # why), and the LLM reads its embedding output (layer 0: each patch's own pixels plus
            # its position), not its last layer: two random attention layers blend every cell into
            # every token, and the LLM then never learns to find an object by colour and shape.
            # Position embeddings x16 (norm ~16 against ~11 for a patch with an object in it), so
            # each token says which cell it is: the cell is what the lookups read out.
            vision_feature_layer=0,
            vision_position_scale=16.0,
            extra={"tokenizer_model_max_length": 512, "pad_token": "<pad>", "pad_token_id": 3},
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise TinyLlavaError(f"{name!r} is not a known preset; known: {', '.join(sorted(PRESETS))}") from None
