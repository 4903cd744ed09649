"""The three checkpoint layouts: the same weights saved in each give the logits of that layout's
own forward, checked against references that do not use our splicing or feature-selection code.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, SiglipVisionModel, CLIPVisionModel

from tinyllava_edge.constants import IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import CheckpointError, TinyLlavaError
from tinyllava_edge.model import TinyLlavaForConditionalGeneration
from tinyllava_edge.testing.checkpoints import miniature_config, random_model, write_layout

VOCAB = 96
PROMPT = [1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9]


def _image(config, seed=0):
    size = config.vision_config.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference_logits(model, image, layer, keep_first, n_layers=None):
    """LLaVA forward written out by hand from the HF parts' own modules and the raw weights."""
    state = model.state_dict()
    vision_cfg = model.config.vision_config.to_dict()
    if n_layers is not None:
        vision_cfg["num_hidden_layers"] = n_layers
    tower_cls = SiglipVisionModel if vision_cfg["model_type"] == "siglip_vision_model" else CLIPVisionModel
    tower = tower_cls(type(model.config.vision_config).from_dict(vision_cfg)).eval()
    prefix = "vision_tower._vision_tower.vision_model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
    with torch.no_grad():
        hidden = tower(pixel_values=image, output_hidden_states=True).hidden_states[layer]
        feats = hidden if keep_first else hidden[:, 1:]
        x = F.linear(feats, state["connector._connector.0.weight"], state["connector._connector.0.bias"])
        x = F.linear(F.gelu(x), state["connector._connector.2.weight"], state["connector._connector.2.bias"])
        llm = AutoModelForCausalLM.from_config(model.config.text_config).eval()
        llm.load_state_dict({k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}, strict=False)
        llm.tie_weights()
        cut = PROMPT.index(IMAGE_TOKEN_INDEX)
        emb = llm.get_input_embeddings()
        before, after = emb(torch.tensor([PROMPT[:cut]])), emb(torch.tensor([PROMPT[cut + 1:]]))
        return llm(inputs_embeds=torch.cat([before, x, after], dim=1)).logits


def _our_logits(path, image):
    model = TinyLlavaForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        return model, model(input_ids=torch.tensor([PROMPT]), images=image).logits


@pytest.mark.parametrize("family, tower", [("phi", "siglip"), ("qwen2", "siglip"), ("llama", "clip"), ("stablelm", "siglip")])
def test_factory_layout_matches_its_reference(family, tower, tmp_path):
    model = random_model(miniature_config(family, tower, VOCAB))
    image = _image(model.config)
    write_layout(model, tmp_path, "factory")
    loaded, ours = _our_logits(tmp_path, image)
    assert loaded.checkpoint_layout == "factory"
    reference = _reference_logits(model, image, layer=-2, keep_first=False)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["phi", "llama", "stablelm", "qwen2"])
def test_legacy_siglip_runs_the_layers_present_and_keeps_every_token(family, tmp_path):
    model = random_model(miniature_config(family, "siglip", VOCAB))
    image = _image(model.config)
    write_layout(model, tmp_path, "legacy")  # drops the tower's last layer, as released
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"].startswith("tiny_llava") and "mm_projector_type" in raw
    loaded, ours = _our_logits(tmp_path, image)
    assert loaded.checkpoint_layout == "legacy"
    n = model.config.vision_config.num_hidden_layers
    assert loaded.config.vision_config.num_hidden_layers == n - 1
    # legacy: last hidden state of the n-1 layers kept, all 16 tokens (none dropped)
    reference = _reference_logits(model, image, layer=-1, keep_first=True, n_layers=n - 1)
    assert ours.shape[1] == len(PROMPT) - 1 + 16
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    # ... which is not what the Factory layout of the same weights computes
    factory = _reference_logits(model, image, layer=-2, keep_first=False)
    assert factory.shape != ours.shape


