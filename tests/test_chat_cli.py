"""`tinyllava-chat`: one question or an interactive chat on a bundle, its answers the runtime's
(`VLM.generate`), its errors one `error:` line with exit code 2, and its console script."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("onnx")

import tinyllava_edge  # noqa: E402
from tinyllava_edge.cli.chat import main as chat_main  # noqa: E402
from tinyllava_edge.export.checks import synthetic_images  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def paths(runtime_miniature):
    return runtime_miniature


@pytest.fixture(scope="module")
def images():
    return synthetic_images(1, seed=7)


def test_chat_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        chat_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinyllava-chat") and "--prompt" in out and "/image PATH" in out
    assert "{auto,cpu,cuda,jetson}" in out


def test_chat_cli_one_shot_and_interactive(paths, images, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "picture.png"
    Image.fromarray(images[0]).save(png)
    common = ["--model", str(paths["bundle"]), "--device", "cpu", "--threads", "1", "--max-new-tokens", "5",
              "--temperature", "1", "--seed", "4"]
    assert chat_main([*common, "--image", str(png), "--prompt", "What is it?"]) == 0
    captured = capsys.readouterr()
    with tinyllava_edge.load(paths["bundle"], device="cpu", n_threads=1) as vlm:
        expected = vlm.generate(png, "What is it?", max_new_tokens=5, temperature=1.0, seed=4)
    assert captured.out == expected + "\n"
    assert captured.err.count("TTFT") == 1 and "tok/s" in captured.err

    script = f"/image {png}\nWhat is it?\n/image {tmp_path}/gone.png\nAnd now?\n/bogus\n/reset\nHi\n/quit\nnever\n"
    assert chat_main(common, stdin=io.StringIO(script)) == 0
    err = capsys.readouterr().err
    assert err.count("TTFT") == 3  # three answers, "never" comes after /quit
    assert f"error: image file {tmp_path}/gone.png does not exist" in err
    assert "error: unknown command /bogus" in err and "(conversation cleared)" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}/nowhere", "--prompt", "hi"], "does not exist; expected a bundle directory"),
    (["--model", "{bundle}", "--image", "{tmp}/gone.png", "--prompt", "hi"], "image file .* does not exist"),
    (["--model", "{bundle}", "--prompt", " "], "--prompt is empty"),
    (["--model", "{bundle}", "--device", "cpu", "--prompt", "hi", "--temperature", "-1"], "temperature must be"),
    (["--model", "{bundle}", "--device", "cuda", "--prompt", "hi"], "no CUDA was found"),
])
def test_chat_cli_errors_are_one_line(paths, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, bundle=paths["bundle"]) for a in argv]
    assert chat_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err


def test_chat_console_script(paths):
    script = Path(sys.executable).parent / "tinyllava-chat"
    if not script.exists():
        pytest.skip("the package is not installed with its console scripts")
    proc = subprocess.run([str(script), "--model", str(paths["bundle"]), "--device", "cpu", "--threads", "1",
                           "--prompt", "Hi", "--max-new-tokens", "3", "--no-stats"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
