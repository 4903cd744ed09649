"""What transformers 4.x readers (TinyLLaVA_Factory's 4.40.1) need in the checkpoints we write.

The 4.x spellings of the config (flat RoPE keys, `rope_scaling`, `torch_dtype`) are written beside
5.x's with the same values and dropped again when we read the file; SigLIP towers without a
pooling head get a zero placeholder that 4.x fills and we drop; DINOv2 weights keep their 4.x
names; tokenizer.json keeps BPE merges in the form tokenizers 0.19 reads; the default model's part
names pick the Factory's classes. Whether transformers 4.40 then computes what we compute is
tests/test_tf440.py (in .venv-tf440) and benchmarks/factory_crosscheck.py (the Factory's own code).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer, save_tokenizer
from tinyllava_edge.model.presets import PRESETS, get_preset
from tinyllava_edge.model.tf4_compat import add_4x_keys, dinov2_from_4x, dinov2_to_4x, drop_4x_keys
from tinyllava_edge.testing.checkpoints import miniature_config, random_model
from tinyllava_edge.testing.interop import FAMILIES, TOWERS
from tinyllava_edge.tokenizer_json import write_legacy_merges

VOCAB = 256
# TinyLLaVA_Factory's registries: the substrings its LLMFactory / VisionTowerFactory look for
FACTORY_LLM_KEYS = ("gemma", "openelm", "phi", "qwen2", "stablelm", "tinyllama")
FACTORY_TOWER_KEYS = ("clip", "dinov2", "mof", "siglip")
HEAD = "vision_tower._vision_tower.vision_model.head."


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _saved(tmp_path, model):
    model.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_flat_keys_are_written_with_equal_values(family, tmp_path):
    raw = _saved(tmp_path, random_model(miniature_config(family, "siglip", VOCAB)))
    text, rope = raw["text_config"], raw["text_config"]["rope_parameters"]
    assert text["rope_theta"] == rope["rope_theta"]
    if family in ("phi", "stablelm"):
        assert text["partial_rotary_factor"] == rope["partial_rotary_factor"] in (0.4, 0.25)
    else:
        assert "partial_rotary_factor" not in text
    assert text["rope_scaling"] is None  # the default rotation, as 4.x writes it
    assert raw["torch_dtype"] == raw["dtype"] == "float32"


def test_the_values_are_the_released_ones(tmp_path):
    # the two that 4.40's defaults get wrong: Phi-2 rotates 40 % of a head (4.40: 50 %), Qwen2's theta is 1e6
    phi = _saved(tmp_path / "phi", random_model(miniature_config("phi", "siglip", VOCAB)))["text_config"]
    qwen = _saved(tmp_path / "qwen", random_model(miniature_config("qwen2", "siglip", VOCAB)))["text_config"]
    assert phi["partial_rotary_factor"] == 0.4 and qwen["rope_theta"] == 1_000_000.0


@pytest.mark.parametrize("rope, scaling", [
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, {"type": "linear", "factor": 2.0}),
    ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}, {"type": "dynamic", "factor": 4.0}),
    # a scaling 4.40 cannot compute keeps its settings; 4.40 refuses it (more than type + factor)
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 2048},
     {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),
])
def test_rope_scaling_in_the_4x_spelling(rope, scaling):
    raw = add_4x_keys({"text_config": {"rope_parameters": rope}})
    assert raw["text_config"]["rope_scaling"] == scaling and raw["text_config"]["rope_theta"] == 1e4
    assert drop_4x_keys(raw) == {"text_config": {"rope_parameters": rope}}


def test_a_4x_config_keeps_its_own_keys():
    # files written by 4.x (the Factory's) have no rope_parameters: nothing to drop
    raw = {"text_config": {"rope_theta": 1e6, "partial_rotary_factor": 0.4, "torch_dtype": "float16"}}
    assert drop_4x_keys(json.loads(json.dumps(raw))) == raw


@pytest.mark.parametrize("family, tower", [("phi", "siglip"), ("qwen2", "clip"), ("gemma", "dinov2")])
def test_reading_our_files_back_is_unchanged(family, tower, tmp_path):
    model = random_model(miniature_config(family, tower, VOCAB))
    model.save_pretrained(tmp_path)
    again = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    ours, theirs = model.config.to_dict(), again.config.to_dict()
    assert {k for k in ours if ours[k] != theirs.get(k)} <= {"_name_or_path"}
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_scaled_rope_reads_back_unchanged(tmp_path):
    config = miniature_config("llama", "siglip", VOCAB)
    config.text_config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    raw = _saved(tmp_path, random_model(config))
    assert raw["text_config"]["rope_scaling"] == {"type": "linear", "factor": 2.0}
    again = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.text_config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


# -- the default model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_names_pick_one_factory_class_each(name):
    from tinyllava_edge.model.llm import family_for
    from tinyllava_edge.model.vision import tower_for_model_type

    preset = get_preset(name)
    config = preset.config(VOCAB)
    llm, vision = config.llm_model_name_or_path.lower(), config.vision_model_name_or_path.lower()
    assert [k for k in FACTORY_LLM_KEYS if k in llm] == [family_for(preset.text["model_type"]).factory_key]
    assert [k for k in FACTORY_TOWER_KEYS if k in vision] == [tower_for_model_type(preset.vision["model_type"]).factory_key]
    assert config.tokenizer_name_or_path == config.llm_model_name_or_path


def test_the_default_model_is_written_with_the_head_4x_builds(tmp_path):
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    preset = get_preset("tiny-shapes")
    model = TinyLlavaForConditionalGeneration(preset.config(VOCAB)).eval()
    preset.init_weights(model)
    assert not any(k.startswith(HEAD) for k in model.state_dict())  # our tower has none
    raw = _saved(tmp_path, model)
    assert raw["vision_config"]["vision_use_head"] is False
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        head = {k[len(HEAD):]: f.get_tensor(k) for k in f.keys() if k.startswith(HEAD)}
    expected = SiglipMultiheadAttentionPoolingHead(model.config.vision_config).state_dict()
    assert {k: tuple(v.shape) for k, v in head.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(not v.any() for v in head.values())
    again = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.vision_config.vision_use_head is False
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_head_without_the_config_key_follows_the_weights(tmp_path):
    # 4.x-written Factory configs never say vision_use_head: the weights decide
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["vision_config"]["vision_use_head"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert TinyLlavaForConditionalGeneration.from_pretrained(tmp_path).config.vision_config.vision_use_head is True
    tensors = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items() if not k.startswith(HEAD)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert TinyLlavaForConditionalGeneration.from_pretrained(tmp_path).config.vision_config.vision_use_head is False


# -- DINOv2 weight names -----------------------------------------------------------------------------------

def _dinov2(swiglu: bool):
    config = miniature_config("llama", "dinov2", VOCAB)
    config.vision_config.use_swiglu_ffn = swiglu
    return random_model(config)


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_is_written_with_the_4x_names(swiglu, tmp_path):
    model = _dinov2(swiglu)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    layer = "vision_tower._vision_tower.encoder.layer.0."
    assert {layer + "attention.attention.query.weight", layer + "attention.output.dense.bias"} <= names
    assert not any(".q_proj." in n or ".o_proj." in n or "gate_proj" in n for n in names if "vision_tower" in n)
    assert (layer + "mlp.weights_in.weight" in names) == swiglu
    again = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_swiglu_halves_are_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    joined = dinov2_to_4x({"encoder.layer.0.mlp.gate_proj.weight": gate, "encoder.layer.0.mlp.up_proj.weight": up})
    assert torch.equal(joined["encoder.layer.0.mlp.weights_in.weight"], torch.cat([gate, up]))
    back = dinov2_from_4x(joined)
    assert torch.equal(back["encoder.layer.0.mlp.gate_proj.weight"], gate)
    assert torch.equal(back["encoder.layer.0.mlp.up_proj.weight"], up)


def test_dinov2_files_with_5x_names_still_read(tmp_path):
    # what this project wrote before it kept the 4.x names
    model = _dinov2(False)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tower = "vision_tower._vision_tower."
    renamed = {**{k: v for k, v in tensors.items() if not k.startswith(tower)},
               **{tower + k: v for k, v in dinov2_from_4x({k[len(tower):]: v for k, v in tensors.items()
                                                           if k.startswith(tower)}).items()}}
    assert any(".q_proj." in k for k in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    again = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


# -- tokenizer.json ------------------------------------------------------------------------------------------

def test_tokenizers_we_save_keep_string_merges(tmp_path):
    from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer

    train_shapes_tokenizer(tmp_path / "tok", vocab_size=300)
    merges = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
    tokenizer = load_tokenizer(tmp_path / "tok", model_type="llama")
    save_tokenizer(tokenizer, tmp_path / "saved")  # transformers 5 writes pairs; we rewrite them
    merges = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())["model"]["merges"]
    assert all(isinstance(m, str) for m in merges)
    # 5.x's own name for the class is unknown to 4.x; both know this one
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    again = load_tokenizer(tmp_path / "saved", model_type="llama")
    text = "What colour is the square at the top left?"
    assert type(again) is type(tokenizer) and again.encode(text) == tokenizer.encode(text)


def test_merges_with_a_space_stay_pairs(tmp_path):
    path = tmp_path / "tokenizer.json"
    doc = {"model": {"type": "BPE", "merges": [["a b", "c"], ["d", "e"]]}}
    path.write_text(json.dumps(doc))
    assert write_legacy_merges(path) is False
    assert json.loads(path.read_text()) == doc
    doc["model"]["merges"] = [["a", "b"], ["ab", "c"]]
    path.write_text(json.dumps(doc))
    assert write_legacy_merges(path) is True
    assert json.loads(path.read_text())["model"]["merges"] == ["a b", "ab c"]