def test_legacy_clip_uses_select_layer_and_feature(tmp_path):
    model = random_model(miniature_config("llama", "clip", VOCAB))
    image = _image(model.config)
    write_layout(model, tmp_path, "legacy")
    _, ours = _our_logits(tmp_path, image)
    torch.testing.assert_close(ours, _reference_logits(model, image, layer=-2, keep_first=False), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_hf_llava_layout_matches_transformers_llava(tower, tmp_path):
    model = random_model(miniature_config("llama", tower, VOCAB))
    image = _image(model.config)
    image_token = VOCAB - 1
    write_layout(model, tmp_path, "hf_llava", image_token_id=image_token)
    loaded, ours = _our_logits(tmp_path, image)
    assert loaded.checkpoint_layout == "hf_llava"
    reference_model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    n = loaded.encode_images(image).shape[1]
    cut = PROMPT.index(IMAGE_TOKEN_INDEX)
    hf_ids = PROMPT[:cut] + [image_token] * n + PROMPT[cut + 1:]
    with torch.no_grad():
        reference = reference_model(input_ids=torch.tensor([hf_ids]), pixel_values=image).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_hf_llava_transformers5_names(tmp_path):
    # transformers 5's module names: model.language_model.* / lm_head.* / model.vision_tower.*
    # (without the `vision_model.` level), as a file saved from its state_dict has them.
    from safetensors.torch import save_file

    model = random_model(miniature_config("llama", "siglip", VOCAB))
    image_token = VOCAB - 1
    write_layout(model, tmp_path / "v4", "hf_llava", image_token_id=image_token)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "v4")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert any(k.startswith("model.vision_tower.embeddings.") for k in state)
    (tmp_path / "v5").mkdir()
    save_file(state, str(tmp_path / "v5" / "model.safetensors"))
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "v4" / "config.json").read_text())
    image = _image(model.config)
    _, v4 = _our_logits(tmp_path / "v4", image)
    _, v5 = _our_logits(tmp_path / "v5", image)
    assert torch.equal(v4, v5)


def test_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_model(miniature_config("phi", "siglip", VOCAB))
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(tmp_path / shard))
        weight_map.update({k: shard for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    again = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


# -- clear errors --------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _error(path):
    with pytest.raises(TinyLlavaError) as err:
        TinyLlavaForConditionalGeneration.from_pretrained(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file" in _error(tmp_path / "f")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    assert "has no config.json" in _error(saved)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_corrupt_config(saved, text):
    (saved / "config.json").write_text(text, encoding="latin-1")
    message = _error(saved)
    assert "config.json" in message and ("not valid JSON" in message or "expected a JSON object" in message)


def test_unknown_model_type(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["model_type"], raw["architectures"] = "bert", ["BertModel"]
    (saved / "config.json").write_text(json.dumps(raw))
    message = _error(saved)
    assert "'bert'" in message and "tinyllava" in message and "llava" in message


def test_unknown_family_in_checkpoint(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["text_config"]["model_type"] = "mistral"
    (saved / "config.json").write_text(json.dumps(raw))
    message = _error(saved)
    assert "'mistral'" in message and "qwen2" in message


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    assert "no model.safetensors" in _error(saved)


def test_pickle_weights_are_refused(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not loaded")
    message = _error(saved)
    assert "pytorch_model.bin" in message and "safetensors only" in message


def test_truncated_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in _error(saved)


def test_wrong_shaped_weights(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "model.safetensors"))
    tensors["connector._connector.0.weight"] = torch.zeros(3, 3)
    del tensors["connector._connector.2.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(saved / "model.safetensors"))
    message = _error(saved)
    assert "connector._connector.0.weight (3, 3) in the file, (64, 32) from the config" in message
    assert "1 weights missing (connector._connector.2.bias)" in message
    assert "1 unexpected weights (extra.weight)" in message


def test_legacy_without_a_known_tower(tmp_path):
    model = random_model(miniature_config("phi", "siglip", VOCAB))
    write_layout(model, tmp_path, "legacy")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["mm_vision_tower"] = "someone/unknown-tower"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    message = _error(tmp_path)
    assert "someone/unknown-tower" in message and "google/siglip-so400m-patch14-384" in message


def test_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError):
        TinyLlavaForConditionalGeneration.from_pretrained(tmp_path / "nope")
