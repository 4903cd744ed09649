"""GPTQ 4-bit of a checkpoint's LLM (quant/torch_gptq.py) and loading it (model/gptq.py).

Tests marked `gptq` need GPTQModel, which only .venv-gptq holds (scripts/test-gptq.sh runs them;
elsewhere they skip with that reason). The others run in the main suite: the RTN grid, the group
size rule, the virtual-token calibration being exact, the errors raised before GPTQModel is
needed, and the one sentence a GPTQ checkpoint gives without GPTQModel.

Model: the TinyLlama miniature (hidden 64, FFN 128, 2 layers: group size 64; 14 linears besides
lm_head), random weights, calibrated on a generated 40-image shapes set. Floors, measured on it
(16 calibration + 16 held-out samples): GPTQ logits rel diff vs fp32 0.13 (RTN on the same grid
0.27), teacher-forced top-1 76 % (RTN 53 %), first-token logits through the runtime 0.12 (max
0.15). Random weights make near-ties common, so greedy continuations are not compared token by
token; the trained model's figures are in docs/quality.md.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tinyllava_edge  # noqa: E402
from tinyllava_edge.cli.quantize import main as quantize_main  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from tinyllava_edge.model import TinyLlavaForConditionalGeneration, save_checkpoint  # noqa: E402
from tinyllava_edge.model.gptq import GPTQ_LLM_DIR, QUANTIZATION_RECORD  # noqa: E402
from tinyllava_edge.quant import torch_gptq as tg  # noqa: E402
from tinyllava_edge.testing import checkpoints as ck  # noqa: E402

HAS_GPTQMODEL = importlib.util.find_spec("gptqmodel") is not None
MINIATURE = "TinyLLaVA-TinyLlama-SigLIP"
N_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays fp32
SAMPLES = 16
MAX_REL_DIFF = 0.2  # GPTQ logits vs fp32 (measured 0.13)
MIN_TOP1 = 65.0  # teacher-forced top-1 agreement with fp32, % (measured 76)
MAX_FIRST_TOKEN_REL = 0.2  # first answer token's logits through tinyllava_edge.load (measured 0.12, max 0.15)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The miniature checkpoint and a small shapes data set (its own tokenizer renders the text)."""
    from tinyllava_edge.data.shapes import write_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gptq")
    ckpt = ck.build_miniature(MINIATURE, root / "ckpt")
    write_dataset(root / "data", n_train=40, n_val=4, n_test=8)
    return {"root": root, "ckpt": ckpt, "data": root / "data"}


@pytest.fixture(scope="module")
def quantized(mini):
    out = mini["root"] / "gptq"
    result = tg.quantize_gptq(mini["ckpt"], out, data=mini["data"], n_samples=SAMPLES, progress=False)
    return {**mini, "out": out, "result": result}


def _fake_gptq_checkpoint(src: Path, out: Path) -> Path:
    """A checkpoint in the GPTQ layout (no real quantized weights): enough for what happens before loading."""
    model = TinyLlavaForConditionalGeneration.from_pretrained(src)
    save_checkpoint(model, out, state_dict={k: v for k, v in model.state_dict().items()
                                            if not k.startswith("language_model.")})
    (out / GPTQ_LLM_DIR).mkdir()
    (out / GPTQ_LLM_DIR / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64}}))
    (out / QUANTIZATION_RECORD).write_text(json.dumps({"method": "gptq", "quantized_linears": N_LINEARS}))
    for f in src.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


# -- without GPTQModel -------------------------------------------------------------------------------

def test_rtn_grid():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    q = tg.rtn_fake_quant(w, 4, 64)
    assert q.shape == w.shape and q.dtype == w.dtype
    groups, wg = q.reshape(8, 2, 64), w.reshape(8, 2, 64)  # (rows, groups, inputs per group)
    assert all(len(torch.unique(g)) <= 16 for g in groups.reshape(16, 64))
    scale = 2 * wg.abs().amax(-1, keepdim=True) / 15  # GPTQ's symmetric 4-bit step
    assert ((groups - wg).abs() <= scale / 2 + 1e-6).all()  # round to nearest
    steps = groups / scale
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)  # on the grid
    assert steps.round().min() == -8 and steps.round().max() <= 7  # levels -8..7 (zero point 8)
    per_row = tg.rtn_fake_quant(w, 4, -1)
    assert all(len(torch.unique(r)) <= 16 for r in per_row) and not torch.equal(per_row, q)


