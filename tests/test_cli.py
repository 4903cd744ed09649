"""Every console script answers --help; the main job runs end to end on the default."""

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
