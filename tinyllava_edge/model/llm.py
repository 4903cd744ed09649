"""LLM families, keyed exactly by `text_config.model_type` (never by a substring of a path).

The causal-LM module itself is transformers' own class for that model_type
(`AutoModelForCausalLM.from_config`), so the weight names are the LLM's own HF names under
`language_model.`. Each family's default chat template lives with the templates
(`tinyllava_edge.data.template.FAMILY_TEMPLATES`), which the torch-free runtime also reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyllava_edge.registry import Registry


@dataclass(frozen=True)
class LLMFamily:
    model_type: str  # exact text_config.model_type
    example: str  # a released LLM of this family, for messages and docs
    # The substring TinyLLaVA_Factory's LLMFactory looks for in `llm_model_name_or_path` to pick
    # its class for this family (its tinyllava/model/llm/*.py register one each).
    factory_key: str
    # TinyLLaVA_Factory's tokenizer post-load (tinyllava/model/llm/*.py): pad := unk for phi,
    # tinyllama and gemma; qwen2 sets unk := pad; stablelm keeps its tokenizer as is.
    pad_from_unk: bool
    unk_from_pad: bool = False
    # Gemma multiplies its input embeddings by sqrt(hidden). transformers 4.x, which the Factory
    # trained with, did it to the whole inputs_embeds (image rows included); transformers 5 moved
    # it into the token-embedding module, so the image rows must get it here to match.
    scale_image_features: bool = False


LLM_FAMILIES: Registry[LLMFamily] = Registry("LLM family")

for _family in (
    LLMFamily("llama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", pad_from_unk=True, factory_key="tinyllama"),
    LLMFamily("qwen2", "Qwen/Qwen2-0.5B", pad_from_unk=False, unk_from_pad=True, factory_key="qwen2"),
    LLMFamily("phi", "microsoft/phi-2", pad_from_unk=True, factory_key="phi"),
    LLMFamily("stablelm", "stabilityai/stablelm-2-zephyr-1_6b", pad_from_unk=False, factory_key="stablelm"),
    LLMFamily("gemma", "google/gemma-2b-it", pad_from_unk=True, scale_image_features=True, factory_key="gemma"),
):
    LLM_FAMILIES.add(_family.model_type, _family)


def family_for(model_type: str) -> LLMFamily:
    return LLM_FAMILIES.get(model_type)