def test_group_size_rule(mini):
    llm = TinyLlavaForConditionalGeneration.from_pretrained(mini["ckpt"]).language_model
    assert len(tg.quantizable_linears(llm)) == N_LINEARS and "lm_head" not in tg.quantizable_linears(llm)
    assert tg.choose_group_size(llm, None) == 64  # widths 64 (attention, gate/up) and 128 (down)
    assert tg.choose_group_size(llm, 32) == 32 and tg.choose_group_size(llm, -1) == -1
    with pytest.raises(TinyLlavaError, match="group size 128 does not divide the LLM's input widths 64"):
        tg.choose_group_size(llm, 128)
    with pytest.raises(TinyLlavaError, match="group size 48 is not offered"):
        tg.choose_group_size(llm, 48)
    cfg = ck.miniature_config("llama", "siglip", 128, text_config={
        **ck._TEXT["llama"], "hidden_size": 40, "intermediate_size": 120, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 128})
    odd = ck.random_model(cfg).language_model
    with pytest.raises(TinyLlavaError, match=r"no GPTQ group size of 128, 64, 32, 16 divides every input width of "
                                             r"this LLM \(40, 120\); pass group size -1"):
        tg.choose_group_size(odd, None)


@pytest.mark.parametrize("name", [MINIATURE, "TinyLLaVA-Qwen2-0.5B-SigLIP", "TinyLLaVA-Gemma-SigLIP-2.4B"])
def test_virtual_tokens_are_exactly_the_spliced_image_rows(mini, name, tmp_path):
    """What GPTQModel is given (ids, image rows as extra embedding rows) runs the LLM exactly as the
    runtime's inputs_embeds do (Qwen2: tied lm_head; Gemma: the embedding scales by sqrt(hidden))."""
    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.data.template import default_template_for_family, get_template
    from tinyllava_edge.model import load_tokenizer

    ckpt = ck.build_miniature(name, tmp_path / "ckpt")
    model = TinyLlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    config = model.config
    pre = PreprocessConfig.for_tower(config.vision_config.model_type, config.vision_config.image_size,
                                     config.image_aspect_ratio)
    template = get_template(default_template_for_family(config.llm_family))
    records = tg.read_records(tg.calibration_file(mini["data"]), 3)
    samples = tg.calibration_samples(records, mini["data"], load_tokenizer(ckpt), template, pre)
    rows = tg._image_rows(model, samples)
    vocab = model.language_model.get_input_embeddings().weight.shape[0]
    ids, n_virtual = tg._virtual_ids(samples, rows, vocab, 10_000)
    assert n_virtual == sum(r.shape[0] for r in rows) and max(max(i) for i in ids) == vocab + n_virtual - 1
    twin = tg._llm_with_virtual_rows(model.language_model, rows)
    spliced = tg._spliced(model, samples, 10_000)
    with torch.inference_mode():
        for sample_ids, embeds in zip(ids, spliced):
            mine = twin.get_input_embeddings()(torch.tensor([sample_ids]))
            assert mine.shape == embeds.shape
            torch.testing.assert_close(mine, embeds, rtol=1e-6, atol=1e-6)
            got = twin(input_ids=torch.tensor([sample_ids])).logits[..., :vocab]
            torch.testing.assert_close(got, model.language_model(inputs_embeds=embeds).logits, rtol=1e-4, atol=1e-4)
    assert model.language_model.get_input_embeddings().weight.shape[0] == vocab  # the source is untouched


