"""The edge bundle: export_bundle, its manifest, its checks, tinyllava-export, and the llama.cpp wrapper.

Every miniature (each LLM family x tower x layout of the released models) is exported as an F32
bundle with the checks on, then read back the way the edge runtime will: manifest facts only,
onnxruntime for the image, llama.cpp (tinyllava_edge.llamacpp) for the text with the image rows
injected, no torch on that side. Greedy tokens must equal `model.generate`'s on image prompts:
10 prompts for TinyLLaVA-Qwen2-0.5B-SigLIP and TinyLLaVA-Gemma-SigLIP-2.4B (the family whose
input rows llama.cpp scales), 4 elsewhere.

Measured here (1 thread, F32 files, llama.cpp KV cache F32, flash attention off): ONNX fp32 vs
torch <= 2.7e-7 max abs; prompt logits with an image ~1e-6 max abs for the SiLU families, 2.6e-4
(gemma) and 1.0e-3 (phi: ggml's F16 GELU table) for the GELU ones; greedy identical everywhere;
tokenizer parity 100 % (TinyLlama's documented leading-'▁' texts left out); stock mmproj cosine
> 0.99999 for SigLIP towers and ~-0.17 / -0.03 for CLIP (llama.cpp issue 25814).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

from tinyllava_edge.bundle import read_manifest  # noqa: E402
from tinyllava_edge.export import PRECISIONS, export_bundle  # noqa: E402
from tinyllava_edge.export import bundle as bundle_module  # noqa: E402
from tinyllava_edge.export.checks import image_prompt, synthetic_images  # noqa: E402
from tinyllava_edge.llamacpp import LlamaCppTokenizer  # noqa: E402

from tinyllava_edge.cli.export import main as export_main  # noqa: E402
from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from tinyllava_edge.data.template import Template  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from tinyllava_edge.llamacpp import LlamaCppModel, split_segments  # noqa: E402
from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer  # noqa: E402
from tinyllava_edge.testing.checkpoints import MINIATURES, build_miniature, random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEN_PROMPTS = {"TinyLLaVA-Qwen2-0.5B-SigLIP", "TinyLLaVA-Gemma-SigLIP-2.4B"}
NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="module")
def exported(root):
    """name -> (checkpoint dir, export_bundle result): F32 bundles, checks on, built on first use."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str):
        if name not in cache:
            torch.set_num_threads(1)
            ckpt = build_miniature(name, root / "ckpt" / name)
            result = export_bundle(ckpt, root / "out" / name, bits=32, progress=False)
            cache[name] = (ckpt, result)
        return cache[name]

    return get


# -- what the runtime will do: manifest facts, onnxruntime, llama.cpp; no torch -----------------------

def _edge_generate(bundle: Path, images, new_tokens: int) -> list[list[int]]:
    manifest = read_manifest(bundle)
    pre = PreprocessConfig.from_dict(manifest["preprocess"])
    template = Template.from_dict(manifest["template"])
    (vision,) = [f for f in manifest["files"] if f["role"] == "vision" and f["quant"] == "fp32"]
    (llm_file,) = [f for f in manifest["files"] if f["role"] == "llm"]
    session = ort.InferenceSession(str(bundle / vision["name"]), providers=["CPUExecutionProvider"])
    eos = manifest["tokenizer"]["eos_token_id"]
    out = []
    with LlamaCppModel(bundle / llm_file["name"], n_ctx=512, n_threads=1, kv_type="f32", flash_attn="off") as llm:
        tokenizer = LlamaCppTokenizer(llm)
        for i, image in enumerate(images):
            ids = template.encode(image_prompt(i), tokenizer, mode="eval")["input_ids"]
            (rows,) = session.run(["image_embeds"], {"pixel_values": preprocess(image, pre)})[0]
            segments = split_segments(ids, [rows * llm_file["image_features_scale"] * llm_file["embd_input_scale"]])
            out.append(llm.generate(segments, new_tokens, stop_ids=[eos]))
    return out


