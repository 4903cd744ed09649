"""Every console script answers --help, and a bad, missing or unknown option with one `error:`
line naming it (and the values it takes) and exit code 2; the main job runs end to end on the
default."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _entry(target: str):
    module, func = target.split(":")
    return getattr(import_module(module), func)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _entry(SCRIPTS[name])(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and name in out


# What each command needs before argparse looks at the rest.
REQUIRED = {"tinyllava-bench": ["speed", "--model", "m"], "tinyllava-chat": ["--model", "m"],
            "tinyllava-data": ["--out", "d"], "tinyllava-demo": [], "tinyllava-edge": [],
            "tinyllava-eval": ["--benchmark", "shapes"], "tinyllava-export": ["--model", "m", "--out", "o"],
            "tinyllava-quantize": ["--out", "o"], "tinyllava-serve": [],
            "tinyllava-train": ["--preset", "p", "--output", "o"]}
# (command, argv, what the one line must name). Each command is here with an unknown option; those
# with required options, choices or typed values with those too.
BAD_OPTIONS = [
    *[(name, [*REQUIRED[name], "--no-such-option"], ["unrecognized arguments: --no-such-option"])
      for name in sorted(SCRIPTS)],
    ("tinyllava-bench", [], ["required: command"]),
    ("tinyllava-bench", ["race"], ["argument command", "'race'", "speed"]),
    ("tinyllava-bench", ["speed"], ["required: --model"]),
    ("tinyllava-bench", ["speed", "--model", "m", "--rounds", "x"], ["--rounds", "invalid int value: 'x'"]),
    ("tinyllava-chat", [], ["required: --model"]),
    ("tinyllava-chat", ["--model", "m", "--device", "tpu"], ["--device", "'tpu'", "auto", "cpu", "cuda", "jetson"]),
    ("tinyllava-chat", ["--model", "m", "--dtype", "fp64"], ["--dtype", "fp32", "bf16", "fp16"]),
    ("tinyllava-chat", ["--model", "m", "--temperature", "hot"], ["--temperature", "invalid float value: 'hot'"]),
    ("tinyllava-data", [], ["required: --out"]),
    ("tinyllava-data", ["--out", "d", "--seed", "q"], ["--seed", "invalid int value: 'q'"]),
    ("tinyllava-demo", ["--device", "tpu"], ["--device", "'tpu'", "auto", "cpu", "cuda", "jetson"]),
    ("tinyllava-demo", ["--port", "http"], ["--port", "invalid int value: 'http'"]),
    ("tinyllava-edge", ["--questions", "five"], ["--questions", "invalid int value: 'five'"]),
    ("tinyllava-eval", [], ["required: --benchmark"]),
    ("tinyllava-eval", ["--benchmark", "imagenet"], ["--benchmark", "'imagenet'", "shapes", "pope", "vqav2"]),
    ("tinyllava-eval", ["--benchmark", "shapes", "--limit", "all"], ["--limit", "invalid int value: 'all'"]),
    ("tinyllava-export", [], ["required: --model, --out"]),
    ("tinyllava-export", ["--model", "m", "--out", "o", "--format", "zip"], ["--format", "'zip'", "gguf", "onnx"]),
    ("tinyllava-export", ["--model", "m", "--out", "o", "--bits", "12"], ["--bits", "12", "4, 8, 16, 32"]),
    ("tinyllava-export", ["--model", "m", "--out", "o", "--bits", "x"], ["--bits", "'x'", "4, 8, 16, 32"]),
    ("tinyllava-quantize", [], ["required: --out"]),
    ("tinyllava-quantize", ["--out", "o", "--quant", "Q3"], ["--quant", "'Q3'", "Q4_K_M", "Q8_0"]),
    ("tinyllava-quantize", ["--out", "o", "--onnx", "int2"], ["--onnx", "'int2'", "int4", "int8"]),
    ("tinyllava-quantize", ["--out", "o", "--quant", "Q8_0", "--bits", "4"], ["--bits", "not allowed with", "--quant"]),
    ("tinyllava-quantize", ["--out", "o", "--torch", "awq"], ["--torch", "'awq'", "gptq"]),
    ("tinyllava-serve", ["--device", "tpu"], ["--device", "'tpu'", "auto", "cpu", "cuda", "jetson"]),
    ("tinyllava-serve", ["--workers", "two"], ["--workers", "invalid int value: 'two'"]),
    ("tinyllava-serve", ["--log-level", "loud"], ["--log-level", "'loud'", "debug", "warning"]),
    ("tinyllava-train", ["--output", "o"], ["one of the arguments --model --preset is required"]),
    ("tinyllava-train", ["--preset", "p"], ["required: --output"]),
    ("tinyllava-train", ["--preset", "p", "--output", "o", "--stage", "zz"], ["--stage", "pretrain", "finetune"]),
    ("tinyllava-train", ["--preset", "p", "--output", "o", "--precision", "fp8"], ["--precision", "bf16"]),
    ("tinyllava-train", ["--preset", "p", "--output", "o", "--lr", "fast"], ["--lr", "invalid float value"]),
]


def _case_id(case) -> str:
    return " ".join([case[0].removeprefix("tinyllava-"), *case[1]]) or case[0]


def test_every_command_has_a_bad_option_case():
    assert REQUIRED.keys() == SCRIPTS.keys()
    assert {name for name, argv, _ in BAD_OPTIONS if "--no-such-option" not in argv} == set(SCRIPTS)


@pytest.mark.parametrize("name, argv, names", BAD_OPTIONS, ids=[_case_id(c) for c in BAD_OPTIONS])
def test_a_bad_option_is_one_error_line(name, argv, names, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _entry(SCRIPTS[name])(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for part in names:
        assert part in lines[0], (part, lines[0])
    assert f"(see {name}" in lines[0] and lines[0].endswith(" --help)"), lines[0]


def test_pipeline_runs_and_reuses_its_stages(tmp_path, capsys):
    from tinyllava_edge.cli.pipeline import main

    work = tmp_path / "work"
    assert main(["--workdir", str(work), "--questions", "3", "--quick", "--no-demo"]) == 0
    for part in ("data/meta.json", "tokenizer/tokenizer.json", "model/config.json", "model/model.safetensors",
                 "eval/results.json", "recipe_summary.json", "bundle/manifest.json", "bundle/llm-F16.gguf",
                 "bundle-4bit/manifest.json", "bundle-4bit/llm-Q4_K_M.gguf", "bundle-4bit/vision-int4.onnx"):
        assert (work / part).is_file(), part
    out = capsys.readouterr().out  # it ends with how to start the demo and the API server
    assert f"tinyllava-demo --model {work} " in out and f"tinyllava-serve --model {work / 'bundle'}" in out
    # the summary puts the two bundles side by side on the same questions
    table = out[out.index("the bundles on the same 3 held-out test questions"):]
    header = next(line for line in table.splitlines()[1:] if line.strip())
    assert header.split() == ["16-bit", "4-bit"]
    for row in ("llm-F16.gguf + vision.onnx", "llm-Q4_K_M.gguf + vision-", "size they take", "exact match",
                "same answer as 16-bit", "3/3", "first token, new image", "3 of the questions:"):
        assert row in table, row
    stamp = (work / "model" / "model.safetensors").stat().st_mtime_ns
    quantized = (work / "bundle-4bit" / "manifest.json").stat().st_mtime_ns
    assert main(["--workdir", str(work), "--questions", "1", "--quick", "--no-demo"]) == 0
    assert (work / "model" / "model.safetensors").stat().st_mtime_ns == stamp  # kept, not rebuilt
    assert (work / "bundle-4bit" / "manifest.json").stat().st_mtime_ns == quantized
    assert "quantize         kept" in capsys.readouterr().out
    # a stage that is redone makes every later one stale: the 4-bit bundle follows a new 16-bit one
    shutil.rmtree(work / "bundle")
    assert main(["--workdir", str(work), "--questions", "1", "--quick", "--no-demo"]) == 0
    out = capsys.readouterr().out
    assert "train            kept" in out and "export           exported" in out and "quantize         quantized" in out
    # a run of an earlier recipe (another data generator) is trained again, and every later stage with it
    summary_path = work / "recipe_summary.json"
    summary = json.loads(summary_path.read_text())
    summary["recipe_version"]["generator_version"] -= 1
    summary_path.write_text(json.dumps(summary))
    assert main(["--workdir", str(work), "--questions", "1", "--quick", "--no-demo"]) == 0
    out = capsys.readouterr().out
    assert "trained by an earlier recipe of the default model" in out
    assert "train            trained" in out and "quantize         quantized" in out
    assert (work / "model" / "model.safetensors").stat().st_mtime_ns != stamp


def test_pipeline_bad_workdir_is_one_line(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "tinyllava_edge.cli.pipeline", "--workdir", str(target)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "is a file" in proc.stderr


def test_training_openmp_wait_is_a_short_spin_unless_the_user_chose(monkeypatch):
    from tinyllava_edge.cli.common import TRAIN_SPIN_COUNT, set_training_openmp_wait

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    set_training_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == str(TRAIN_SPIN_COUNT) and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    set_training_openmp_wait()
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    set_training_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == "5" and "OMP_WAIT_POLICY" not in os.environ
