"""Bad inputs: paths, checkpoints and artifacts (bundles, GGUF, ONNX, manifests): each case ends
in one clear sentence from the API or the command, never a traceback (harness: bad_input_harness.py).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

import tinyllava_edge  # noqa: E402
from tinyllava_edge.bundle import read_manifest  # noqa: E402
from bad_input_harness import Corpus, EXACT, _chat, _export, _quantize, _train  # noqa: E402

CASES = Corpus()
case = CASES.case

# paths

@case("path/api-missing")
def _(c):
    c.api(lambda: tinyllava_edge.load(c.tmp / "nowhere"), "does not exist; expected a bundle directory")


@case("path/api-file-for-folder")
def _(c):
    c.api(lambda: tinyllava_edge.load(c.bundle / "manifest.json"), "is a file; expected a bundle directory")


@case("path/api-empty-folder")
def _(c):
    (c.tmp / "empty").mkdir()
    c.api(lambda: tinyllava_edge.load(c.tmp / "empty"), "neither a bundle .no manifest.json. nor a checkpoint")


@case("path/api-no-permission")
def _(c):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading, so there is no error to see")
    bundle = c.bundle_copy()
    (bundle / "manifest.json").chmod(0)
    try:
        c.api(lambda: read_manifest(bundle), "manifest.json")
    finally:
        (bundle / "manifest.json").chmod(0o644)


@case("path/chat-cli-missing-model")
def _(c):
    c.cli(_chat, ["--model", c.tmp / "nowhere", "--prompt", "hi"], "does not exist")


@case("path/export-cli-file-for-checkpoint")
def _(c):
    c.cli(_export, ["--model", c.ckpt / "config.json", "--out", c.tmp / "out", "--quiet"], "is a file")


@case("path/quantize-cli-empty-folder")
def _(c):
    (c.tmp / "empty").mkdir()
    c.cli(_quantize, ["--bundle", c.tmp / "empty", "--out", c.tmp / "q", "--quiet"], "manifest.json")


@case("path/train-cli-missing-data")
def _(c):
    c.cli(_train, ["--model", c.ckpt, "--data", c.tmp / "absent.json", "--output", c.tmp / "run", "--max-steps", 1],
          "does not exist")


@case("path/export-cli-out-is-a-file")
def _(c):
    (c.tmp / "taken").write_text("x")
    c.cli(_export, ["--model", c.ckpt, "--out", c.tmp / "taken", "--quiet"], "taken")


# checkpoints

@case("ckpt/corrupt-config-json")
def _(c):
    ckpt = c.ckpt_copy()
    (ckpt / "config.json").write_text("{ not json")
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "config.json is not valid JSON")


@case("ckpt/unknown-model-type")
def _(c):
    ckpt = c.edit_config(lambda raw: raw.update(model_type="bert", architectures=["BertModel"]))
    c.cli(_export, ["--model", ckpt, "--out", c.tmp / "out", "--quiet"], "'bert'")


@case("ckpt/unknown-llm-family")
def _(c):
    ckpt = c.edit_config(lambda raw: raw["text_config"].update(model_type="mistral"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "'mistral'")


@case("ckpt/unknown-vision-tower")
def _(c):
    ckpt = c.edit_config(lambda raw: raw["vision_config"].update(model_type="beit_vision_model"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "beit_vision_model")


@case("ckpt/unknown-connector")
def _(c):
    ckpt = c.edit_config(lambda raw: raw.update(connector_type="mlp9x_swish"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), "mlp9x_swish")


@case("ckpt/truncated-safetensors")
def _(c):
    ckpt = c.ckpt_copy()
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    c.cli(_export, ["--model", ckpt, "--out", c.tmp / "out", "--quiet"], "not a readable safetensors file")


@case("ckpt/wrong-shape-weights")
def _(c):
    from safetensors.torch import load_file, save_file

    ckpt = c.ckpt_copy()
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["connector._connector.0.weight"] = torch.zeros(5, 7)
    save_file(tensors, str(ckpt / "model.safetensors"))
    c.api(lambda: tinyllava_edge.load(ckpt, device="cpu"), r"connector._connector.0.weight \(5, 7\) in the file")


# artifacts

@case("artifact/truncated-gguf")
def _(c):
    bundle = c.spoil_part("llm", lambda data: data[: len(data) // 2])
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "llama.cpp cannot load")


@case("artifact/corrupt-gguf")
def _(c):
    bundle = c.spoil_part("llm", lambda data: b"GGUF" + bytes(reversed(data[4:])))
    c.cli(_chat, ["--model", bundle, "--device", "cpu", "--prompt", "hi"], "llama.cpp cannot load")


@case("artifact/truncated-onnx")
def _(c):
    bundle = c.spoil_part("vision", lambda data: data[: len(data) // 2])
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "onnxruntime cannot load vision.onnx")


@case("artifact/corrupt-onnx")
def _(c):
    bundle = c.spoil_part("vision", lambda data: np.random.default_rng(1).bytes(len(data)))
    c.cli(_chat, ["--model", bundle, "--device", "cpu", "--prompt", "hi"], "onnxruntime cannot load vision.onnx")


@case("artifact/manifest-missing")
def _(c):
    bundle = c.bundle_copy()
    (bundle / "manifest.json").unlink()
    c.api(lambda: read_manifest(bundle), "holds no manifest.json")


@case("artifact/manifest-not-json")
def _(c):
    bundle = c.bundle_copy()
    (bundle / "manifest.json").write_text('{"format_version": 1, "files": [')
    c.cli(_chat, ["--model", bundle, "--prompt", "hi"], "manifest.json is not valid JSON")


@case("artifact/manifest-unknown-version")
def _(c):
    bundle = c.edit_manifest(lambda m: m.update(format_version=99))
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "format_version 99; this tinyllava-edge reads format_version 1")


@case("artifact/manifest-names-a-missing-file")
def _(c):
    bundle = c.bundle_copy()
    (bundle / "vision.onnx").unlink()
    c.cli(_quantize, ["--bundle", bundle, "--out", c.tmp / "q", "--bits", 8, "--quiet"],
          r"bundle file vision.onnx \(vision\) is missing")


@case("artifact/sha256-mismatch")
def _(c):
    bundle = c.bundle_copy()
    path = next(bundle.glob("llm-*.gguf"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "the file was changed after export")


@case("artifact/parts-disagree")
def _(c):
    def widen(m):
        next(r for r in m["files"] if r["role"] == "vision")["hidden"] = 4096
    bundle = c.edit_manifest(widen)
    c.api(lambda: tinyllava_edge.load(bundle, **EXACT), "4096-wide image embeddings but .* has n_embd 64")


@case("artifact/file-entry-escapes-the-bundle")
def _(c):
    bundle = c.edit_manifest(lambda m: m["files"][0].update(name="../../etc/passwd"))
    c.api(lambda: read_manifest(bundle), "without a plain file name")


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ctx):
    CASES[name](ctx)