def _torch_generate(ckpt: Path, images, new_tokens: int) -> list[list[int]]:
    from tinyllava_edge.export.onnx_vision import preprocess_config

    from tinyllava_edge.data.template import default_template_for_family, get_template

    model = TinyLlavaForConditionalGeneration.from_pretrained(ckpt)
    tokenizer = load_tokenizer(ckpt)
    template = get_template(default_template_for_family(model.config.text_config.model_type))
    out = []
    for i, image in enumerate(images):
        ids = template.encode(image_prompt(i), tokenizer, mode="eval")["input_ids"]
        pixels = torch.from_numpy(preprocess(image, preprocess_config(model)))
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), images=pixels, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
        out.append(new[0].tolist())
    return out


@pytest.mark.parametrize("name", list(MINIATURES))
def test_f32_bundle_greedy_matches_torch(name, exported):
    ckpt, result = exported(name)
    images = synthetic_images(10 if name in TEN_PROMPTS else 4, seed=7)
    edge = _edge_generate(Path(result["path"]), images, NEW_TOKENS)
    reference = _torch_generate(ckpt, images, NEW_TOKENS)
    assert edge == reference
    assert all(len(t) >= 1 for t in edge)


@pytest.mark.parametrize("name", list(MINIATURES))
def test_f32_bundle_validation_figures(name, exported):
    _, result = exported(name)
    manifest = result["manifest"]
    v = manifest["validation"]
    assert v["enabled"] is True
    assert v["vision_onnx"]["max_abs_diff"] <= 1e-4
    llm = v["llm"]
    assert llm["greedy_identical"] == llm["prompts"] == 3 and llm["prompt_ids_equal"] == 3
    assert llm["logits_rel_diff"] <= PRECISIONS.get("32").logits_tol
    assert v["tokenizer"]["percent"] == 100.0 and v["tokenizer"]["mismatched"] == []
    family, tower = MINIATURES[name].family, MINIATURES[name].tower
    # Only TinyLlama's SentencePiece conversion has the documented leading-'▁' difference.
    assert bool(v["tokenizer"]["known_deviation"]) == (family == "llama")
    mm = v["mmproj"]
    if tower == "siglip":
        assert mm["min_cosine"] > 0.9999
    else:  # stock llama.cpp mis-orders CLIP's CLS token (llama.cpp issue 25814): recorded, not failed
        assert mm["mean_cosine"] < 0.9 and any("25814" in d for d in mm["known_deviations"])
    (llm_file,) = [f for f in manifest["files"] if f["role"] == "llm"]
    expected_scale = 1 / np.sqrt(llm_file["n_embd"]) if family == "gemma" else 1.0
    assert llm_file["embd_input_scale"] == pytest.approx(expected_scale)
    # torch scales Gemma's image rows as transformers 4 did (the Factory's training); with the
    # llama.cpp 0.3.36 vendors the two factors cancel: the raw connector output goes in.
    expected_features = np.sqrt(llm_file["n_embd"]) if family == "gemma" else 1.0
    assert llm_file["image_features_scale"] == pytest.approx(expected_features, rel=1e-6)
    print(f"{name}: onnx {v['vision_onnx']['max_abs_diff']:.1e}, logits {llm['logits_max_abs_diff']:.1e}, "
          f"greedy {llm['greedy_identical']}/{llm['prompts']}, tokenizer {v['tokenizer']['percent']:.0f} %, "
          f"mmproj cosine {mm['min_cosine']:.4f}")


@pytest.mark.parametrize("name", list(MINIATURES))
def test_bundle_files_and_manifest(name, exported):
    _, result = exported(name)
    bundle = Path(result["path"])
    manifest = read_manifest(bundle)
    assert manifest == json.loads((bundle / "manifest.json").read_text()) == result["manifest"]
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["llm-F32.gguf", "manifest.json", "mmproj-F32.gguf", "vision.onnx"]
    onnx.checker.check_model(str(bundle / "vision.onnx"), full_check=True)
    for file in ("llm-F32.gguf", "mmproj-F32.gguf"):
        reader = gguf.GGUFReader(bundle / file)
        assert len(reader.tensors) > 0
    reader = gguf.GGUFReader(bundle / "llm-F32.gguf")
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.embedding_length"].contents() == manifest["model"]["hidden_size"]
    assert manifest["format_version"] == 1 and manifest["bits"] == 32
    assert manifest["source"]["layout"] == MINIATURES[name].layout
    assert [f["name"] for f in manifest["source"]["files"]] == ["config.json", "model.safetensors"]
    assert manifest["model"]["llm_family"] == MINIATURES[name].family
    assert manifest["model"]["vision_tower"] == MINIATURES[name].tower
    assert manifest["template"]["stop"] and manifest["preprocess"]["size"]
    for record in manifest["files"]:
        assert record["size"] == (bundle / record["name"]).stat().st_size and len(record["sha256"]) == 64


