"""Atomic writes (tinyllava_edge/atomic.py): whole files or nothing, with the modes the umask gives.

A checkpoint or bundle written under umask 022 must be readable by every user (0644 files, 0755
folders), under 027 by the group (0640, 0750), like any file the user writes; mkstemp's 0600
would lock other users and containers running under another uid out.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from tinyllava_edge.atomic import atomic_file, replace_folder, staged_folder, write_text
from tinyllava_edge.errors import TinyLlavaError

UMASKS = (0o022, 0o027)


@contextmanager
def umask(value: int):
    before = os.umask(value)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(root: Path) -> dict[str, int]:
    """Mode of every file and folder under `root` (itself included), by relative path."""
    found = {".": _mode(root)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = _mode(path)
    return found


def _expect(root: Path, mask: int) -> None:
    wrong = {name: oct(mode) for name, mode in _modes(root).items()
             if mode != (0o777 if (root / name).is_dir() else 0o666) & ~mask}
    assert not wrong, f"under umask {mask:03o}: {wrong}"


def _write_private(path: Path, data: bytes) -> None:
    """Replace `path` with a new 0600 file, as writers that go through mkstemp do."""
    other = path.with_name(path.name + ".private")
    fd = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    os.replace(other, path)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask-{m:03o}")
def test_files_and_folders_take_the_umask_mode(tmp_path, mask):
    with umask(mask):
        write_text(tmp_path / "a.json", "{}\n")
        with atomic_file(tmp_path / "b.bin") as tmp:
            with open(tmp, "wb") as f:  # a writer that opens the path itself, as gguf's does
                f.write(b"\0" * 10)
        with atomic_file(tmp_path / "c.bin") as tmp:
            _write_private(tmp, b"c")  # a writer that puts its own file there, as safetensors' does
        with staged_folder(tmp_path / "folder") as staging:
            write_text(staging / "inner.txt", "x")
            (staging / "sub").mkdir(0o700)
            _write_private(staging / "sub" / "weights.bin", b"w")  # GPTQModel's files in a staged checkpoint
            replace_folder(staging, tmp_path / "folder")
    assert (tmp_path / "a.json").read_text() == "{}\n" and (tmp_path / "b.bin").stat().st_size == 10
    assert (tmp_path / "folder" / "inner.txt").read_text() == "x"
    _expect(tmp_path / "folder", mask)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == _mode(tmp_path / "c.bin") == 0o666 & ~mask
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "keep.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "keep.txt").read_text() == "old"
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "out") as staging:
            (staging / "part").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_replace_folder_swaps_an_old_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_folder(final) as staging:
        (staging / "new.txt").write_text("new")
        replace_folder(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_a_folder_that_cannot_be_written_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TinyLlavaError, match=r"cannot write .*file.*out\.json"):
        write_text(tmp_path / "file" / "out.json", "{}")


@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask-{m:03o}")
def test_a_checkpoint_and_its_reports_take_the_umask_mode(tmp_path, mask, one_thread):
    """config.json and model.safetensors as the tokenizer files beside them (they were 0600)."""
    from tinyllava_edge.model import load_tokenizer, save_tokenizer
    from tinyllava_edge.testing.checkpoints import build_miniature
    from tinyllava_edge.train.report import plot_loss, write_summary

    with umask(mask):
        ckpt = build_miniature("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "ckpt")
        save_tokenizer(load_tokenizer(ckpt), ckpt)  # as training saves it: tokenizer.json rewritten for 4.x
        write_summary({"steps": 1}, ckpt / "train_summary.json")
        plot_loss([(1, 2.0), (2, 1.0)], ckpt / "loss.png", "loss")
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_summary.json", "loss.png"} <= \
        {p.name for p in ckpt.iterdir()}
    _expect(ckpt, mask)


def test_a_bundle_and_its_quantized_copy_take_the_umask_mode(tmp_path, one_thread):
    """export (staged folder, ONNX, GGUF, mmproj, manifest) and quantize (llama.cpp's quantizer,
    mmproj Q8_0, int8 vision graph) under umask 027: group-readable, nothing for others."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from tinyllava_edge.quant.bundle import quantize_bundle
    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    with umask(0o027):
        _, bundle = build_miniature_bundle("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path)
        quantize_bundle(bundle, tmp_path / "q8", quant="Q8_0", onnx=("int8",), verify=False, progress=False)
    names = {p.name for p in (tmp_path / "q8").iterdir()}
    assert {"manifest.json", "llm-Q8_0.gguf", "mmproj-Q8_0.gguf", "vision-int8.onnx"} <= names, names
    _expect(bundle, 0o027)
    _expect(tmp_path / "q8", 0o027)
    assert _leftovers(tmp_path) == []
