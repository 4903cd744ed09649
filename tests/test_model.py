"""The model framework: every family x tower builds, runs forward and generate, round-trips."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tinyllava_edge.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model import (
    CONNECTORS,
    LLM_FAMILIES,
    VISION_TOWERS,
    TinyLlavaConfig,
    TinyLlavaForConditionalGeneration,
)
from tinyllava_edge.testing.checkpoints import miniature_config, random_model

FAMILIES = ["llama", "qwen2", "phi", "stablelm", "gemma"]
TOWERS = ["siglip", "clip"]
CONNECTOR_CASES = {"linear": "linear", "mlp{N}x_gelu": "mlp3x_gelu", "identity": "identity"}
VOCAB = 96


def _image(config, batch=1, seed=0):
    size = config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ids(*rows):
    return torch.tensor(rows, dtype=torch.long)


def test_every_registered_entry_has_a_test_case():
    assert sorted(FAMILIES) == LLM_FAMILIES.keys()
    # dinov2 is registered too; it is exercised by test_dinov2_tower below.
    assert sorted(TOWERS + ["dinov2"]) == VISION_TOWERS.keys()
    assert sorted(CONNECTOR_CASES) == CONNECTORS.keys()


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_generate_and_round_trip(family, tower, tmp_path):
    model = random_model(miniature_config(family, tower, VOCAB))
    image = _image(model.config)
    ids = _ids([1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8])
    with torch.no_grad():
        logits = model(input_ids=ids, images=image).logits
    n_image = model.encode_images(image).shape[1]
    assert logits.shape == (1, 5 + n_image, VOCAB)
    assert torch.isfinite(logits).all()

    new = model.generate(ids, images=image, max_new_tokens=5, do_sample=False)
    assert new.shape == (1, 5)  # new tokens only, as the Factory returns them
    # greedy decoding equals argmax of a plain forward over the growing sequence
    seq = ids
    for step in range(5):
        with torch.no_grad():
            nxt = model(input_ids=seq, images=image).logits[0, -1].argmax()
        assert nxt == new[0, step]
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)

    model.save_pretrained(tmp_path)
    again = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    theirs, ours = again.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, images=image).logits, logits)
    assert again.tied_embeddings == model.tied_embeddings


def test_saved_names_are_the_released_ones(tmp_path):
    from safetensors import safe_open

    model = random_model(miniature_config("phi", "siglip", VOCAB))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert "vision_tower._vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "vision_tower._vision_tower.vision_model.head.probe" in names
    assert {"connector._connector.0.weight", "connector._connector.2.bias"} <= names
    assert "language_model.model.layers.0.self_attn.dense.weight" in names
    assert "language_model.lm_head.weight" in names
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "tinyllava"
    assert raw["architectures"] == ["TinyLlavaForConditionalGeneration"]
    assert raw["image_token_index"] == -200 and raw["ignore_index"] == -100
    assert raw["text_config"]["model_type"] == "phi"
    assert raw["vision_config"]["model_type"] == "siglip_vision_model"
    for key in ("connector_type", "vision_feature_layer", "vision_feature_select_strategy",
                "image_aspect_ratio", "tokenizer_model_max_length", "tokenizer_padding_side",
                "llm_model_name_or_path", "vision_model_name_or_path", "hidden_size", "vision_hidden_size"):
        assert key in raw


def test_tied_embeddings_are_saved_once_and_retied(tmp_path):
    from safetensors import safe_open

    model = random_model(miniature_config("qwen2", "siglip", VOCAB))
    assert model.tied_embeddings
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "language_model.lm_head.weight" not in set(f.keys())
    assert TinyLlavaForConditionalGeneration.from_pretrained(tmp_path).tied_embeddings


def test_auto_classes_load_without_remote_code(tmp_path):
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TinyLlavaConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, TinyLlavaForConditionalGeneration)


@pytest.mark.parametrize(
    "tower, strategy, expected",
    [("siglip", "patch", 15), ("siglip", "cls_patch", 16), ("clip", "patch", 16), ("clip", "cls_patch", 17)],
)
def test_feature_selection_token_counts(tower, strategy, expected):
    # 4x4 patches; `patch` drops token 0 even for SigLIP, which has no CLS (Factory issue 203)
    model = random_model(miniature_config("llama", tower, VOCAB, vision_feature_select_strategy=strategy))
    assert model.encode_images(_image(model.config)).shape == (1, expected, 64)


def test_feature_layer_selects_the_hidden_state():
    model = random_model(miniature_config("llama", "siglip", VOCAB, vision_feature_layer=-1))
    image = _image(model.config)
    inner = model.vision_tower._vision_tower.vision_model
    with torch.no_grad():
        hs = inner(pixel_values=image, output_hidden_states=True).hidden_states
        expected = model.connector(hs[-1][:, 1:])
        assert torch.equal(model.encode_images(image), expected)
        model.config.vision_feature_layer = [-2, -1]
        assert model.vision_tower(image, [-2, -1], "cls_patch").shape == (1, 16, 64)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_rows(side):
    model = random_model(miniature_config("llama", "siglip", VOCAB, tokenizer_padding_side=side))
    images = _image(model.config, batch=2)
    short, long = [1, 5, IMAGE_TOKEN_INDEX, 7], [1, 5, 9, 10, IMAGE_TOKEN_INDEX, 7, 8]
    pad = 0
    rows = [short + [pad] * 3, long] if side == "right" else [[pad] * 3 + short, long]
    mask = [[1] * 4 + [0] * 3, [1] * 7] if side == "right" else [[0] * 3 + [1] * 4, [1] * 7]
    with torch.no_grad():
        batch = model(input_ids=_ids(*rows), attention_mask=_ids(*mask), images=images).logits
        one = model(input_ids=_ids(short), images=images[:1]).logits[0]
        two = model(input_ids=_ids(long), images=images[1:]).logits[0]
    n = one.shape[0]
    got_one = batch[0, :n] if side == "right" else batch[0, -n:]
    torch.testing.assert_close(got_one, one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1], two, atol=1e-5, rtol=1e-4)


def test_labels_mask_image_rows_and_give_a_loss():
    model = random_model(miniature_config("phi", "siglip", VOCAB))
    ids = _ids([1, IMAGE_TOKEN_INDEX, 5, 6, 7])
    labels = _ids([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7])
    embeds, _, _, new_labels = model.prepare_inputs_for_multimodal(ids, None, labels, _image(model.config))
    n = model.encode_images(_image(model.config)).shape[1]
    assert embeds.shape[1] == 4 + n
    assert (new_labels[0, 1 : 1 + n] == IGNORE_INDEX).all()
    assert new_labels[0, -2:].tolist() == [6, 7]
    out = model(input_ids=ids, images=_image(model.config), labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.connector._connector[0].weight.grad is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_image_rows_get_the_llm_input_scale_only_for_gemma(family):
    """transformers 4 (the Factory's) scaled Gemma's whole inputs_embeds by sqrt(hidden); 5 scales tokens only."""
    model = random_model(miniature_config(family, "siglip", VOCAB))
    image = _image(model.config)
    with torch.no_grad():
        embeds, _, _, _ = model.prepare_inputs_for_multimodal(_ids([1, IMAGE_TOKEN_INDEX, 5]), None, None, image)
        features = model.encode_images(image)[0]
    hidden = model.config.text_config.hidden_size
    expected = hidden**0.5 if family == "gemma" else 1.0
    assert model.image_features_scale == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(embeds[0, 1 : 1 + features.shape[0]], features * expected, atol=1e-5, rtol=1e-5)


def test_text_only_rows_skip_their_dummy_image():
    # The Factory's collator gives text-only samples a dummy image; their row must not use it.
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    images = _image(model.config, batch=2)
    rows = _ids([1, 5, 6, 7], [1, IMAGE_TOKEN_INDEX, 6, 7])
    with torch.no_grad():
        batch = model(input_ids=rows, images=images).logits
        text = model(input_ids=_ids([1, 5, 6, 7])).logits[0]
        with_image = model(input_ids=_ids([1, IMAGE_TOKEN_INDEX, 6, 7]), images=images[1:]).logits[0]
    torch.testing.assert_close(batch[0, :4], text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1], with_image, atol=1e-5, rtol=1e-4)


def test_two_images_in_one_row():
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    images = _image(model.config, batch=2)
    ids = _ids([1, IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX, 6])
    n = model.encode_images(images[:1]).shape[1]
    with torch.no_grad():
        assert model(input_ids=ids, images=images).logits.shape[1] == 3 + 2 * n
    with pytest.raises(ValueError, match="images do not fit"):
        model(input_ids=ids, images=images[:1])


def test_truncation_to_model_max_length():
    model = random_model(miniature_config("llama", "siglip", VOCAB, tokenizer_model_max_length=10))
    with torch.no_grad():
        logits = model(input_ids=_ids([1, IMAGE_TOKEN_INDEX, 5, 6, 7]), images=_image(model.config)).logits
    assert logits.shape[1] == 10


@pytest.mark.parametrize("connector, out_keys", [
    ("linear", {"connector._connector.weight", "connector._connector.bias"}),
    ("mlp3x_gelu", {f"connector._connector.{i}.weight" for i in (0, 2, 4)}),
])
def test_connectors(connector, out_keys):
    model = random_model(miniature_config("llama", "siglip", VOCAB, connector_type=connector))
    assert out_keys <= set(model.state_dict())
    assert model.encode_images(_image(model.config)).shape == (1, 15, 64)


def test_identity_connector_needs_equal_widths():
    with pytest.raises(TinyLlavaError, match="identity"):
        random_model(miniature_config("llama", "siglip", VOCAB, connector_type="identity"))
    config = miniature_config("llama", "siglip", VOCAB, connector_type="identity")
    config.vision_config.hidden_size = 64
    config.vision_hidden_size = 64
    assert random_model(config).encode_images(_image(config)).shape == (1, 15, 64)


def test_dinov2_tower():
    config = miniature_config("llama", "siglip", VOCAB)
    config.vision_config = AutoConfig.for_model(
        "dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=7,
    )
    config.vision_hidden_size = 32
    model = random_model(config)
    # DINOv2 has a CLS token: 16 patches + CLS, `patch` drops the CLS
    assert model.encode_images(torch.randn(1, 3, 28, 28)).shape == (1, 16, 64)
    assert any(k.startswith("vision_tower._vision_tower.embeddings.") for k in model.state_dict())


@pytest.mark.parametrize("part, value, known", [
    ("family", "mistral", "gemma, llama, phi, qwen2, stablelm"),
    ("tower", "eva_vision", "clip_vision_model, dinov2, siglip_vision_model"),
    ("connector", "qformer", "identity, linear, mlp{N}x_gelu"),
])
def test_unknown_parts_name_the_known_ones(part, value, known):
    config = miniature_config("llama", "siglip", VOCAB)
    if part == "family":
        config.text_config.model_type = value
    elif part == "tower":
        config.vision_config.model_type = value
    else:
        config.connector_type = value
    with pytest.raises(TinyLlavaError) as err:
        TinyLlavaForConditionalGeneration(config)
    assert repr(value) in str(err.value) and known in str(err.value)


def test_every_family_has_a_default_template():
    from tinyllava_edge.data.template import FAMILY_TEMPLATES, get_template

    assert sorted(FAMILY_TEMPLATES) == LLM_FAMILIES.keys()
    for family in FAMILIES:
        get_template(FAMILY_TEMPLATES[family])


def test_batched_generate_equals_one_row_at_a_time():
    # right-padded input (the training convention) is re-padded on the left for decoding
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    images = _image(model.config, batch=2)
    short, long = [1, 5, IMAGE_TOKEN_INDEX, 7], [1, 5, 9, 10, IMAGE_TOKEN_INDEX, 7, 8]
    batch = model.generate(_ids(short + [0, 0, 0], long), images=images,
                           attention_mask=_ids([1] * 4 + [0] * 3, [1] * 7), max_new_tokens=4, do_sample=False)
    one = model.generate(_ids(short), images=images[:1], max_new_tokens=4, do_sample=False)
    two = model.generate(_ids(long), images=images[1:], max_new_tokens=4, do_sample=False)
    assert batch[0].tolist() == one[0].tolist()
    assert batch[1].tolist() == two[0].tolist()


def test_auto_classes_pass_every_option_through(tmp_path):
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    model.save_pretrained(tmp_path / "sub")
    # hub download options have nothing to fetch for a local folder; subfolder and dtype are honoured
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, subfolder="sub", force_download=True, proxies={"http": "127.0.0.1:9"}, revision="main",
        cache_dir=str(tmp_path / "cache"), token=None, dtype=torch.bfloat16, output_loading_info=True,
        device_map={"": "cpu"}, attn_implementation="eager",
    )
    assert isinstance(loaded, TinyLlavaForConditionalGeneration)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.language_model.config._attn_implementation == "eager"
    assert not (tmp_path / "cache").exists()
    auto = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path / "sub", dtype="auto")
    assert next(auto.parameters()).dtype == torch.float32


@pytest.mark.parametrize("options, message", [
    ({"quantization_config": {"load_in_4bit": True}}, "quantization='nf4'"),
    ({"gguf_file": "x.gguf"}, "GGUF bundle"),
    ({"use_safetensors": False}, "only safetensors"),
    ({"device_map": {"language_model": "cpu", "vision_tower": "cpu"}}, "per-module map"),
    ({"tp_plan": "auto"}, "tensor parallelism"),
])
def test_from_pretrained_refuses_what_it_does_not_do(tmp_path, options, message):
    random_model(miniature_config("llama", "siglip", VOCAB)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        TinyLlavaForConditionalGeneration.from_pretrained(tmp_path, **options)
    with pytest.raises(TypeError, match="no_such_option"):
        TinyLlavaForConditionalGeneration.from_pretrained(tmp_path, no_such_option=1)


def test_every_transformers_option_is_classified():
    """Every keyword transformers' from_pretrained (model and Auto class) reads is one we classified:
    a new transformers that adds one fails here, not in a user's load (model/load_options.py)."""
    import inspect
    import re

    from transformers import PreTrainedModel
    from transformers.models.auto import auto_factory

    from tinyllava_edge.model.load_options import CLASSIFIED

    names = set()
    for fn in (PreTrainedModel.from_pretrained, auto_factory._BaseAutoModelClass.from_pretrained):
        fn = inspect.unwrap(getattr(fn, "__func__", fn))
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)}
        source = inspect.getsource(fn)
        names |= set(re.findall(r'kwargs(?:_orig)?\.(?:pop|get)\("(\w+)"', source))
        names |= set(re.findall(r'"(\w+)": (?:\w+),', source)) & {"cache_dir", "force_download", "local_files_only", "proxies", "subfolder", "_from_auto"}
    assert names, "transformers' from_pretrained could not be read"
    assert sorted(names - CLASSIFIED) == []
