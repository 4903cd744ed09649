"""`TinyLlavaConfig`: the one config object that travels with every checkpoint.

The keys are TinyLLaVA_Factory's (tinyllava/model/configuration_tinyllava.py), so a Factory
`config.json` reads back here and ours reads in the Factory. Unlike the Factory, constructing a
config does no I/O: the LLM and vision configs are the nested `text_config` / `vision_config`
dicts, never fetched from `llm_model_name_or_path` (those names are kept as provenance only).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from tinyllava_edge.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

SELECT_STRATEGIES = ("patch", "cls_patch")
ASPECT_RATIOS = ("square", "pad")


class TinyLlavaConfig(PreTrainedConfig):
    model_type = "tinyllava"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
    }

    # Provenance: where the parts came from (never read at construction time).
    llm_model_name_or_path: str = ""
    tokenizer_name_or_path: str | None = None
    vision_model_name_or_path: str = ""
    vision_model_name_or_path2: str = ""

    connector_type: str = "mlp2x_gelu"
    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    hidden_size: int | None = None  # LLM width, mirrored from text_config
    vocab_size: int | None = None
    vision_hidden_size: int | None = None  # tower width, mirrored from vision_config

    ignore_index: int = IGNORE_INDEX
    image_token_index: int = IMAGE_TOKEN_INDEX
    pad_token: str | None = None
    pad_token_id: int | None = None
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int = 2048
    tokenizer_use_fast: bool = False

    # Factory semantics: hidden_states[vision_feature_layer]; `patch` drops token 0 (even for
    # SigLIP, which has no CLS: 728 tokens for SigLIP-384/14, TinyLLaVA_Factory issue 203),
    # `cls_patch` keeps every token.
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "patch"
    image_aspect_ratio: str = "square"
    # Whether image rows get the LLM's input-embedding scale (Gemma's sqrt(hidden)). None: the
    # family's rule (model/llm.py), what the Factory trained with; False: never, as transformers 5's
    # and vLLM's LLaVA add them (set when reading the HF LLaVA layout).
    scale_image_features: bool | None = None

    resampler_hidden_size: int | None = None
    num_queries: int | None = None
    num_resampler_layers: int | None = None
    use_cache: bool = True
    cache_dir: str | None = None

    tune_type_llm: str = "frozen"
    tune_type_connector: str = "frozen"
    tune_type_vision_tower: str = "frozen"
    tune_vision_tower_from_layer: int = -1

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # Factory configs always store these two as the constants, whatever was passed.
        self.ignore_index = IGNORE_INDEX
        self.image_token_index = IMAGE_TOKEN_INDEX
        if self.tokenizer_name_or_path is None:
            self.tokenizer_name_or_path = self.llm_model_name_or_path
        self.hidden_size = getattr(self.text_config, "hidden_size", None)
        self.vocab_size = getattr(self.text_config, "vocab_size", None)
        self.vision_hidden_size = getattr(self.vision_config, "hidden_size", None)
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not "
                f"one of {', '.join(SELECT_STRATEGIES)}"
            )

    @property
    def llm_family(self) -> str:
        """The LLM family key: exactly `text_config.model_type`."""
        return self.text_config.model_type