# -- the manifest refuses broken bundles ----------------------------------------------------------------

@pytest.fixture
def copy(exported, tmp_path):
    _, result = exported("TinyLLaVA-Qwen2-0.5B-SigLIP")
    target = tmp_path / "bundle"
    shutil.copytree(result["path"], target)
    return target


def _edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _file(data: dict, role: str) -> dict:
    return next(f for f in data["files"] if f["role"] == role)


def test_manifest_rejects_a_tampered_file(copy):
    path = copy / "llm-F32.gguf"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(raw))
    with pytest.raises(TinyLlavaError, match=r"llm-F32.gguf has sha256 .* manifest records .* changed after export"):
        read_manifest(copy)
    read_manifest(copy, check_hashes=False)  # sizes still agree: only the hash tells


def test_manifest_rejects_a_missing_file(copy):
    (copy / "mmproj-F32.gguf").unlink()
    with pytest.raises(TinyLlavaError, match=r"bundle file mmproj-F32.gguf \(mmproj\) is missing"):
        read_manifest(copy)


def test_manifest_rejects_an_unknown_version(copy):
    _edit_manifest(copy, lambda d: d.update(format_version=2))
    with pytest.raises(TinyLlavaError, match="format_version 2; this tinyllava-edge reads format_version 1"):
        read_manifest(copy)


@pytest.mark.parametrize("change, message", [
    (lambda d: _file(d, "llm").update(n_embd=32),
     "vision.onnx gives 64-wide image embeddings but llm-F32.gguf has n_embd 32"),
    (lambda d: _file(d, "vision").update(n_tokens=16), "vision.onnx gives 16 image tokens but the model records 15"),
    (lambda d: _file(d, "mmproj").update(hidden=48),
     "mmproj-F32.gguf projects to 48 wide but llm-F32.gguf has n_embd 64"),
    (lambda d: d["preprocess"].update(size=[32, 32]),
     r"takes \[30, 30\] pixel images but the preprocessing makes \[32, 32\]"),
])
def test_manifest_rejects_mismatched_parts(copy, change, message):
    _edit_manifest(copy, change)
    with pytest.raises(TinyLlavaError, match=message):
        read_manifest(copy)


