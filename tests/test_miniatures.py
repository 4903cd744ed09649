"""Miniatures of every released model: they load, tokenize with their family's template, run."""

import json

import pytest
import torch

from tinyllava_edge.constants import IMAGE_TOKEN_INDEX
from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
from tinyllava_edge.data.template import default_template_for_family, get_template
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer
from tinyllava_edge.testing.checkpoints import MINIATURES, build_miniature
from tinyllava_edge.testing.tokenizers import get_kind


@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_miniature_loads_and_answers(name, tmp_path):
    from PIL import Image

    spec = MINIATURES[name]
    build_miniature(name, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    expected_type = {"factory": "tinyllava", "hf_llava": "llava"}.get(spec.layout)
    assert raw["model_type"] == expected_type if expected_type else raw["model_type"].startswith("tiny_llava")

    model = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert model.checkpoint_layout == spec.layout
    assert model.config.llm_family == spec.family
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token is not None
    template = get_template(default_template_for_family(spec.family))
    encoded = template.encode([{"from": "human", "value": "<image>\nWhat shape is it?"}], tokenizer, mode="eval")
    ids = encoded["input_ids"]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and encoded["prompt"].endswith("ASSISTANT:")

    size = model.config.vision_config.image_size
    pre = PreprocessConfig.for_tower(model.config.vision_config.model_type, size, model.config.image_aspect_ratio)
    pixels = torch.from_numpy(preprocess(Image.new("RGB", (40, 24), (200, 30, 30)), pre))
    assert pixels.shape == (1, 3, size, size)
    out = model.generate(torch.tensor([ids]), images=pixels, max_new_tokens=4, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 4
    assert max(out[0].tolist()) < model.config.text_config.vocab_size


def test_miniature_tokenizer_kind_matches_the_release(tmp_path):
    build_miniature("TinyLLaVA-StableLM-2-SigLIP", tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    # Arcade100k splits digits one by one; loaded without the StableLM config, transformers 5
    # would rebuild the files with GPT-2's split rule.
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("abc 12345")
    assert [p for p, _ in pieces][-5:] == ["1", "2", "3", "4", "5"]
    assert get_kind("stablelm2").ggml_pre == "stablelm2"


@pytest.mark.parametrize("family, pad", [("phi", "<|endoftext|>"), ("llama", "<unk>"), ("gemma", "<unk>")])
def test_factory_pad_convention(family, pad, tmp_path):
    name = {"phi": "TinyLLaVA-Phi-2-SigLIP-3.1B", "llama": "TinyLLaVA-TinyLlama-SigLIP",
            "gemma": "TinyLLaVA-Gemma-SigLIP-2.4B"}[family]
    build_miniature(name, tmp_path)
    assert load_tokenizer(tmp_path).pad_token == pad


def test_unknown_miniature(tmp_path):
    with pytest.raises(TinyLlavaError, match="TinyLLaVA-Phi-2-SigLIP-3.1B"):
        build_miniature("TinyLLaVA-Mistral", tmp_path)
