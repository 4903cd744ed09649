"""The TinyLLaVA model framework (needs the `torch` extra).

Importing this package registers `tinyllava` with transformers' Auto classes, locally: no
`trust_remote_code` is ever needed for our checkpoints.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tinyllava_edge.model.checkpoint import KNOWN_TOWERS, LEGACY_FAMILIES, read_checkpoint, save_checkpoint
from tinyllava_edge.model.configuration import TinyLlavaConfig
from tinyllava_edge.model.connector import CONNECTORS
from tinyllava_edge.model.llm import LLM_FAMILIES, family_for
from tinyllava_edge.model.modeling import TinyLlavaForConditionalGeneration, TinyLlavaPreTrainedModel
from tinyllava_edge.model.tokenizer import load_tokenizer, save_tokenizer
from tinyllava_edge.model.vision import VISION_TOWERS

AutoConfig.register(TinyLlavaConfig.model_type, TinyLlavaConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyLlavaConfig, TinyLlavaForConditionalGeneration, exist_ok=True)

__all__ = [
    "CONNECTORS",
    "KNOWN_TOWERS",
    "LEGACY_FAMILIES",
    "LLM_FAMILIES",
    "VISION_TOWERS",
    "TinyLlavaConfig",
    "TinyLlavaForConditionalGeneration",
    "TinyLlavaPreTrainedModel",
    "family_for",
    "load_tokenizer",
    "read_checkpoint",
    "save_checkpoint",
    "save_tokenizer",
]
