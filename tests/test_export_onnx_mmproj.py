"""Vision ONNX export and the stock-llama.cpp mmproj, measured against PyTorch.

Tolerances are set from what was measured on the miniatures (random weights, CPU):
ONNX fp32 vs torch ~3e-7 max abs, fp16 ~3e-4 max abs (5e-4 relative); SigLIP mmproj through
stock mtmd vs torch ~1.5e-4 (f32) / ~2.2e-4 (f16) max abs, cosine > 0.99999 per token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from tinyllava_edge.data.preprocess import preprocess
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model import VISION_TOWERS, TinyLlavaForConditionalGeneration
from tinyllava_edge.model.checkpoint import load_checkpoint
from tinyllava_edge.model.presets import get_preset
from tinyllava_edge.testing.checkpoints import (
    build_miniature,
    miniature_config,
    random_model,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
gguf = pytest.importorskip("gguf")

from tinyllava_edge.export import mmproj as mmproj_module
from tinyllava_edge.export import onnx_vision
from tinyllava_edge.export.mmproj import write_mmproj_gguf
from tinyllava_edge.export.onnx_vision import export_vision_onnx

# One case per distinct vision behaviour: tower x layout (feature layer, strategy, aspect).
CASES = {
    "factory-siglip": "TinyLLaVA-Qwen2-0.5B-SigLIP",  # layer -2, patch: 15 of 16 patches
    "factory-clip": "TinyLLaVA-Phi-2-CLIP",  # layer -2, patch: CLS dropped
    "legacy-siglip": "TinyLLaVA-1.5B",  # tower without its last layer, layer -1, all tokens, pad
    "hf_llava-siglip": "tiny-llava-v1-hf",  # HF 'default' drops token 0, pad
    "hf_llava-clip": "llava-1.5-hf",
    "tiny-shapes": None,  # our preset: SigLIP-style, cls_patch, random init
}
SIGLIP_CASES = ["factory-siglip", "legacy-siglip", "hf_llava-siglip", "tiny-shapes"]
CLIP_CASES = ["factory-clip", "hf_llava-clip"]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    built = {}
    for case, name in CASES.items():
        if name is None:
            torch.manual_seed(0)
            built[case] = TinyLlavaForConditionalGeneration(get_preset("tiny-shapes").config(vocab_size=512)).eval()
        else:
            built[case] = load_checkpoint(build_miniature(name, tmp_path_factory.mktemp(case)))
    return built


def _dinov2_model():
    config = miniature_config("llama", "siglip", 96)
    config.vision_config = AutoConfig.for_model(
        "dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=7,
    )
    config.vision_hidden_size = 32
    return random_model(config)


def _pixels(model, batch, seed):
    (pixels,) = onnx_vision.VISION_SPEC.dummy_inputs(model, batch, seed)
    return pixels


def _run(path, pixels):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["image_embeds"], {"pixel_values": pixels})[0]


# -- ONNX ---------------------------------------------------------------------------------------

def test_every_registered_tower_has_an_onnx_case():
    # siglip and clip through CASES, dinov2 through test_onnx_dinov2
    assert sorted({"siglip", "clip", "dinov2"}) == VISION_TOWERS.keys()


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_fp32_matches_torch_with_dynamic_batch(models, case, tmp_path):
    model = models[case]
    out = tmp_path / "vision.onnx"
    report = export_vision_onnx(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["image_embeds"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert report["external_data"] == [] and sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx"]

    v = report["validation"]
    assert v["max_abs_diff"] < 1e-5, v  # measured ~3e-7
    with torch.no_grad():
        expected = model.encode_images(torch.from_numpy(_pixels(model, 1, 5)))
    assert (report["n_tokens"], report["hidden"]) == tuple(expected.shape[1:])
    assert report["size_bytes"] == out.stat().st_size

    three = _pixels(model, 3, 7)
    batched = _run(out, three)
    single = np.concatenate([_run(out, three[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, report["n_tokens"], report["hidden"])
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("case", ["factory-siglip", "factory-clip"])
def test_onnx_fp16_keeps_float32_io(models, case, tmp_path):
    model = models[case]
    out = tmp_path / "vision-fp16.onnx"
    report = export_vision_onnx(model, out, dtype="fp16")
    graph = onnx.load(str(out)).graph
    float32 = onnx.TensorProto.FLOAT
    assert graph.input[0].type.tensor_type.elem_type == float32
    assert graph.output[0].type.tensor_type.elem_type == float32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    v = report["validation"]
    assert v["min_token_cosine"] > 0.9999 and v["max_rel_diff"] < 5e-3, v  # measured 5e-4 relative
    assert next(model.parameters()).dtype == torch.float32  # the caller's model was not converted


def test_onnx_dinov2(tmp_path):
    report = export_vision_onnx(_dinov2_model(), tmp_path / "v.onnx")
    assert report["n_tokens"] == 16 and report["validation"]["max_abs_diff"] < 1e-5


def test_onnx_external_data_for_large_graphs(models, tmp_path, monkeypatch):
    # Graphs past the 2 GiB protobuf limit keep their weights beside the graph; forced here.
    monkeypatch.setattr(onnx_vision, "_EXTERNAL_DATA_ABOVE", 0)
    report = export_vision_onnx(models["factory-siglip"], tmp_path / "vision.onnx")
    assert [p.rsplit("/", 1)[-1] for p in report["external_data"]] == ["vision.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert report["validation"]["max_abs_diff"] < 1e-5
    assert report["size_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert _run(tmp_path / "vision.onnx", _pixels(models["factory-siglip"], 1, 2)).shape[1] == report["n_tokens"]


def test_onnx_failed_validation_leaves_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_vision, "_FP32_REL_TOL", 0.0)
    with pytest.raises(TinyLlavaError, match="disagrees with PyTorch"):
        export_vision_onnx(models["factory-clip"], tmp_path / "vision.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_bad_dtype(models, tmp_path):
    with pytest.raises(TinyLlavaError, match="'bf16'.*fp32, fp16"):
        export_vision_onnx(models["factory-clip"], tmp_path / "v.onnx", dtype="bf16")


# -- mmproj ------------------------------------------------------------------------------------

def _text_gguf(path, n_embd):
    """A minimal one-block llama GGUF: mtmd needs a text model of the mmproj's output width."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    heads, ffn = 4, 2 * n_embd
    writer.add_context_length(64)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // heads)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["\u2581"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1])  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(n_embd, np.float32)
    writer.add_tensor("token_embd.weight", rand(len(tokens), n_embd))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", rand(len(tokens), n_embd))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", rand(n_embd, n_embd))
    writer.add_tensor("blk.0.attn_norm.weight", ones)
    writer.add_tensor("blk.0.ffn_norm.weight", ones)
    writer.add_tensor("blk.0.ffn_gate.weight", rand(ffn, n_embd))
    writer.add_tensor("blk.0.ffn_up.weight", rand(ffn, n_embd))
    writer.add_tensor("blk.0.ffn_down.weight", rand(n_embd, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def text_ggufs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    return {n: _text_gguf(folder / f"text-{n}.gguf", n) for n in (64, 256)}


def _square_image(model, seed=3):
    """A square image at the tower's size: mtmd's own resize and ours are then both the identity."""
    size = model.config.vision_config.image_size
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _measure(model, path, text_ggufs):
    from tinyllava_edge.export.validate import measure_mmproj

    return measure_mmproj(path, text_ggufs[model.config.hidden_size], model, _square_image(model))


def test_mmproj_keys_and_tensors(models, tmp_path):
    model = models["factory-clip"]
    report = write_mmproj_gguf(model, tmp_path / "mmproj.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "mmproj.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "clip"
    assert fields["clip.projector_type"] == "mlp"
    assert fields["clip.has_vision_encoder"] is True
    assert fields["clip.use_gelu"] is False  # CLIP runs quick GELU
    vision = model.config.vision_config
    assert fields["clip.vision.image_size"] == vision.image_size
    assert fields["clip.vision.patch_size"] == vision.patch_size
    assert fields["clip.vision.embedding_length"] == vision.hidden_size
    assert fields["clip.vision.feed_forward_length"] == vision.intermediate_size
    assert fields["clip.vision.attention.head_count"] == vision.num_attention_heads
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(vision.layer_norm_eps)
    assert fields["clip.vision.projection_dim"] == model.config.hidden_size
    assert fields["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # layer -2 of 3: hidden_states[2], two blocks written, the third left out
    assert fields["clip.vision.feature_layer"] == [2] and fields["clip.vision.block_count"] == 2
    names = {t.name: t for t in reader.tensors}
    assert {"v.class_embd", "v.pre_ln.weight", "v.position_embd.weight", "v.patch_embd.weight",
            "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} <= set(names)
    assert not any(n.startswith(("v.post_ln", "v.blk.2.")) for n in names)
    assert names["mm.0.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["v.blk.0.ln1.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert report["n_tensors"] == len(names) and report["n_tokens_stock"] == 16
    assert any("25814" in d for d in report["deviations"])


@pytest.mark.parametrize("case", SIGLIP_CASES)
def test_mmproj_siglip_matches_torch_in_stock_mtmd(models, case, tmp_path, text_ggufs):
    model = models[case]
    report = write_mmproj_gguf(model, tmp_path / "mmproj.gguf", ftype="f16")
    m = _measure(model, tmp_path / "mmproj.gguf", text_ggufs)
    assert m["n_tokens_stock"] == report["n_tokens_stock"]
    assert m["n_tokens_torch"] == report["n_tokens_model"]
    if model.config.vision_feature_select_strategy == "patch":
        # The Factory/HF 'patch' selection drops the first SigLIP patch; stock keeps it.
        assert m["n_tokens_stock"] == m["n_tokens_torch"] + 1
        assert any("issue 203" in d for d in report["deviations"])
    else:
        assert m["n_tokens_stock"] == m["n_tokens_torch"]
    assert m["min_cosine"] > 0.9999 and m["max_rel_diff"] < 5e-3, m["max_rel_diff"]  # measured ~7e-4


def test_mmproj_f32_is_closer(models, tmp_path, text_ggufs):
    model = models["factory-siglip"]
    write_mmproj_gguf(model, tmp_path / "mmproj.gguf", ftype="f32")
    m = _measure(model, tmp_path / "mmproj.gguf", text_ggufs)
    assert m["max_rel_diff"] < 2e-3 and m["min_cosine"] > 0.99999  # measured 4.6e-4 (tanh GELU)


def _stock_llava_clip(model, pixel_values):
    """What llama.cpp's llava graph computes for a CLIP tower (llama.cpp issue 25814).

    The CLS embedding is appended after the patches, positions 0..N are added in that order,
    and rows 1..N (patches 1..N-1, then CLS) go through the projector with tanh GELU.
    """
    inner = model.vision_tower._vision_tower.vision_model
    emb = inner.embeddings
    patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, C)
    cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
    x = torch.cat([patches, cls], dim=1) + emb.position_embedding.weight[None]
    x = inner.pre_layrnorm(x)
    (layer,) = mmproj_module.feature_layers(model.config.vision_feature_layer, len(inner.encoder.layers))
    for block in inner.encoder.layers[:layer]:
        x = block(x, None)
    linear_0, linear_2 = model.connector._connector[0], model.connector._connector[2]
    return linear_2(F.gelu(linear_0(x[:, 1:]), approximate="tanh"))


@pytest.mark.parametrize("case", CLIP_CASES)
def test_mmproj_clip_deviation_is_issue_25814(models, case, tmp_path, text_ggufs):
    model = models[case]
    report = write_mmproj_gguf(model, tmp_path / "mmproj.gguf", ftype="f32")
    m = _measure(model, tmp_path / "mmproj.gguf", text_ggufs)
    assert m["n_tokens_stock"] == m["n_tokens_torch"] == report["n_tokens_stock"]
    # Stock llama.cpp is far from the model (measured mean cosine ~0.24) ...
    assert m["mean_cosine"] < 0.9
    # ... and matches the simulation of its CLS ordering. When llama.cpp fixes issue 25814 this
    # fails: then drop the deviation from plan_mmproj and expect CLIP to match torch.
    pixels = torch.from_numpy(preprocess(_square_image(model), onnx_vision.preprocess_config(model)))
    with torch.no_grad():
        simulated = _stock_llava_clip(model, pixels)[0].numpy()
    cosine = onnx_vision.token_cosine(m["stock_embeds"], simulated)
    relative = np.abs(m["stock_embeds"] - simulated).max() / np.abs(simulated).max()
    print(f"{case}: stock vs torch mean cosine {m['mean_cosine']:.3f}; stock vs simulation "
          f"min cosine {cosine.min():.7f}, max rel diff {relative:.2e}")
    assert cosine.min() > 0.99999 and relative < 2e-3  # measured ~4e-4: the simulation is what stock does


def test_mmproj_ffn_as_wide_as_hidden(tmp_path, text_ggufs):
    config = miniature_config("llama", "siglip", 96)
    config.vision_config.intermediate_size = config.vision_config.hidden_size
    model = random_model(config)
    report = write_mmproj_gguf(model, tmp_path / "mmproj.gguf", ftype="f32")
    m = _measure(model, tmp_path / "mmproj.gguf", text_ggufs)
    assert any("legacy swap" in d for d in report["deviations"])
    assert m["min_cosine"] > 0.99999


@pytest.mark.parametrize("change, named", [
    ("linear", "'linear'"),
    ("identity", "'identity'"),
    ("mlp3x_gelu", "'mlp3x_gelu'"),
    ("dinov2", "'dinov2'"),
])
def test_mmproj_refuses_what_stock_llama_cpp_cannot_run(change, named, tmp_path):
    if change == "dinov2":
        model = _dinov2_model()
    else:
        config = miniature_config("llama", "siglip", 96, connector_type=change)
        if change == "identity":
            config.vision_config.hidden_size = config.hidden_size
            config.vision_hidden_size = config.hidden_size
        model = random_model(config)
    with pytest.raises(TinyLlavaError, match=named):
        write_mmproj_gguf(model, tmp_path / "mmproj.gguf")
    assert list(tmp_path.iterdir()) == []


def test_feature_layers():
    assert mmproj_module.feature_layers(-2, 27) == [26]
    assert mmproj_module.feature_layers([-3, -1], 4) == [2, 4]
    with pytest.raises(TinyLlavaError, match="ascending"):
        mmproj_module.feature_layers([-1, -3], 4)
    assert mmproj_module.feature_layers(0, 4) == mmproj_module.feature_layers(-5, 4) == [0]  # embedding output
    for outside in (-6, 5):
        with pytest.raises(TinyLlavaError, match="hidden state"):
            mmproj_module.feature_layers(outside, 4)


def test_mmproj_pairs_with_the_llm_gguf(tmp_path):
    """The real pairing: our mmproj beside our LLM GGUF, loaded together by stock mtmd."""
    gguf_llm = pytest.importorskip("tinyllava_edge.export.gguf_llm")
    from tinyllava_edge.export.validate import measure_mmproj
    from tinyllava_edge.model import load_tokenizer

    path = build_miniature("TinyLLaVA-TinyLlama-SigLIP", tmp_path / "ckpt")
    model = load_checkpoint(path)
    gguf_llm.write_llm_gguf(model, load_tokenizer(path, model_type="llama"), tmp_path / "llm.gguf", ftype="f32")
    write_mmproj_gguf(model, tmp_path / "mmproj.gguf")
    m = measure_mmproj(tmp_path / "mmproj.gguf", tmp_path / "llm.gguf", model, _square_image(model))
    assert (m["n_tokens_stock"], m["n_tokens_torch"]) == (16, 15)
    assert m["min_cosine"] > 0.9999
