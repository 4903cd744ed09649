"""The bad-input corpus's harness: the shared artifacts' context, the three checks, the commands'
entry points and image-byte helpers (the cases: test_bad_*.py beside this file).

Each case is a small function over one shared set of artifacts (a Qwen2 miniature checkpoint and
its F32 bundle, built once per session by the ``built`` fixture in conftest.py). Three ways a user
meets an error, three checks:

* the Python API raises the project's own exception type (TinyLlavaError or a subclass) with a
  one-line message;
* a command (`main(argv)`) returns non-zero and prints exactly one `error: ...` line on stderr;
* the demo's upload check refuses the file with one sentence.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyllava_edge.apps.uploads import open_upload
from tinyllava_edge.data.preprocess import load_image
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.bundle import sha256_file

MINIATURE = "TinyLLaVA-Qwen2-0.5B-SigLIP"
# The one refusal of a truncated image, at every entry point (tinyllava_edge/data/images.py).
TRUNCATED = (r"image file '(.*/)?{}' is truncated \(.*\); pass allow_truncated_images=True "
             r"\(--allow-truncated-images\) to decode what it holds, leaving the rest blank")
EXACT = {"device": "cpu", "n_threads": 1, "kv_type": "f32", "flash_attn": "off"}


class Ctx:
    """What a case gets: the shared artifacts, its own temporary folder, captured output."""

    def __init__(self, built, tmp: Path, capsys):
        self.root, self.ckpt, self.bundle, self.data, self.vlm = (built[k] for k in
                                                                  ("root", "ckpt", "bundle", "data", "vlm"))
        self.tmp, self.capsys = tmp, capsys

    # -- artifacts to spoil -------------------------------------------------------------------------
    def ckpt_copy(self) -> Path:
        return Path(shutil.copytree(self.ckpt, self.tmp / "ckpt"))

    def bundle_copy(self) -> Path:
        return Path(shutil.copytree(self.bundle, self.tmp / "bundle"))

    def edit_config(self, change) -> Path:
        ckpt = self.ckpt_copy()
        raw = json.loads((ckpt / "config.json").read_text())
        change(raw)
        (ckpt / "config.json").write_text(json.dumps(raw))
        return ckpt

    def edit_manifest(self, change, bundle: Path | None = None) -> Path:
        bundle = bundle or self.bundle_copy()
        manifest = json.loads((bundle / "manifest.json").read_text())
        change(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle

    def spoil_part(self, role: str, spoil) -> Path:
        """A bundle whose `role` file is replaced by spoil(bytes), its manifest record updated to
        match (so the file itself, not the manifest check, is what the loader meets)."""
        bundle = self.bundle_copy()
        manifest = json.loads((bundle / "manifest.json").read_text())
        record = next(r for r in manifest["files"] if r["role"] == role and r.get("quant") in (None, "fp32", "F32"))
        path = bundle / record["name"]
        path.write_bytes(spoil(path.read_bytes()))
        record["size"], record["sha256"] = path.stat().st_size, sha256_file(path)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle

    def image(self, name: str, make) -> Path:
        path = self.tmp / name
        made = make(path)
        if isinstance(made, bytes):
            path.write_bytes(made)
        return path

    # -- the three checks -----------------------------------------------------------------------------
    def api(self, call, pattern: str, kind: type = TinyLlavaError) -> str:
        with pytest.raises(TinyLlavaError) as info:
            call()
        assert isinstance(info.value, kind), type(info.value)
        message = str(info.value)
        assert message and "\n" not in message, message
        assert re.search(pattern, message), message
        return message

    def cli(self, main, argv: list, pattern: str) -> str:
        self.capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse refusing an option
            code = stop.code
        err = self.capsys.readouterr().err.strip()
        assert code not in (0, None), err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.search(pattern, lines[0]), lines[0]
        return lines[0]

    def upload(self, path: Path, pattern: str) -> str:
        return self.api(lambda: open_upload(path), pattern)


def _chat(argv):
    from tinyllava_edge.cli.chat import main
    return main(argv, stdin=io.StringIO(""))


def _export(argv):
    from tinyllava_edge.cli.export import main
    return main(argv)


def _quantize(argv):
    from tinyllava_edge.cli.quantize import main
    return main(argv)


def _train(argv):
    from tinyllava_edge.cli.train import main
    return main(argv)


def _eval(argv):
    from tinyllava_edge.cli.eval import main
    return main(argv)


def _demo(argv):
    from tinyllava_edge.cli.demo import main
    return main(argv)


# -- image bytes ------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG declaring width x height RGB pixels, with next to no data."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def _noise(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _halves(path: Path, mode: str, left, right, fmt="PNG", **save) -> None:
    """A 32 x 16 picture: left half `left`, right half `right` (colours in `mode`)."""
    image = Image.new(mode, (32, 16), left)
    image.paste(Image.new(mode, (16, 16), right), (16, 0))
    image.save(path, format=fmt, **save)


def _rgb(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


class Corpus(dict):
    """One file's cases: name -> function(ctx), registered with ``@CASES.case("group/name")``."""

    def case(self, name: str):
        def register(fn):
            assert name not in self, name
            self[name] = fn
            return fn
        return register


# -- helpers more than one file's cases use -----------------------------------------------------------------

def _truncated(c, name: str = "cut.png") -> Path:
    """A 64 x 64 picture cut short: its header whole, its pixel data half there."""
    fmt = "PNG" if name.endswith(".png") else "JPEG"
    return c.image(name, lambda p: _noise(fmt)[:600 if fmt == "PNG" else 700])


def _data_with_a_truncated_image(c) -> tuple[Path, str]:
    """A copy of the shapes data whose first test question's image is cut in half."""
    data = Path(shutil.copytree(c.data, c.tmp / "data"))
    first = json.loads((data / "test.json").read_text())[0]
    image = data / first["image"]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return data, Path(first["image"]).name


def _eval_argv(c, model: Path, data: Path, device: str = "cpu") -> list:
    return ["--benchmark", "shapes", "--model", model, "--data", data, "--limit", 1, "--device", device,
            "--out", c.tmp / "eval", "--quiet"]
