"""`tinyllava-export --format hf`: the transformers LLaVA folder, its fidelity check (transformers'
own LLaVA and processor against our model), what it refuses, and reading it back."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tinyllava_edge
from tinyllava_edge.cli.export import main as export_main
from tinyllava_edge.data.preprocess import preprocess
from tinyllava_edge.data.template import default_template_for_family, get_template, tokenizer_image_token
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.export import hf_llava
from tinyllava_edge.export.chat_template import jinja_chat_template
from tinyllava_edge.export.hf_llava import RECORD_NAME, export_hf
from tinyllava_edge.export.onnx_vision import preprocess_config
from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer
from tinyllava_edge.model.checkpoint import load_checkpoint
from tinyllava_edge.testing.checkpoints import MINIATURES, build_miniature, miniature_config, random_model

# Every miniature LLaVA can express: each family but Phi-2 (lm_head bias) with SigLIP, Llama with
# CLIP, in the three layouts read.
EXPRESSIBLE = [name for name, m in MINIATURES.items() if m.family != "phi"]
PROMPT_IMAGE = np.random.default_rng(3).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)


def _logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), images=pixels).logits[0]


def _check_folder(folder, ckpt):
    """The released llava-hf names and config keys, and the model read back with identical logits."""
    record = json.loads((folder / RECORD_NAME).read_text())
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == ["LlavaForConditionalGeneration"] and raw["model_type"] == "llava"
    assert raw["text_config"]["architectures"][0].endswith("ForCausalLM")
    assert raw["image_seq_length"] == record["model"]["image_tokens"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("vision_tower.vision_model.embeddings.") for n in names)
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"} <= set(names)
    assert any(n.startswith("language_model.model.layers.0.") for n in names)
    assert not any(n.startswith(("vision_tower.embeddings", "model.", "lm_head")) or ".head." in n for n in names)
    assert ("language_model.lm_head.weight" in names) == (not raw["tie_word_embeddings"])
    assert {f["name"] for f in record["files"]} >= {"model.safetensors", "config.json", "tokenizer.json",
                                                    "preprocessor_config.json", "chat_template.jinja"}
    # read back through the HF LLaVA layout reader: the same logits as the checkpoint
    original, back = load_checkpoint(ckpt), TinyLlavaForConditionalGeneration.from_pretrained(folder)
    assert back.checkpoint_layout == "hf_llava"
    assert back.config.image_aspect_ratio == original.config.image_aspect_ratio
    tokenizer = load_tokenizer(ckpt)
    template = get_template(default_template_for_family(original.config.llm_family))
    ids = tokenizer_image_token(template.render_prompt("<image>\nWhat is it?"), tokenizer)
    pixels = torch.from_numpy(preprocess(PROMPT_IMAGE, preprocess_config(original)))
    ours, theirs = _logits(original, ids, pixels), _logits(back, ids, pixels)
    vocab = ours.shape[-1]
    torch.testing.assert_close(theirs[:, :vocab], ours, atol=1e-5, rtol=1e-5)
    return record


@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_miniature_exports_and_matches_transformers_llava(name, tmp_path):
    ckpt = build_miniature(name, tmp_path / "ckpt")
    result = export_hf(ckpt, tmp_path / "hf", progress=False)
    figures = result["record"]["validation"]["transformers_llava"]
    n = figures["prompts"]
    assert n == 3 and figures["ids_identical"] == n and figures["greedy_identical"] == n
    assert figures["logits_max_abs_diff"] <= 1e-4
    # the synthetic images are non-square and of other sizes: the processor resizes (and pads) as we do
    assert figures["pixels_max_abs_diff"] <= 1e-6
    record = _check_folder(tmp_path / "hf", ckpt)
    # and the edge runtime's torch path answers the same from the folder as from the checkpoint
    a = tinyllava_edge.load(ckpt, device="cpu").generate(PROMPT_IMAGE, "What is it?", max_new_tokens=6)
    b = tinyllava_edge.load(tmp_path / "hf", device="cpu").generate(PROMPT_IMAGE, "What is it?", max_new_tokens=6)
    assert a == b
    if MINIATURES[name].family == "gemma":  # sqrt(hidden) folded into linear_2: transformers 5 adds rows unscaled
        assert record["model"]["projector_scale"] == pytest.approx(64 ** 0.5)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """The default model's preset, untrained, with the shapes tokenizer (which has its own <image>)."""
    from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer
    from tinyllava_edge.model.presets import get_preset

    out = tmp_path_factory.mktemp("tiny-shapes") / "ckpt"
    tokenizer = load_tokenizer(train_shapes_tokenizer(out / "tokenizer"), model_type="llama", pad_token="<pad>")
    preset = get_preset("tiny-shapes")
    model = random_model(preset.config(vocab_size=len(tokenizer), pad_token="<pad>",
                                       pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_default_model_exports(tiny_shapes, tmp_path):
    result = export_hf(tiny_shapes, tmp_path / "hf", progress=False)
    record = result["record"]
    figures = record["validation"]["transformers_llava"]
    assert figures["greedy_identical"] == figures["ids_identical"] == figures["prompts"]
    assert figures["logits_max_abs_diff"] <= 1e-4
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    # layer 0 (the embedding output; -3 of the 2-layer tower's 3 hidden states, as transformers reads
    # layer 0 as "no hidden states"), every patch kept: `cls_patch` is LLaVA's `full`; 48/16 -> 9 tokens
    assert raw["vision_feature_layer"] == -3 and raw["vision_feature_select_strategy"] == "full"
    assert raw["image_seq_length"] == 9 and raw["vision_config"]["vision_use_head"] is False
    tokenizer = load_tokenizer(tiny_shapes)
    # the shapes tokenizer's own <image> token is used: no row added
    assert raw["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>")
    assert raw["text_config"]["vocab_size"] == len(tokenizer)
    processor = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    assert processor["patch_size"] == 16 and processor["vision_feature_select_strategy"] == "full"
    _check_folder(tmp_path / "hf", tiny_shapes)


def test_added_image_token_grows_the_tables_with_zero_rows(tmp_path):
    # A tokenizer without <image> and no spare embedding row (TinyLlama's 32000): one row is added.
    ckpt = build_miniature("TinyLLaVA-TinyLlama-SigLIP", tmp_path / "ckpt")
    tokenizer = load_tokenizer(ckpt)
    model = load_checkpoint(ckpt)
    config = miniature_config("llama", "siglip", len(tokenizer))
    tight = random_model(config)
    tight.save_pretrained(tmp_path / "tight")
    tokenizer.save_pretrained(tmp_path / "tight")
    assert model.config.text_config.vocab_size > len(tokenizer)  # the miniature itself has spare rows
    record = export_hf(tmp_path / "tight", tmp_path / "hf", progress=False)["record"]
    assert record["model"]["image_token_index"] == len(tokenizer)
    assert record["model"]["vocab_size"] == len(tokenizer) + 1
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert torch.count_nonzero(f.get_tensor("language_model.model.embed_tokens.weight")[-1]) == 0
        assert torch.count_nonzero(f.get_tensor("language_model.lm_head.weight")[-1]) == 0
    assert record["validation"]["transformers_llava"]["greedy_identical"] == 3
    _check_folder(tmp_path / "hf", tmp_path / "tight")


def test_the_check_fails_when_the_ids_differ(tmp_path, monkeypatch):
    # Without the space after <image>, TinyLlama's SentencePiece pieces differ from Factory's chunks.
    ckpt = build_miniature("TinyLLaVA-TinyLlama-SigLIP", tmp_path / "ckpt")
    monkeypatch.setattr(hf_llava, "_token_leads", lambda tokenizer, template: (tokenizer.bos_token + " ", ""))
    with pytest.raises(TinyLlavaError, match="check 'HF LLaVA token ids' failed"):
        export_hf(ckpt, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_the_check_fails_when_gemma_rows_are_not_scaled(tmp_path, monkeypatch):
    ckpt = build_miniature("TinyLLaVA-Gemma-SigLIP-2.4B", tmp_path / "ckpt")
    plan = hf_llava.plan_llava
    monkeypatch.setattr(hf_llava, "plan_llava", lambda model: plan(model).__class__(
        **{**plan(model).__dict__, "projector_scale": 1.0}))
    with pytest.raises(TinyLlavaError, match="check 'HF LLaVA logits vs PyTorch' failed"):
        export_hf(ckpt, tmp_path / "hf", progress=False)


@pytest.mark.parametrize("case, match", [
    ("phi", "lm_head has no bias .* phi LLM has a bias"),
    ("linear", "mlp2x_gelu connector .* has the linear connector"),
    ("mlp3x_gelu", "has the mlp3x_gelu connector"),
    ("dinov2", "SigLIP or CLIP towers .* has a dinov2 tower"),
])
def test_refused_with_one_sentence(case, match, tmp_path):
    if case == "phi":
        ckpt = build_miniature("TinyLLaVA-Phi-2-SigLIP-3.1B", tmp_path / "ckpt")
    else:
        ckpt = build_miniature("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "ckpt")
        config = load_checkpoint(ckpt).config
        if case == "dinov2":
            config = miniature_config("qwen2", "siglip", config.text_config.vocab_size, vision_config={
                "model_type": "dinov2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "patch_size": 7, "image_size": 28})
        else:
            config.connector_type = case
        random_model(config).save_pretrained(ckpt)
    with pytest.raises(TinyLlavaError, match=match):
        export_hf(ckpt, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_cli_writes_the_folder_and_refuses_in_one_line(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_main(["--model", str(tiny_shapes), "--out", str(out), "--format", "hf", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"HF LLaVA folder {out}") and "greedy tokens identical on 3/3" in printed
    # again without --overwrite: refused; with it: replaced; a foreign folder is never replaced
    assert export_main(["--model", str(tiny_shapes), "--out", str(out), "--format", "hf", "--quiet"]) == 2
    assert "is not empty; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert export_main(["--model", str(tiny_shapes), "--out", str(out), "--format", "hf", "--quiet",
                        "--overwrite", "--no-verify"]) == 0
    assert "not measured" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert export_main(["--model", str(tiny_shapes), "--out", str(foreign), "--format", "hf", "--overwrite"]) == 2
    assert f"holds no HF LLaVA export {RECORD_NAME}" in capsys.readouterr().err
    assert export_main(["--model", str(tiny_shapes), "--out", str(tmp_path / "x"), "--format", "hf", "--bits", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --bits apply to edge bundles") and err.count("\n") == 1


@pytest.mark.parametrize("messages, system", [
    ([{"role": "user", "content": "<image>\nWhat shape?"}], None),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}], None),
    ([{"role": "user", "content": [{"type": "text", "text": "What"}, {"type": "text", "text": "shape?"},
                                   {"type": "image_url", "image_url": {}}]}], None),
    ([{"role": "system", "content": "Answer in one word."}, {"role": "developer", "content": [
        {"type": "text", "text": "Be brief."}]},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
      {"role": "user", "content": "And the colour?"}], "Answer in one word.\nBe brief. "),
    ([{"role": "system", "content": "  "}, {"role": "user", "content": "Hello"}], ""),
])
def test_openai_messages_render_as_the_template(messages, system):
    # as tinyllava-serve renders them: parts flattened (image first), system messages replace the prompt
    from dataclasses import replace

    template = get_template("llama")
    jinja = _environment().from_string(jinja_chat_template(template, openai_messages=True, bos="<s>",
                                                           after_image=" "))
    rendered = jinja.render(messages=messages, add_generation_prompt=True)
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    llava = [{"from": "human" if m["role"] == "user" else "gpt",
              "value": m["content"] if isinstance(m["content"], str) else
              "<image>\n" * any(p["type"] != "text" for p in m["content"])
              + "\n".join(p["text"] for p in m["content"] if p["type"] == "text")} for m in turns]
    if system is not None:
        template = replace(template, system=system)
    want = template.render_prompt(llava).replace("<image>", "<image> ")
    assert rendered == "<s>" + want


def _environment():
    """A Jinja environment as transformers' chat-template renderer sets it up."""
    from jinja2 import Environment, TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    env = Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "x"}, {"role": "user", "content": "Hello"}], "has role tool"),
    ([{"role": "user", "content": "Hello"}, {"role": "system", "content": "late"}], "after the conversation began"),
])
def test_openai_messages_refused_as_the_server_refuses_them(messages, match):
    from jinja2 import TemplateError

    jinja = _environment().from_string(jinja_chat_template(get_template("llama"), openai_messages=True))
    with pytest.raises(TemplateError, match=match):
        jinja.render(messages=messages, add_generation_prompt=True)
