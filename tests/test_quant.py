"""The quantization stage: GGUF types through llama.cpp's quantizer, mmproj Q8_0, ONNX int8/int4,
bitsandbytes loading (model/bnb.py), `export --bits 4|8` (export then quantize), `tinyllava-quantize`.

Two models, built on the fly: a TinyLlama-SigLIP miniature widened to the tiny-shapes LLM
(hidden 256, FFN 768: rows a multiple of 256, so K-quants really apply) and the plain miniature
(hidden 64: K-quants fall back, and the report must say so).

Tolerances (measured on these random-weight models, 1 thread): ONNX int8 vs fp32 mean token
cosine >= 0.99, int4 RTN >= 0.97, int4 GPTQ >= 0.95 (measured 0.96: 8 calibration images), on
drawn shapes scenes; Q8_0 vs F16 greedy-token agreement >= 75 % on 4
synthetic image prompts (random weights make near-ties common; the trained model's figure is in
docs/quality.md).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

from tinyllava_edge.bundle import read_manifest  # noqa: E402
from tinyllava_edge.cli.quantize import main as quantize_main  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from tinyllava_edge.export import export_bundle  # noqa: E402
from tinyllava_edge.llamacpp import LlamaCppModel  # noqa: E402
from tinyllava_edge.model.bnb import TORCH_SCHEMES  # noqa: E402
from tinyllava_edge.quant.bundle import export_quantized, quantize_to_bits  # noqa: E402
from tinyllava_edge.quant.gguf import GGUF_TYPES, main_ggml_type, quantize_gguf, tensor_types  # noqa: E402
from tinyllava_edge.quant.onnx import ONNX_SCHEMES, compare_onnx, quantize_onnx  # noqa: E402
from tinyllava_edge.quant.precisions import BIT_PRESETS  # noqa: E402
from tinyllava_edge.testing import checkpoints as ck  # noqa: E402

ONNX_MIN_COSINE = {"int8": 0.99, "int4": 0.97, "int4-gptq": 0.95}
BITS_CASES = {8: ("Q8_0", {"fp32", "int8"}), 4: ("Q4_K_M", {"fp32", "int4"})}  # 4 bits: no int8 (precisions.py)
TORCH_CASES = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 256-wide llama miniature (tiny-shapes LLM dims, 2 layers) and its 16-bit bundle."""
    import torch as t

    t.set_num_threads(1)
    root = tmp_path_factory.mktemp("quant")
    ckpt = ck.build_miniature("TinyLLaVA-TinyLlama-SigLIP", root / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    text = {**ck._TEXT["llama"], "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": config["text_config"]["vocab_size"]}
    cfg = ck.miniature_config("llama", "siglip", text["vocab_size"], text_config=text,
                              pad_token=config.get("pad_token"), pad_token_id=config.get("pad_token_id"))
    ck.write_layout(ck.random_model(cfg, seed=1), ckpt, "factory")
    bundle = export_bundle(ckpt, root / "b16", bits=16, verify=False, progress=False)["path"]
    return {"root": root, "ckpt": ckpt, "bundle": Path(bundle)}


@pytest.mark.parametrize("quant", GGUF_TYPES.keys())
def test_every_gguf_type_is_written_and_loads(wide, quant, tmp_path):
    out = tmp_path / f"llm-{quant}.gguf"
    report = quantize_gguf(wide["bundle"] / "llm-F16.gguf", out, quant)
    types = tensor_types(out)
    assert report["tensor_types"] == types and len(types) == len(tensor_types(wide["bundle"] / "llm-F16.gguf"))
    main = main_ggml_type(quant)
    assert sum(t == main for t in types.values()) >= 7  # the 2-D weights: 256 wide, no fallback needed
    assert report["summary"]["counts"] == dict(sorted(Counter(types.values()).items()))
    with LlamaCppModel(out, n_ctx=64, n_threads=1) as llm:  # llama.cpp loads and runs it
        logits = llm.decode_tokens([1, 5, 6, 7])
    assert logits.shape == (llm.n_vocab,) and np.isfinite(logits).all()


def test_kquant_fallback_is_reported_on_narrow_tensors(tmp_path):
    from tinyllava_edge.export.gguf_llm import write_llm_gguf
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer

    ckpt = ck.build_miniature("TinyLLaVA-TinyLlama-SigLIP", tmp_path / "ckpt")  # hidden 64: rows < 256
    model = TinyLlavaForConditionalGeneration.from_pretrained(ckpt)
    write_llm_gguf(model, load_tokenizer(ckpt), tmp_path / "f16.gguf", ftype="f16")
    report = quantize_gguf(tmp_path / "f16.gguf", tmp_path / "q4km.gguf", "Q4_K_M")
    other = report["summary"]["not_main_type"]
    assert "token_embd.weight" in other and other["token_embd.weight"] != "Q4_K"
    assert report["summary"]["counts"].get("Q4_K", 0) == 0  # nothing is 256 wide here


def test_requantizing_a_quantized_file_is_refused(wide, tmp_path):
    quantize_gguf(wide["bundle"] / "llm-F16.gguf", tmp_path / "q8.gguf", "Q8_0")
    with pytest.raises(TinyLlavaError, match="already quantized .Q8_0.; quantize from the F16 or F32 file"):
        quantize_gguf(tmp_path / "q8.gguf", tmp_path / "q4.gguf", "Q4_0")
    with pytest.raises(TinyLlavaError, match="unknown GGUF quant type 'Q3_X'; known: F16, F32, Q4_0"):
        quantize_gguf(wide["bundle"] / "llm-F16.gguf", tmp_path / "x.gguf", "Q3_X")


@pytest.mark.parametrize("scheme", ONNX_SCHEMES.keys())
def test_onnx_variants_valid_and_close(wide, scheme, tmp_path):
    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.quant.vision import proxy_pixels

    pre = PreprocessConfig.from_dict(read_manifest(wide["bundle"])["preprocess"])
    pixels = proxy_pixels(pre, 8)
    report = quantize_onnx(wide["bundle"] / "vision.onnx", tmp_path / "v.onnx", scheme,
                           calibration=[pixels[:4], pixels[4:]])
    expected = "MatMulNBits" if scheme.startswith("int4") else "MatMulInteger"
    assert report["quantized_ops"][expected] > 0
    assert report["size"] < 0.6 * (wide["bundle"] / "vision.onnx").stat().st_size  # graph overhead on a tiny tower
    figures = compare_onnx(wide["bundle"] / "vision.onnx", tmp_path / "v.onnx", pixels)
    assert figures["mean_token_cosine"] >= ONNX_MIN_COSINE[scheme], figures


def test_proxy_scenes_scale_with_the_towers_tokens(wide, tmp_path):
    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.quant.vision import PROXY_IMAGES, proxy_images, vision_variants

    assert proxy_images(9) == PROXY_IMAGES == 16  # tiny-shapes: every scene
    assert proxy_images(729) == 4 and proxy_images(196) == 11 and proxy_images(None) == 16
    manifest = read_manifest(wide["bundle"])
    fp32 = next(f for f in manifest["files"] if f["role"] == "vision")
    import shutil

    shutil.copyfile(wide["bundle"] / "vision.onnx", tmp_path / "vision.onnx")
    out = vision_variants(tmp_path, {**fp32, "n_tokens": 1024}, PreprocessConfig.from_dict(manifest["preprocess"]),
                          ["int8"])
    assert out["validation"]["int8"]["images"] == 4 and "on 4 drawn shapes scenes" in out["validation"]["int8"]["proxy"]


@pytest.mark.parametrize("scheme", TORCH_SCHEMES.keys())
def test_bnb_layers_present_after_loading(wide, scheme):
    from tinyllava_edge.model.bnb import GPTQ_REASON, load_quantized, quantized_layers

    if scheme == "gptq":  # written by tinyllava-quantize --torch gptq, never applied at load (tests/test_gptq.py)
        with pytest.raises(TinyLlavaError, match="GPTQ is not applied at load time") as excinfo:
            load_quantized(wide["ckpt"], scheme)
        assert "scripts/setup-gptq.sh" in GPTQ_REASON and "\n" not in str(excinfo.value)
        return
    model = load_quantized(wide["ckpt"], scheme)
    assert quantized_layers(model) == {TORCH_CASES[scheme]: 14}  # 2 layers x 7 linears; lm_head kept
    both = load_quantized(wide["ckpt"], scheme, vision=True)
    assert quantized_layers(both)[TORCH_CASES[scheme]] > 14
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.isfinite(both.language_model(input_ids=ids).logits).all()


def test_torch_backend_quantization_option(wide):
    import tinyllava_edge

    vlm = tinyllava_edge.load(wide["ckpt"], device="cpu", quantization="int8", quantize_vision=True)
    assert vlm.info()["quantization"] == "int8"
    image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert isinstance(vlm.generate(image, "What is it?", max_new_tokens=3), str)
    with pytest.raises(TinyLlavaError, match="quantize_vision needs a quantization"):
        tinyllava_edge.load(wide["ckpt"], quantize_vision=True)


@pytest.mark.parametrize("bits", BITS_CASES)
def test_export_bits_produces_valid_bundle(wide, bits, tmp_path):
    import tinyllava_edge

    llm, visions = BITS_CASES[bits]
    result = export_quantized(wide["ckpt"], tmp_path / "b", bits, progress=False, verify=bits == 8, check_images=1,
                              check_tokens=2)
    manifest = read_manifest(result["path"])
    quants = {f["role"]: f["quant"] for f in manifest["files"] if f["role"] != "vision"}
    assert quants == {"llm": llm, "mmproj": "Q8_0"} and manifest["bits"] == bits
    assert {f["quant"] for f in manifest["files"] if f["role"] == "vision"} == visions
    assert manifest["vision_default"] in visions
    assert not (Path(result["path"]) / "llm-F16.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # the 16-bit scratch bundle is gone
    assert manifest["quantization"]["source_bundle"] is None and result["export"]["manifest"]["bits"] == 16
    if bits == 8:  # checked twice: the 16-bit bundle against PyTorch, the quantized LLM against it
        assert result["export"]["manifest"]["validation"]["llm"]["prompts"] == 1
        fidelity = manifest["quantization"]["llm"]["fidelity"]
        assert fidelity["logits_rel_diff"] <= BIT_PRESETS.get("8").logits_tol
        # the F16 file is not decoded twice: the quantized check reuses the export's llama.cpp runs
        assert fidelity["source_runs"] == "the export's check (reused)" and fidelity["prompts"] == 1
        assert fidelity["new_tokens"] == 2
    vlm = tinyllava_edge.load(result["path"], device="cpu", n_threads=1)
    assert vlm.info()["vision"] == f"vision-{manifest['vision_default']}.onnx".replace("vision-fp32", "vision")
    image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert isinstance(vlm.generate(image, "What is it?", max_new_tokens=3), str)
    vlm.close()
    # one path: tinyllava-quantize --bits N over the same checkpoint's 16-bit bundle writes the same bundle
    again = read_manifest(quantize_to_bits(wide["bundle"], tmp_path / "q", bits, verify=False, progress=False)["path"])
    assert [(f["name"], f["quant"]) for f in again["files"]] == [(f["name"], f["quant"]) for f in manifest["files"]]
    assert again["vision_default"] == manifest["vision_default"]


def test_reused_source_runs_are_what_decoding_the_source_gives(wide, tmp_path):
    """The export's llama.cpp runs stand in for the source file in the quantized check: decoding
    their ids and rows with the source file itself must give the same tokens and logits exactly
    (a different scale, stop list or prompt would show here), and the check of a file against
    those runs then finds no difference."""
    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.data.template import Template
    from tinyllava_edge.export.checks import check_prompts, llamacpp_runs, synthetic_images
    from tinyllava_edge.model import load_tokenizer
    from tinyllava_edge.quant.fidelity import compare_llm_files

    bundle = wide["bundle"]
    manifest = read_manifest(bundle)
    llm_file = bundle / "llm-F16.gguf"
    tokenizer = load_tokenizer(wide["ckpt"])
    template = Template.from_dict(manifest["template"])
    prompts = check_prompts(tokenizer, template, synthetic_images(2), PreprocessConfig.from_dict(manifest["preprocess"]))
    rows = [np.random.default_rng(i).normal(size=(9, 256)).astype(np.float32) for i in range(2)]
    with LlamaCppModel(llm_file, n_ctx=256, n_threads=1, kv_type="f32", flash_attn="off") as llm:
        runs = llamacpp_runs(prompts, tokenizer, template, llm, rows, new_tokens=4, embd_scale=1.0)
    same = compare_llm_files(manifest, bundle, llm_file, llm_file, 4, 8, source_runs=runs)
    assert same["source_runs"] == "the export's check (reused)" and same["prompts"] == 2 and same["new_tokens"] == 4
    assert same["greedy_token_agreement"] == 100.0 and same["answers_identical"] == 2
    assert same["logits_rel_diff"] == 0.0
    quantize_gguf(llm_file, tmp_path / "q4.gguf", "Q4_0")
    moved = compare_llm_files(manifest, bundle, llm_file, tmp_path / "q4.gguf", 4, 8, source_runs=runs)
    assert moved["logits_rel_diff"] > 0.0  # a different file is measured against the runs, not the runs themselves


def test_quantize_takes_the_kept_parts_of_a_scratch_source(wide, tmp_path):
    """export --bits moves the scratch bundle's kept parts into the new bundle instead of copying
    them (phi2-scale: 1.6 GB of vision.onnx.data); the check still finds the vision graph."""
    import shutil

    from tinyllava_edge.quant.bundle import quantize_bundle

    scratch = tmp_path / "scratch"
    shutil.copytree(wide["bundle"], scratch)
    inode = (scratch / "vision.onnx").stat().st_ino
    out = quantize_bundle(scratch, tmp_path / "q", quant="Q8_0", progress=False, take_files=True)
    kept = Path(out["path"]) / "vision.onnx"
    assert kept.stat().st_ino == inode and not (scratch / "vision.onnx").exists()
    assert (scratch / "llm-F16.gguf").exists()  # the source's LLM was read, not taken
    assert out["manifest"]["quantization"]["llm"]["fidelity"]["prompts"] == 4
    read_manifest(out["path"])


def test_quantized_check_fails_beyond_the_tolerance(wide, tmp_path):
    from tinyllava_edge.quant.bundle import quantize_bundle

    with pytest.raises(TinyLlavaError, match=r"check 'quantized LLM vs llm-F16.gguf' failed: .* expected <= 1e-09"):
        quantize_bundle(wide["bundle"], tmp_path / "q", quant="Q4_0", logits_tol=1e-9, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_every_bits_preset_has_a_case():
    assert set(BIT_PRESETS.keys()) == {str(b) for b in BITS_CASES}
    for bits, (llm, visions) in BITS_CASES.items():
        preset = BIT_PRESETS.get(str(bits))
        assert preset.llm == llm and {"fp32", *preset.vision} == visions and preset.llm in GGUF_TYPES


def test_quantize_cli_writes_a_new_bundle(wide, tmp_path, capsys):
    out = tmp_path / "q4"
    assert quantize_main(["--bundle", str(wide["bundle"]), "--out", str(out), "--quant", "Q4_K_M", "--onnx", "int8",
                          "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "llm-Q4_K_M.gguf" in printed and "LLM tensor types:" in printed and "greedy tokens" in printed
    manifest = read_manifest(out)
    llm = next(f for f in manifest["files"] if f["role"] == "llm")
    assert llm["quant"] == "Q4_K_M" and llm["tensor_types"]["Q4_K"] > 0 and llm["main_type"] == "Q4_K"
    assert manifest["quantization"]["llm"]["fidelity"]["prompts"] == 4
    assert (wide["bundle"] / "llm-F16.gguf").is_file()  # the source is untouched
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left behind
    # --bits 8 over the same source, fidelity floor on random weights (see the module docstring)
    assert quantize_main(["--bundle", str(wide["bundle"]), "--out", str(tmp_path / "q8"), "--bits", "8",
                          "--quiet"]) == 0
    fid = read_manifest(tmp_path / "q8")["quantization"]["llm"]["fidelity"]
    assert fid["greedy_token_agreement"] >= 75.0, fid


def _one_line_error(capsys, argv) -> str:
    try:
        code = quantize_main(argv)
    except SystemExit as stop:  # argparse refusing an option value
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_quantize_cli_bad_inputs(wide, tmp_path, capsys):
    src = str(wide["bundle"])
    assert "argument --quant: invalid choice: 'Q2_Z' (choose from 'F16', " in _one_line_error(
        capsys, ["--bundle", src, "--out", str(tmp_path / "a"), "--quant", "Q2_Z"])
    assert "is not a bundle (no manifest.json)" in _one_line_error(
        capsys, ["--bundle", str(wide["ckpt"]), "--out", str(tmp_path / "b")])
    assert "--bits 5 is not offered" in _one_line_error(capsys, ["--bundle", src, "--out", str(tmp_path / "c"),
                                                                  "--bits", "5"])
    assert "argument --onnx: invalid choice: 'int2' (choose from 'int4', 'int8')" in _one_line_error(
        capsys, ["--bundle", src, "--out", str(tmp_path / "d"), "--onnx", "int2"])
    q8 = tmp_path / "q8"
    assert quantize_main(["--bundle", src, "--out", str(q8), "--bits", "8", "--no-verify", "--quiet"]) == 0
    capsys.readouterr()
    assert "holds a Q8_0 LLM; quantize from a 16- or 32-bit bundle" in _one_line_error(
        capsys, ["--bundle", str(q8), "--out", str(tmp_path / "e")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()
    with pytest.raises(SystemExit) as done:
        quantize_main(["--help"])
    assert done.value.code == 0 and "tinyllava-quantize" in capsys.readouterr().out


def test_mmproj_q8_0_loads_in_stock_llama_cpp(wide, tmp_path):
    from tinyllava_edge.export.validate import measure_mmproj
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration
    from tinyllava_edge.quant.mmproj import quantize_mmproj

    report = quantize_mmproj(wide["bundle"] / "mmproj-F16.gguf", tmp_path / "mmproj-Q8_0.gguf")
    assert "Q8_0" in report["tensor_types"].values() and report["tensor_types"]["v.patch_embd.weight"] == "F16"
    model = TinyLlavaForConditionalGeneration.from_pretrained(wide["ckpt"]).eval()
    image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    f16 = measure_mmproj(wide["bundle"] / "mmproj-F16.gguf", wide["bundle"] / "llm-F16.gguf", model, image)
    q8 = measure_mmproj(tmp_path / "mmproj-Q8_0.gguf", wide["bundle"] / "llm-F16.gguf", model, image)
    assert q8["mean_cosine"] >= f16["mean_cosine"] - 0.01, (q8["mean_cosine"], f16["mean_cosine"])
    with pytest.raises(TinyLlavaError, match="is not an mmproj"):
        quantize_mmproj(wide["bundle"] / "llm-F16.gguf", tmp_path / "x.gguf")


def test_every_registered_scheme_has_a_case():
    assert set(TORCH_SCHEMES.keys()) == set(TORCH_CASES) | {"gptq"}
    assert set(ONNX_SCHEMES.keys()) == set(ONNX_MIN_COSINE)
    assert set(GGUF_TYPES.keys()) == {"F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"}
