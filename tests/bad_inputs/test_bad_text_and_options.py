"""Bad inputs: command options, prompts and training data; no network lookup for a missing folder, and
the modes of written files. Each case ends in one clear sentence, never a traceback (harness:
bad_input_harness.py).
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("onnx")

from tinyllava_edge.data.preprocess import load_image  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from bad_input_harness import Corpus, _chat, _export, _quantize, _train, _eval, _demo, _eval_argv  # noqa: E402

CASES = Corpus()
case = CASES.case

@case("cli/export-bad-format")
def _(c):
    c.cli(_export, ["--model", c.ckpt, "--out", c.tmp / "o", "--format", "zip"],
          r"^error: argument --format: invalid choice: 'zip' \(choose from .*gguf.*onnx")


@case("cli/export-bits-not-a-number")
def _(c):
    c.cli(_export, ["--model", c.ckpt, "--out", c.tmp / "o", "--bits", "sixteen"],
          r"argument --bits: invalid choice: 'sixteen' \(choose from 4, 8, 16, 32\)")


@case("cli/chat-bad-device")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "tpu"], r"argument --device: invalid choice: 'tpu' .*jetson")


@case("cli/demo-bad-device")
def _(c):
    c.cli(_demo, ["--model", c.bundle, "--device", "npu"], r"argument --device: invalid choice: 'npu' .*cuda")


@case("cli/eval-checkpoint-on-a-device-torch-lacks")
def _(c):
    c.cli(_eval, _eval_argv(c, c.ckpt, c.data, device="tpu"), "device 'tpu' is not a torch device")


@case("cli/train-unknown-option")
def _(c):
    c.cli(_train, ["--model", c.ckpt, "--output", c.tmp / "run", "--learning-rate", 1],
          r"unrecognized arguments: --learning-rate 1 \(see tinyllava-train --help\)")


@case("cli/serve-bad-device")
def _(c):
    def serve(argv):
        from tinyllava_edge.cli.serve import main
        return main(argv)
    c.cli(serve, ["--model", c.bundle, "--device", "tpu"], r"argument --device: invalid choice: 'tpu' .*jetson")


@case("cli/quantize-missing-out")
def _(c):
    c.cli(_quantize, ["--bundle", c.bundle], "the following arguments are required: --out")


@case("net/missing-tokenizer-folder-is-not-looked-up-online")
def _(c):
    from tinyllava_edge.model import load_tokenizer
    from tinyllava_edge.testing.network import NetworkGuard

    with NetworkGuard() as guard:
        c.api(lambda: load_tokenizer("no-such-folder/tokenizer"),
              "tokenizer folder no-such-folder/tokenizer does not exist")
        c.cli(_train, ["--preset", "tiny-shapes", "--tokenizer", "no-such/tokenizer", "--data",
                       c.data / "train.json", "--output", c.tmp / "run", "--quiet"], "no-such/tokenizer does not exist")
    assert guard.attempts == []


@case("files/written-with-the-umask-mode")
def _(c):
    import stat

    from tinyllava_edge.quant.bundle import quantize_bundle

    before = os.umask(0o027)
    try:
        quantize_bundle(c.bundle, c.tmp / "q8", quant="Q8_0", verify=False, progress=False)
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (c.tmp / "q8").iterdir()}
    assert set(modes.values()) == {0o640}, modes  # not 0600: the group may read what the user wrote
    assert stat.S_IMODE((c.tmp / "q8").stat().st_mode) == 0o750


# text

@case("text/empty-prompt-stream")
def _(c):
    c.api(lambda: c.vlm.stream(None, "\t \n"), "the prompt is empty")


@case("text/empty-prompt-chat-cli-interactive")
def _(c):
    from tinyllava_edge.cli.chat import main
    c.capsys.readouterr()
    assert main(["--model", str(c.bundle), "--device", "cpu", "--no-stats"], stdin=io.StringIO("\n  \n/quit\n")) == 0
    assert "Traceback" not in c.capsys.readouterr().err


@case("text/prompt-longer-than-the-context")
def _(c):
    c.api(lambda: c.vlm.generate(None, "shapes and colours " * 3000, max_new_tokens=4),
          r"the prompt takes \d+ positions but the context holds \d+, leaving no room")


@case("text/invalid-utf8-api")
def _(c):
    c.api(lambda: c.vlm.generate(None, b"caf\xe9?".decode("utf-8", "surrogateescape"), max_new_tokens=1),
          "the prompt is not valid UTF-8 text")


@case("text/invalid-utf8-chat-cli")
def _(c):
    prompt = os.fsdecode(b"what is \xff\xfe this?")  # what Python gives a program for these argv bytes
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", prompt], "not valid UTF-8")


@case("text/prompt-as-bytes")
def _(c):
    c.api(lambda: c.vlm.generate(None, b"What?"), "a prompt must be a string, got bytes")


@case("text/control-characters-work")
def _(c):
    answer = c.vlm.generate(None, "\x00\x07What\x1b[31m is \x7fthis?\r\x0c", max_new_tokens=3)
    assert isinstance(answer, str)


@case("text/max-new-tokens-as-text")
def _(c):
    c.api(lambda: c.vlm.generate(None, "Hi", max_new_tokens="8"), "max_new_tokens must be an integer")


@case("text/chat-cli-top-p-out-of-range")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", "hi", "--top-p", 2], r"top_p must be a number in")


@case("text/chat-cli-zero-max-new-tokens")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", "hi", "--max-new-tokens", 0],
          "max_new_tokens must be an integer of at least 1")


@case("text/chat-cli-negative-threads")
def _(c):
    c.cli(_chat, ["--model", c.bundle, "--device", "cpu", "--prompt", "hi", "--threads", -2], "thread")


# training data (through the command: the library's cases are in test_train_data.py)

def _record(image="images/train_000000.png", turns=(("human", "<image>\nWhat colour?"), ("gpt", "red"))):
    return {"id": "x", "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}


def _train_on(c, text: str, pattern: str):
    data = c.data / f"bad-{c.tmp.name}.jsonl"
    data.write_text(text)
    try:
        c.cli(_train, ["--model", c.ckpt, "--data", data, "--image-folder", c.data, "--output", c.tmp / "run",
                       "--max-steps", 1, "--batch-size", 1, "--quiet"], pattern)
    finally:
        data.unlink()
    assert not (c.tmp / "run" / "model.safetensors").exists()


@case("data/missing-image")
def _(c):
    _train_on(c, json.dumps(_record(image="images/nope.png")) + "\n", "nope.png.* not found")


@case("data/broken-json-line")
def _(c):
    _train_on(c, json.dumps(_record()) + '\n{"conversations": [\n', r"line 2 column \d+: invalid JSON")


@case("data/no-assistant-turn")
def _(c):
    _train_on(c, json.dumps(_record(turns=(("human", "<image>\nWhat colour?"),))) + "\n", "no assistant")


@case("data/truncated-image-trains-as-in-the-factory")
def _(c):
    data = Path(shutil.copytree(c.data, c.tmp / "data"))
    records = json.loads((data / "train.json").read_text())[:2]
    for record in records:
        image = data / record["image"]
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    (data / "cut.json").write_text(json.dumps(records))
    with pytest.raises(TinyLlavaError, match="is truncated"):
        load_image(data / records[0]["image"])  # what every other entry point says
    c.capsys.readouterr()
    assert _train(["--model", str(c.ckpt), "--data", str(data / "cut.json"), "--output", str(c.tmp / "run"),
                   "--max-steps", "1", "--batch-size", "1", "--quiet"]) == 0, c.capsys.readouterr().err
    assert (c.tmp / "run" / "model.safetensors").is_file()


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 24, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ctx):
    CASES[name](ctx)
