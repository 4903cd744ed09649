"""benchmarks/quality.py's report: which model its header names, and the sentences it derives from the figures."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality_report", ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

SUMMARY = {
    "preset": "tiny-shapes", "seed": 2,
    "stages": {"pretrain": {"steps_this_run": 1600, "precision": "bf16", "device": "cpu"},
               "model": {"steps_this_run": 1500, "precision": "bf16", "device": "cpu"}},
    "eval": {"split": "test", "n": 4554, "exact_match": 95.123,
             "per_kind": {"position": 90.04, "colour": 97.5}},
}


def _run(tmp_path: Path, model: str | None = None) -> Path:
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "recipe_summary.json").write_text(json.dumps({**SUMMARY, "model": model or str(out / "model")}))
    return out / "model"


def test_the_header_names_the_run_from_its_recipe_summary(tmp_path):
    model = _run(tmp_path)
    text = quality.describe_model(model, "the default model, trained on a test CPU")
    assert text.startswith("the default model, trained on a test CPU; `tinyllava-train --preset tiny-shapes` seed 2 ")
    assert "(pretrain 1600 + model 1500 steps, bf16 on cpu)" in text
    assert "95.1 % exact match on the whole test split (4554 questions; colour 97.5, position 90.0)" in text
    assert text.endswith(f"checkpoint `{model}`")


def test_a_summary_of_another_checkpoint_is_not_read(tmp_path):
    model = _run(tmp_path, model=str(tmp_path / "elsewhere"))
    assert quality.describe_model(model, None) == f"checkpoint `{model}`"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert quality.describe_model(bare, "a note") == f"a note; checkpoint `{bare}`"


def _row(variant: str, accuracy: float, size: int = 2**20) -> dict:
    return {"variant": variant, "size_bytes": size, "accuracy": accuracy, "per_kind": {"colour": accuracy},
            "greedy_token_agreement": 99.5, "answers_identical": 99.0, "first_token_kl": 1e-5}


def test_the_report_derives_its_sentences_from_the_figures(tmp_path):
    report = {
        "model": "m", "model_description": "the measured model; checkpoint `m`", "bundle": "b", "questions": 10,
        "subset": "10 of the 20 test questions",
        "floor": {"q8_0_greedy_token_agreement": 98.5, "required": 99.0, "met": False},
        "vision_default_by_accuracy": {"8": "fp32", "4": "int4"}, "vision_proxy": "mean token cosine >= 0.99",
        "results": [_row("torch fp32", 90.0, 3 * 2**20), _row("GGUF F16 + ONNX int8", 91.0),
                    _row("GGUF F16 + ONNX int4", 88.0), _row("GGUF F16 + ONNX int4-gptq", 89.0)],
        "gguf_row_widths": [256, 320],
    }
    quality.write_report(report, tmp_path)
    text = (tmp_path / "quality.md").read_text()
    assert "Model: the measured model; checkpoint `m`; its 16-bit bundle `b`." in text
    assert "(required >= 99 %): NOT met." in text
    assert "rows 256 or 320 wide; those 320 wide are not a multiple of 256" in text
    assert "better than RTN here (89.0 % against 88.0 %)" in text
    assert "which costs nothing here (+1.0 points)" in text
    assert "larger in int4 than in int8" in text  # same size in this report
    assert json.loads((tmp_path / "results" / "quality.json").read_text())["model_description"].startswith("the ")
    report["gguf_row_widths"] = [256, 512]
    report["results"][2]["size_bytes"] = 2**19
    quality.write_report(report, tmp_path)
    text = (tmp_path / "quality.md").read_text()
    assert "rows 256 or 512 wide, so no K-quant falls back here" in text
    assert "larger in int4" not in text