def test_errors_before_any_work(mini, tmp_path):
    ckpt, data = mini["ckpt"], mini["data"]
    cases = [
        (dict(bits=8), "GPTQ bits 8 is not offered"),
        (dict(group_size=48), "group size 48 is not offered; expected one of 128, 64, 32, 16, -1"),
        (dict(n_samples=3), "at least 8 calibration samples; 3 were asked for"),
        (dict(seq_len=4), "sequence length 4 is too short"),
        (dict(data=tmp_path / "nowhere"), "calibration data .*nowhere does not exist"),
        (dict(data=tmp_path), "holds neither instruct.json nor train.json"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TinyLlavaError, match=message) as excinfo:
            tg.quantize_gptq(ckpt, tmp_path / "out", **{"data": data, **kwargs})
        assert "\n" not in str(excinfo.value)
    with pytest.raises(TinyLlavaError, match="is the source checkpoint"):
        tg.quantize_gptq(ckpt, ckpt, data=data)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(TinyLlavaError, match="is not empty; pass overwrite=True"):
        tg.quantize_gptq(ckpt, tmp_path / "full", data=data)
    with pytest.raises(TinyLlavaError, match="holds no checkpoint config.json; refusing to replace it"):
        tg.quantize_gptq(ckpt, tmp_path / "full", data=data, overwrite=True)
    fake = _fake_gptq_checkpoint(ckpt, tmp_path / "fake")
    with pytest.raises(TinyLlavaError, match="already holds a GPTQ-quantized LLM; quantize from the fp32"):
        tg.quantize_gptq(fake, tmp_path / "out", data=data)
    assert not (tmp_path / "out").exists()


def test_gptq_checkpoint_refuses_other_uses(mini, tmp_path):
    fake = _fake_gptq_checkpoint(mini["ckpt"], tmp_path / "fake")
    with pytest.raises(TinyLlavaError, match="holds a GPTQ-quantized LLM already; load it without quantization"):
        tinyllava_edge.load(fake, device="cpu", quantization="nf4")
    with pytest.raises(TinyLlavaError, match="quantize_vision needs a quantization .nf4, fp4 or int8."):
        tinyllava_edge.load(fake, device="cpu", quantization="gptq", quantize_vision=True)
    with pytest.raises(TinyLlavaError, match="holds no GPTQ LLM; GPTQ is not applied at load time: .*setup-gptq.sh"):
        tinyllava_edge.load(mini["ckpt"], device="cpu", quantization="gptq")
    if importlib.util.find_spec("onnx") is not None:
        from tinyllava_edge.export import export_bundle

        with pytest.raises(TinyLlavaError, match="holds a GPTQ-quantized LLM .*export from the unquantized"):
            export_bundle(fake, tmp_path / "bundle", verify=False, progress=False)


@pytest.mark.skipif(HAS_GPTQMODEL, reason="GPTQModel is installed here")
def test_without_gptqmodel_one_sentence_names_the_setup(mini, tmp_path, capsys):
    fake = _fake_gptq_checkpoint(mini["ckpt"], tmp_path / "fake")
    for load in (lambda: tinyllava_edge.load(fake, device="cpu"),
                 lambda: TinyLlavaForConditionalGeneration.from_pretrained(fake),
                 lambda: tg.quantize_gptq(mini["ckpt"], tmp_path / "out", data=mini["data"])):
        with pytest.raises(TinyLlavaError, match="GPTQ needs GPTQModel.*bash scripts/setup-gptq.sh") as excinfo:
            load()
        assert "\n" not in str(excinfo.value)
    assert quantize_main(["--torch", "gptq", "--checkpoint", str(mini["ckpt"]), "--data", str(mini["data"]),
                          "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: GPTQ needs GPTQModel") and "\n" not in err and "setup-gptq.sh" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


@pytest.mark.parametrize("argv, message", [
    (["--torch", "gptq", "--out", "o"], "--torch gptq needs --checkpoint .* and --data"),
    (["--torch", "gptq", "--checkpoint", "c", "--data", "d", "--out", "o", "--onnx", "int8"],
     "--onnx apply to bundles"),
    (["--torch", "gptq", "--bundle", "b", "--out", "o"], "--bundle apply to bundles"),
    (["--bundle", "b", "--out", "o", "--group-size", "64"], "--group-size apply with --torch gptq only"),
    (["--out", "o"], "give --bundle .* or --torch gptq --checkpoint DIR --data DIR"),
])
def test_quantize_cli_mode_errors(argv, message, capsys):
    assert quantize_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(message, err), err


# -- with GPTQModel ----------------------------------------------------------------------------------

@pytest.mark.gptq
def test_checkpoint_files(quantized):
    out, record = quantized["out"], quantized["result"]["record"]
    assert record == json.loads((out / QUANTIZATION_RECORD).read_text())
    assert record["bits"] == 4 and record["group_size"] == 64 and record["quantized_linears"] == N_LINEARS
    calib = record["calibration"]
    assert calib["samples"] == SAMPLES and calib["image_rows"] == SAMPLES * 15  # 4x4 patches, Factory drops one
    assert calib["file"].endswith("instruct.json") and record["seconds"] > 0 and record["quantize_seconds"] > 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the parts, fp32 and unchanged
        names = list(f.keys())
        assert names and all(n.startswith(("vision_tower.", "connector.")) for n in names)
        source = TinyLlavaForConditionalGeneration.from_pretrained(quantized["ckpt"]).state_dict()
        assert all(torch.equal(f.get_tensor(n), source[n]) for n in names)
    llm = out / GPTQ_LLM_DIR
    config = json.loads((llm / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4
    assert config["vocab_size"] == source["language_model.model.embed_tokens.weight"].shape[0]  # image rows cut off
    assert json.loads((llm / "generation_config.json").read_text()).get("do_sample", False) is False
    with safe_open(str(llm / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith(".qweight") for k in keys) == N_LINEARS and "lm_head.weight" in keys
    assert (out / "tokenizer.json").is_file() and (llm / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no staging left behind
    assert not (out / ".fp32-llm").exists()


@pytest.mark.gptq
def test_loads_with_quantized_linears(quantized):
    from torch import nn

    vlm = tinyllava_edge.load(quantized["out"], device="cpu", n_threads=1)
    assert vlm.info()["quantization"] == "gptq" and vlm.info()["device"] == "cpu"
    model = vlm.backend.model
    assert model.quantization["layers"] == {"TorchFusedLinear": N_LINEARS}
    assert type(model.language_model.lm_head) is nn.Linear
    assert not any(type(m) is nn.Linear for n, m in model.language_model.named_modules() if ".layers." in n)
    image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert isinstance(vlm.generate(image, "What is it?", max_new_tokens=3), str)
    vlm.close()
    same = tinyllava_edge.load(quantized["out"], device="cpu", quantization="gptq")  # the option confirms it
    assert same.info()["quantization"] == "gptq"
    bf16 = TinyLlavaForConditionalGeneration.from_pretrained(quantized["out"], dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = bf16.language_model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.gptq
def test_close_to_fp32_and_better_than_rtn(quantized):
    """Held-out questions (test split, not calibrated on): GPTQ beats round-to-nearest on the same grid,
    measured here and in the record; the runtime's first-token logits stay close to fp32."""
    fid = quantized["result"]["record"]["fidelity"]
    assert fid["layers"] == {"TorchFusedLinear": N_LINEARS}
    assert fid["gptq"]["logits_rel_l2"] < 0.75 * fid["rtn"]["logits_rel_l2"], fid
    assert fid["gptq"]["logits_rel_l2"] <= MAX_REL_DIFF and fid["gptq"]["top1_agreement"] >= MIN_TOP1, fid

    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.data.template import get_template
    from tinyllava_edge.model import load_tokenizer

    data = quantized["data"]
    fp32 = TinyLlavaForConditionalGeneration.from_pretrained(quantized["ckpt"]).eval()
    gptq = TinyLlavaForConditionalGeneration.from_pretrained(quantized["out"]).eval()
    config = fp32.config
    pre = PreprocessConfig.for_tower(config.vision_config.model_type, config.vision_config.image_size,
                                     config.image_aspect_ratio)
    records = json.loads((data / "test.json").read_text())
    samples = tg.calibration_samples(records, data, load_tokenizer(quantized["ckpt"]), get_template("llama"), pre)
    inputs = tg._spliced(fp32, samples, 512)
    mine = tg.compare_logits(fp32.language_model, gptq.language_model, inputs)
    rtn = tg.compare_logits(fp32.language_model, tg._rtn_llm(fp32.language_model, 4, 64), inputs)
    assert mine["logits_rel_l2"] < 0.75 * rtn["logits_rel_l2"], (mine, rtn)
    assert mine["top1_agreement"] > rtn["top1_agreement"] and mine["top1_agreement"] >= MIN_TOP1, (mine, rtn)

    ref, vlm = (tinyllava_edge.load(p, device="cpu", n_threads=1) for p in (quantized["ckpt"], quantized["out"]))
    rel = []
    for record in records:
        text = record["conversations"][0]["value"].replace("<image>", "").strip()
        first = []
        for v in (ref, vlm):
            rows = v.encode_images([str(data / record["image"])])[0]
            v.backend.reset()
            first.append(v.backend.feed(v.prompt_segments([{"from": "human", "value": f"<image>\n{text}"}], [rows])))
        rel.append(np.linalg.norm(first[1] - first[0]) / np.linalg.norm(first[0]))
    assert max(rel) <= MAX_FIRST_TOKEN_REL, rel


# every LLM family GPTQModel is given here, and the two other source layouts (written back as Factory)
FAMILY_CASES = {"llama": MINIATURE, "qwen2": "TinyLLaVA-Qwen2-0.5B-SigLIP", "phi": "TinyLLaVA-Phi-2-SigLIP-3.1B",
                "stablelm": "TinyLLaVA-StableLM-2-SigLIP", "gemma": "TinyLLaVA-Gemma-SigLIP-2.4B"}
LAYOUT_CASES = {"legacy": "TinyLLaVA-1.5B", "hf_llava": "tiny-llava-v1-hf"}


def test_every_llm_family_has_a_gptq_case():
    from tinyllava_edge.model.llm import LLM_FAMILIES

    assert set(FAMILY_CASES) == set(LLM_FAMILIES.keys())
    assert set(LAYOUT_CASES) | {"factory"} == set(ck.LAYOUTS)


@pytest.mark.gptq
@pytest.mark.parametrize("name", [*FAMILY_CASES.values(), *LAYOUT_CASES.values()])
def test_family_and_layout_quantize_and_load(mini, name, tmp_path):
    ckpt = ck.build_miniature(name, tmp_path / "ckpt")
    record = tg.quantize_gptq(ckpt, tmp_path / "gptq", data=mini["data"], n_samples=8, progress=False)["record"]
    fid = record["fidelity"]
    n = len(tg.quantizable_linears(TinyLlavaForConditionalGeneration.from_pretrained(ckpt).language_model))
    assert fid["layers"] == {"TorchFusedLinear": n} and record["quantized_linears"] == n
    assert fid["gptq"]["logits_rel_l2"] < 0.75 * fid["rtn"]["logits_rel_l2"], fid  # measured 0.54-0.62 x
    vlm = tinyllava_edge.load(tmp_path / "gptq", device="cpu", n_threads=1)
    image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert isinstance(vlm.generate(image, "What is it?", max_new_tokens=2), str)


@pytest.mark.gptq
def test_failure_leaves_nothing(mini, tmp_path, monkeypatch):
    """A failure after GPTQModel ran (here: the layer count check) leaves no output and no staging."""
    monkeypatch.setattr(tg, "gptq_layers", lambda module: {})
    with pytest.raises(TinyLlavaError, match=f"GPTQModel quantized 0 linear layers but the LLM has {N_LINEARS}"):
        tg.quantize_gptq(mini["ckpt"], tmp_path / "out", data=mini["data"], n_samples=8, verify=False,
                         progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gptq
def test_quantize_cli(quantized, tmp_path, capsys):
    base = ["--torch", "gptq", "--checkpoint", str(quantized["ckpt"]), "--data", str(quantized["data"]),
            "--samples", "8", "--quiet"]
    assert quantize_main(base + ["--out", str(tmp_path / "cli"), "--group-size", "32", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert f"LLM GPTQ 4-bit, group 32, {N_LINEARS} linears" in out and "calibration: 8 samples" in out
    assert json.loads((tmp_path / "cli" / QUANTIZATION_RECORD).read_text())["group_size"] == 32
    for extra, message in ((["--out", str(tmp_path / "g"), "--group-size", "128"],
                            "group size 128 does not divide the LLM's input widths 64"),
                           (["--out", str(tmp_path / "cli")], "is not empty; pass overwrite=True (--overwrite)")):
        assert quantize_main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "g").exists()