def test_manifest_rejects_a_folder_without_one(tmp_path):
    with pytest.raises(TinyLlavaError, match="holds no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(TinyLlavaError, match="holds a list; expected a JSON object"):
        read_manifest(tmp_path)


# -- writing: atomic, overwrite rules, skipped parts, formats, bit widths -------------------------------

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def small_ckpt(root):
    return build_miniature("TinyLLaVA-Phi-2-CLIP", root / "ckpt-small")


def test_failure_mid_export_leaves_nothing(small_ckpt, tmp_path, monkeypatch):
    # the LLM GGUF is written by this process (the vision parts by a child: export/vision_stage.py)
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", broken)
    out = tmp_path / "bundle"
    with pytest.raises(TinyLlavaError, match=r"the disk filled up while writing .* \(No space left on device\); "
                                             "nothing was written there"):
        export_bundle(small_ckpt, out, bits=32, verify=False, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failed_check_names_it_and_leaves_nothing(small_ckpt, tmp_path, monkeypatch):
    strict = bundle_module.Precision(32, "F32", "f32", logits_tol=1e-12, exact_greedy=True)
    monkeypatch.setattr(bundle_module, "precision_for", lambda bits: strict)
    out = tmp_path / "bundle"
    with pytest.raises(TinyLlavaError, match=r"check 'LLM with image, llama.cpp vs PyTorch' failed: .* <= 1e-12"):
        export_bundle(small_ckpt, out, bits=32, progress=False, check_images=1)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_rules(small_ckpt, exported, tmp_path):
    _, previous = exported("TinyLLaVA-Phi-2-CLIP")
    out = tmp_path / "bundle"
    shutil.copytree(previous["path"], out)
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(TinyLlavaError, match="is not empty; pass overwrite=True"):
        export_bundle(small_ckpt, out, verify=False, progress=False)
    result = export_bundle(small_ckpt, out, fmt="onnx", bits=32, overwrite=True, verify=False, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "vision.onnx"]
    assert result["manifest"]["validation"] == {"enabled": False}
    assert _leftovers(tmp_path) == []
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(TinyLlavaError, match="holds no bundle manifest.json; refusing to replace it"):
        export_bundle(small_ckpt, other, overwrite=True, progress=False)
    assert (other / "mine.txt").read_text() == "x"


def test_onnx_format_bundle(small_ckpt, tmp_path):
    result = export_bundle(small_ckpt, tmp_path / "empty-before", fmt="onnx", bits=16, progress=False)
    bundle = Path(result["path"])
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "vision-fp16.onnx", "vision.onnx"]
    manifest = read_manifest(bundle)
    assert [f["quant"] for f in manifest["files"]] == ["fp32", "fp16"]
    assert manifest["validation"]["vision_onnx_fp16"]["min_token_cosine"] > 0.999
    assert manifest["model"]["llm_architecture"] is None


def test_dinov2_tower_skips_the_mmproj(root, tmp_path):
    from transformers import AutoConfig

    ckpt = build_miniature("TinyLLaVA-TinyLlama-SigLIP", tmp_path / "ckpt")
    config = TinyLlavaForConditionalGeneration.from_pretrained(ckpt).config
    config.vision_config = AutoConfig.for_model("dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=28, patch_size=7)
    config.vision_hidden_size = 32
    random_model(config).save_pretrained(ckpt)
    result = export_bundle(ckpt, tmp_path / "bundle", bits=32, progress=False, check_images=2)
    manifest = result["manifest"]
    assert [s["role"] for s in manifest["skipped"]] == ["mmproj"]
    assert "'dinov2' cannot be written as a stock llama.cpp mmproj" in manifest["skipped"][0]["reason"]
    assert manifest["validation"]["llm"]["greedy_identical"] == 2 and "mmproj" not in manifest["validation"]
    assert manifest["model"]["vision_tower"] == "dinov2"


def test_bit_widths():
    # export writes 16 and 32 bits itself; 8 and 4 are the quant stage's (tests/test_quant.py), and
    # export never imports it: the sentence says where quantized bundles come from
    with pytest.raises(TinyLlavaError, match=r"bundles of 16 or 32 bits, not 8; .*quant stage .*export_quantized"):
        export_bundle("unused", "unused", bits=8)
    with pytest.raises(TinyLlavaError, match="bundles of 16 or 32 bits, not 12;"):
        export_bundle("unused", "unused", bits=12)
    with pytest.raises(ValueError, match="registered twice"):
        PRECISIONS.add("16", PRECISIONS.get("16"))
    with pytest.raises(TinyLlavaError, match="bundle format 'tflite'"):
        export_bundle("unused", "unused", fmt="tflite")


def test_every_precision_has_a_test_case():
    # 32: the miniature bundles above; 16: the CLI run below. The quantized widths are the quant
    # stage's presets (tests/test_quant.py::test_every_bits_preset_has_a_case).
    assert set(PRECISIONS.keys()) == {"16", "32"}


# -- the command ---------------------------------------------------------------------------------------

def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        export_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinyllava-export") and "--no-verify" in out and "{4,8,16,32}" in out


def test_cli_exports_f16_with_a_summary(small_ckpt, tmp_path, capsys):
    assert export_main(["--model", str(small_ckpt), "--out", str(tmp_path / "b"), "--check-images", "2"]) == 0
    captured = capsys.readouterr()
    assert "[1/9] reading" in captured.err and "peak RSS" in captured.err
    out = captured.out
    for part in ("vision.onnx", "llm-F16.gguf", "mmproj-F16.gguf", "manifest.json", "KiB",
                 "greedy tokens identical on", "tokenizer         100.0 %", "known deviations"):
        assert part in out, part
    manifest = read_manifest(tmp_path / "b")
    assert manifest["bits"] == 16 and {f["quant"] for f in manifest["files"]} == {"fp32", "F16"}


def _one_line_error(capsys, argv) -> str:
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(small_ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "does not exist" in _one_line_error(capsys, ["--model", str(tmp_path / "nope"), "--out", out])
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _one_line_error(capsys, ["--model", str(tmp_path / "empty"), "--out", out])
    (tmp_path / "file").write_text("x")
    assert "is a file; expected a directory" in _one_line_error(
        capsys, ["--model", str(small_ckpt), "--out", str(tmp_path / "file")])
    assert "does not exist" in _one_line_error(capsys, ["--model", str(tmp_path / "nope"), "--out", out, "--bits", "4"])
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    config = json.loads((small_ckpt / "config.json").read_text())
    config["text_config"]["model_type"] = "mistral"
    (mistral / "config.json").write_text(json.dumps(config))
    assert "'mistral'" in _one_line_error(capsys, ["--model", str(mistral), "--out", out])
    assert not Path(out).exists() and _leftovers(tmp_path) == []


def test_cli_error_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinyllava_edge.cli.export", "--model", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr


# -- the llama.cpp wrapper -----------------------------------------------------------------------------

def test_llamacpp_wrapper_needs_no_torch(exported):
    """The edge path imports and runs with torch unimportable."""
    _, result = exported("TinyLLaVA-Qwen2-0.5B-SigLIP")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from tinyllava_edge.llamacpp import LlamaCppModel, split_segments
        from tinyllava_edge.bundle import read_manifest
        manifest = read_manifest({result['path']!r})
        with LlamaCppModel({result['path']!r} + "/llm-F32.gguf", n_ctx=64, n_threads=1) as llm:
            rows = np.zeros((15, llm.n_embd), np.float32)
            ids = llm.generate(split_segments(llm.tokenize("Hi <image> there") + [-200] + [1, 2], [rows]), 3)
            assert len(ids) >= 1
        assert "torch" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_llamacpp_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(TinyLlavaError, match=r"llama.cpp cannot load .*bad.gguf \(.+\)"):
        LlamaCppModel(bad)
    with pytest.raises(TinyLlavaError, match="does not exist"):
        LlamaCppModel(tmp_path / "none.gguf")
    with pytest.raises(TinyLlavaError, match="KV-cache type 'q3'"):
        LlamaCppModel(bad, kv_type="q3")


def test_llamacpp_wrapper_api(exported):
    _, result = exported("TinyLLaVA-TinyLlama-SigLIP")
    path = Path(result["path"]) / "llm-F32.gguf"
    with LlamaCppModel(path, vocab_only=True) as vocab:
        ids = vocab.tokenize("Hello world")
        assert ids[0] == vocab.bos_id and vocab.add_bos
        assert vocab.detokenize(ids[1:]).strip() == "Hello world"
        with pytest.raises(TinyLlavaError, match="vocab-only"):
            vocab.decode_tokens(ids)
    with LlamaCppModel(path, n_ctx=32, n_threads=1, n_batch=8) as llm:
        first = llm.decode_tokens(ids)
        assert first.shape == (llm.n_vocab,) and llm.n_past == len(ids)
        llm.decode_embeddings(np.zeros((20, llm.n_embd), np.float32))  # split over batches of 8
        assert llm.n_past == len(ids) + 20
        room = llm.n_ctx - llm.n_past  # llama.cpp may round the context up
        with pytest.raises(TinyLlavaError, match=f"do not fit the {llm.n_ctx}-token context"):
            llm.decode_embeddings(np.zeros((room + 1, llm.n_embd), np.float32))
        llm.clear()
        assert llm.n_past == 0
        assert np.array_equal(llm.decode_tokens(ids), first)  # a cleared cache starts afresh
        with pytest.raises(TinyLlavaError, match=r"shape \(n, 64\)"):
            llm.decode_embeddings(np.zeros((2, 3), np.float32))
        with pytest.raises(TinyLlavaError, match="outside the vocabulary"):
            llm.decode_tokens([-200])
        assert llm.generate([ids], 3, stop_ids=()) == llm.generate([ids], 3, stop_ids=())


def test_split_segments():
    rows = np.ones((2, 4), np.float32)
    segments = split_segments([1, 2, -200, 3], [rows])
    assert segments[0] == [1, 2] and segments[1] is not None and segments[2] == [3]
    assert split_segments([-200], [rows])[0].shape == (2, 4)
    with pytest.raises(TinyLlavaError, match="1 image placeholders for 2 images"):
        split_segments([-200], [rows, rows])
    with pytest.raises(TinyLlavaError, match="more image placeholders"):
        split_segments([-200, -200], [rows])
