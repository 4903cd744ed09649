"""The synthetic shapes VQA generator: determinism, answers, held-out pairs, files and CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyllava_edge.cli import data as cli
from tinyllava_edge.data import shapes
from tinyllava_edge.errors import DataError

REPO = Path(__file__).resolve().parents[1]

# The checker's own word lists, written out here rather than read from the generator, so that
# the answers are recomputed independently of the code that made them.
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
CELLS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip
REF = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(PLURALS)})\b")
SPLITS = ("train", "val", "test")
KINDS = {"shape", "colour", "count", "position", "exists"}


def _words(question: str) -> list[str]:
    return re.findall(r"[a-z]+", question.lower())


def _the_one(objects, **match):
    found = [o for o in objects if all(getattr(o, k) == v for k, v in match.items())]
    assert len(found) == 1, f"{match} picks {len(found)} objects, expected exactly one"
    return found[0]


def expected_answer(kind: str, question: str, objects) -> str:
    """The one correct answer, recomputed from the objects and the question's words."""
    words = _words(question)
    colours = [w for w in words if w in COLOURS]
    if kind == "shape":
        (colour,) = colours
        return _the_one(objects, colour=colour).shape
    if kind == "colour":
        (shape,) = [w for w in words if w in PLURALS]
        return _the_one(objects, shape=shape).colour
    if kind == "count":
        plurals = [s for s, p in PLURALS.items() if p in words]
        assert len(colours) + len(plurals) <= 1, question
        if colours:
            return str(sum(o.colour == colours[0] for o in objects))
        if plurals:
            return str(sum(o.shape == plurals[0] for o in objects))
        assert {"objects", "shapes"} & set(words), question
        return str(len(objects))
    if kind == "position":
        refs = REF.findall(question)
        assert len(refs) == 2, question
        if question.startswith("Relative to the"):
            refs.reverse()  # "Relative to the B, is the A ...?"
        a, b = (_the_one(objects, colour=c, shape=s) for c, s in refs)
        if "left" in words:
            assert "right" in words and "above" not in words and a.col != b.col, question
            return "left" if a.col < b.col else "right"
        assert {"above", "below"} <= set(words) and a.row != b.row, question
        return "above" if a.row < b.row else "below"
    if kind == "exists":
        ((colour, shape),) = REF.findall(question)
        return "yes" if any(o.colour == colour and o.shape == shape for o in objects) else "no"
    raise AssertionError(f"unknown kind {kind!r}")


def parse_caption(text: str) -> Counter:
    return Counter(caption_objects(text))


def caption_objects(text: str) -> list[tuple]:
    """(shape, colour, row, col) of each object a caption names, in its order."""
    assert text.endswith(".") and text == text.lower(), text
    found = []
    for part in text[:-1].split(", "):
        m = re.fullmatch(rf"({'|'.join(COLOURS)}) ({'|'.join(PLURALS)}) (.+)", part)
        assert m and m.group(3) in CELLS, f"caption part {part!r} of {text!r}"
        found.append((m.group(2), m.group(1), *CELLS[m.group(3)]))
    return found


@pytest.fixture(scope="module")
def samples() -> dict[str, list[shapes.ShapesSample]]:
    return {split: shapes.generate(split, 400, seed=7, image_size=32) for split in SPLITS}


def _by_image(split_samples):
    return {s.index: s for s in split_samples}


def _files(root: Path) -> dict[str, bytes]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    summary = shapes.write_dataset(out, seed=3, n_train=60, n_val=30, n_test=30, image_size=48)
    return out, summary


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_identical_files(written, tmp_path):
    out, _ = written
    again = tmp_path / "again"
    shapes.write_dataset(again, seed=3, n_train=60, n_val=30, n_test=30, image_size=48)
    first, second = _files(out), _files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    assert sum(k.endswith(".png") for k in first) == 120


def test_different_seed_gives_different_data():
    a = shapes.generate("train", 20, seed=0)
    b = shapes.generate("train", 20, seed=1)
    assert [s.objects for s in a] != [s.objects for s in b]
    assert a[0].image.tobytes() != b[0].image.tobytes()
    assert [(s.question, s.answer) for s in a] != [(s.question, s.answer) for s in b]


def test_smaller_n_is_a_prefix():
    small = shapes.generate("val", 5, seed=2)
    large = shapes.generate("val", 12, seed=2)
    assert [(s.id, s.question, s.answer) for s in small] == [
        (s.id, s.question, s.answer) for s in large[: len(small)]
    ]
    assert small[-1].image.tobytes() == large[len(small) - 1].image.tobytes()


# --- content -------------------------------------------------------------------------------


def test_every_kind_present_and_answers_match_objects(samples):
    for split, items in samples.items():
        assert {s.kind for s in items} == KINDS, split
        for s in items:
            assert s.answer == s.answer.lower() and 1 <= len(s.answer.split()) <= 2
            assert s.answer in shapes.ANSWERS
            assert expected_answer(s.kind, s.question, s.objects) == s.answer, (s.id, s.question)


def test_each_image_gets_one_question_per_askable_kind(samples):
    per_image = Counter((s.split, s.index, s.kind) for items in samples.values() for s in items)
    assert set(per_image.values()) == {1}
    for items in samples.values():
        images = _by_image(items)
        assert len(images) == 400
        # count and exists can always be asked; the others most of the time
        kinds = Counter(s.kind for s in items)
        assert kinds["count"] == kinds["exists"] == 400
        assert min(kinds.values()) >= 0.5 * 400


def test_answers_are_varied(samples):
    items = [s for split in SPLITS for s in samples[split]]
    answers = {k: Counter(s.answer for s in items if s.kind == k) for k in KINDS}
    assert set(answers["shape"]) == set(PLURALS)
    assert set(answers["colour"]) == set(COLOURS)
    assert set(answers["count"]) == {"1", "2", "3", "4"}
    assert set(answers["position"]) == {"left", "right", "above", "below"}
    yes = answers["exists"]["yes"] / sum(answers["exists"].values())
    assert 0.4 <= yes <= 0.6
    # a few phrasings per kind
    names = re.compile(rf"\b(an?|{'|'.join([*COLOURS, *PLURALS, *PLURALS.values()])})\b")
    for kind in KINDS:
        templates = {names.sub("X", s.question) for s in items if s.kind == kind}
        assert len(templates) >= 3, kind


def test_objects_occupy_distinct_cells_and_counts_in_range(samples):
    counts = Counter()
    for items in samples.values():
        for s in _by_image(items).values():
            cells = [(o.row, o.col) for o in s.objects]
            assert len(set(cells)) == len(cells)
            assert all(0 <= r < 3 and 0 <= c < 3 for r, c in cells)
            assert all(o.shape in PLURALS and o.colour in COLOURS for o in s.objects)
            counts[len(s.objects)] += 1
    assert set(counts) == {1, 2, 3, 4}


def test_captions_describe_every_object(samples):
    for items in samples.values():
        for s in _by_image(items).values():
            assert parse_caption(s.caption) == Counter(tuple(o) for o in s.objects)


def test_captions_name_the_objects_in_a_seeded_random_order(samples):
    """Not reading order (then the next cell could be read off the order, and no lookup is
    trained); the order has its own stream, so the same seed gives the same caption."""
    orders = Counter()
    for items in samples.values():
        for s in _by_image(items).values():
            if len(s.objects) < 2:
                continue
            orders[caption_objects(s.caption) == [tuple(o) for o in s.objects]] += 1
    assert orders[True] and orders[False] > orders[True]
    again = shapes.generate("train", 20, seed=0)
    assert [s.caption for s in again] == [s.caption for s in shapes.generate("train", 20, seed=0)]


@pytest.mark.parametrize("size", [48, 64, 384])
def test_image_shows_the_objects(size):
    """Each object's fill colour and black outline show in its cell; empty cells show only background."""
    for s in _by_image(shapes.generate("test", 6, seed=11, image_size=size)).values():
        assert s.image.mode == "RGB" and s.image.size == (size, size)
        occupied = {(o.row, o.col): o for o in s.objects}
        pixels = np.asarray(s.image)
        cell = size // 3
        for row in range(3):
            for col in range(3):
                block = pixels[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
                colours = Counter(map(tuple, block.tolist()))
                if (row, col) in occupied:
                    fill = shapes.COLOURS[occupied[row, col].colour]
                    assert colours[fill] >= 0.01 * cell * cell, (size, occupied[row, col])
                    assert colours[shapes.OUTLINE] >= 0.01 * cell * cell
                else:
                    assert set(colours) == {shapes.BACKGROUND}


def test_objects_keep_a_gap_between_cells():
    """Along every cell border the image is background: no object crosses into a neighbour."""
    size = 96
    for s in _by_image(shapes.generate("train", 30, seed=5, image_size=size)).values():
        pixels = s.image.load()
        for border in (size // 3, 2 * size // 3):
            for t in range(size):
                assert pixels[border, t] == shapes.BACKGROUND
                assert pixels[t, border] == shapes.BACKGROUND


# --- held-out pairs ------------------------------------------------------------------------


def test_held_out_pairs_leave_every_colour_and_shape_in_train():
    pairs = set(shapes.held_out_pairs())
    assert 0.1 <= len(pairs) / (len(COLOURS) * len(PLURALS)) <= 0.25
    train = {(c, s) for c in COLOURS for s in PLURALS} - pairs
    assert {c for c, _ in train} == set(COLOURS)
    assert {s for _, s in train} == set(PLURALS)


def test_held_out_pairs_absent_from_train_present_in_eval(samples):
    held = set(shapes.held_out_pairs())
    for s in samples["train"]:
        assert not {(o.colour, o.shape) for o in s.objects} & held, s.id
        assert not set(REF.findall(s.question)) & held, (s.id, s.question)
    for split in ("val", "test"):
        images = _by_image(samples[split]).values()
        share = sum(any((o.colour, o.shape) in held for o in s.objects) for s in images)
        assert share / len(images) >= 0.3, split
        seen = {(o.colour, o.shape) for s in images for o in s.objects}
        assert held <= seen, split


# --- files ---------------------------------------------------------------------------------


def test_json_files_are_llava_format(written):
    out, summary = written
    ids = set()
    for name in ("train", "val", "test", "pretrain"):
        records = json.loads((out / f"{name}.json").read_text())
        assert records
        for r in records:
            assert set(r) == {"id", "image", "conversations", "kind"}
            assert r["id"] not in ids
            ids.add(r["id"])
            assert (out / r["image"]).is_file()
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].count("<image>") == 1 and "<image>" not in gpt["value"]
            if name == "pretrain":
                assert human["value"] == "<image>" and r["kind"] == "caption"
                assert r["image"].startswith("images/train_")
            else:
                assert human["value"].startswith("<image>\n") and r["kind"] in KINDS
                assert r["image"].startswith(f"images/{name}_")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"] == {
        "seed": 3, "image_size": 48, "n_train": 60, "n_val": 30, "n_test": 30, "max_objects": 4
    }  # fmt: skip
    assert [tuple(p) for p in meta["held_out_pairs"]] == list(shapes.held_out_pairs())
    assert meta["version"] == shapes.GENERATOR_VERSION
    assert meta["counts"]["train"]["images"] == 60
    assert meta["counts"]["train"]["images_with_held_out"] == 0
    assert sum(meta["counts"]["test"]["by_kind"].values()) == meta["counts"]["test"]["records"]
    assert summary["counts"] == meta["counts"]


def test_instruct_conversations_hold_every_question_and_the_caption(written):
    out, summary = written
    instruct = json.loads((out / "instruct.json").read_text())
    train = json.loads((out / "train.json").read_text())
    stage1 = {r["image"]: r["conversations"][1]["value"] for r in json.loads((out / "pretrain.json").read_text())}
    captions = {s.image_file: s.caption for s in shapes.generate("train", 60, seed=3, image_size=48)}
    assert len(instruct) == summary["counts"]["instruct"]["records"] == 60
    singles = Counter((r["image"], r["conversations"][0]["value"].removeprefix("<image>\n"),
                       r["conversations"][1]["value"]) for r in train)
    pairs = Counter()
    extra = Counter()
    forms = Counter()  # True: stage 1 has the colour-first caption of the image, False: the shape-first form
    for r in instruct:
        assert set(r) == {"id", "image", "conversations", "kinds"}
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(r["kinds"])
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        # the caption request comes last: no question can be answered from the caption's text
        assert r["kinds"].count("caption") == 1 and r["kinds"][-1] == "caption"
        assert set(r["kinds"]) - {"caption", "where"} <= KINDS
        seen = set()
        for kind, (q, a) in zip(r["kinds"], zip(turns[::2], turns[1::2])):
            question = q["value"].removeprefix("<image>\n")
            assert (question, a["value"]) not in seen  # no turn asked twice
            seen.add((question, a["value"]))
            if kind == "caption":  # always the colour-first caption, whatever form stage 1 has
                assert a["value"] == captions[r["image"]]
                forms[stage1[r["image"]] == captions[r["image"]]] += 1
            elif kind == "where":
                extra[kind] += 1
                colour, shape = question.removeprefix("Where is the ").removesuffix("?").split()
                assert (shape, colour, *CELLS[a["value"]]) in caption_objects(captions[r["image"]])
            elif (r["image"], question, a["value"]) in singles and not pairs[(r["image"], question, a["value"])]:
                pairs[(r["image"], question, a["value"])] += 1
            else:
                assert kind == "exists" and a["value"] in ("yes", "no")  # the extra existence question
                extra[kind] += 1
    assert pairs == singles  # every single-turn train question, each once
    assert extra["where"] > len(instruct) and extra["exists"] > len(instruct) / 2
    assert forms[False] > 0 and forms[True] > forms[False] and sum(forms.values()) == len(instruct), forms


def test_stage1_names_a_quarter_of_the_images_shape_first_without_cells(written):
    """pretrain.json: each image's caption (colour first, with cells) or, drawn per image, the same
    objects in the same order named shape first without cells: the "find by shape, read the colour"
    lookup that colour questions need, kept apart from the cell lookup."""
    out, _ = written
    stage1 = json.loads((out / "pretrain.json").read_text())
    by_image = _by_image(shapes.generate("train", 60, seed=3, image_size=48))
    shape_first = 0
    for r in stage1:
        s = by_image[int(r["image"].removeprefix("images/train_").removesuffix(".png"))]
        text = r["conversations"][1]["value"]
        if text == s.caption:
            continue
        shape_first += 1
        named = [part.split(" ") for part in text.removesuffix(".").split(", ")]
        assert [(shape, colour) for shape, colour in named] == [(o[0], o[1]) for o in caption_objects(s.caption)], text
    # one draw per train image, in order, from the stream [seed, 777] (the tenth look's files)
    draws = np.random.default_rng([3, 777]).random(len(stage1))
    assert shape_first == int((draws < shapes.SHAPE_FIRST_SHARE).sum()) > 0
    assert shapes.SHAPE_FIRST_SHARE == 0.25
    assert shapes.shape_first_caption([shapes.ShapeObject("circle", "red", 0, 0),
                                       shapes.ShapeObject("square", "blue", 1, 1)]) == "circle red, square blue."


def test_written_records_match_in_memory_samples(written):
    out, _ = written
    records = json.loads((out / "test.json").read_text())
    samples = shapes.generate("test", 30, seed=3, image_size=48)
    assert [r["id"] for r in records] == [s.id for s in samples]
    for r, s in zip(records, samples):
        assert r["conversations"][1]["value"] == s.answer
        assert r["conversations"][0]["value"] == "<image>\n" + s.question
    first = Image.open(out / samples[0].image_file)
    assert first.mode == "RGB" and first.size == (48, 48)
    assert first.tobytes() == samples[0].image.tobytes()


def test_images_decode_with_the_right_size(written):
    out, _ = written
    for path in sorted((out / "images").glob("*.png")):
        with Image.open(path) as image:
            image.load()
            assert image.mode == "RGB" and image.size == (48, 48)


def test_user_errors_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="image_size"):
        shapes.generate("train", 1, image_size=16)
    with pytest.raises(DataError, match="split"):
        shapes.generate("dev", 1)
    with pytest.raises(DataError, match="n_train"):
        shapes.write_dataset(tmp_path / "x", n_train=-1)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        shapes.write_dataset(a_file, n_train=1, n_val=1, n_test=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        shapes.write_dataset(other, n_train=1, n_val=1, n_test=1)
    with pytest.raises(DataError, match="holds no shapes dataset"):
        shapes.write_dataset(other, n_train=1, n_val=1, n_test=1, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_previous_dataset(tmp_path):
    out = tmp_path / "ds"
    shapes.write_dataset(out, n_train=4, n_val=2, n_test=2, image_size=32)
    shapes.write_dataset(out, n_train=2, n_val=1, n_test=1, image_size=32, overwrite=True)
    assert len(list((out / "images").glob("*.png"))) == 4


def _env() -> dict[str, str]:
    """The environment for a child Python that finds this checkout even when not installed."""
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


# --- CLI -----------------------------------------------------------------------------------


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--out", "--seed", "--train", "--val", "--test", "--image-size", "--tokenizer"):
        assert flag in help_text


def test_cli_writes_a_small_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--seed", "4", "--train", "12", "--val", "6", "--test", "6"]
    assert cli.main([*args, "--image-size", "32", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "train" in printed and "position" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["n_train"] == 12 and meta["config"]["image_size"] == 32
    assert len(list((out / "images").glob("*.png"))) == 24


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "tinyllava_edge.cli.data", "--out", str(a_file), "--train", "3"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "taken" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags, word",
    [(["--image-size", "8"], "image_size"), (["--tokenizer", "--vocab-size", "100"], "vocab_size")],
)
def test_cli_bad_value_exits_2(tmp_path, capsys, flags, word):
    assert cli.main(["--out", str(tmp_path / "x"), *flags, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and word in err[0]
    assert not (tmp_path / "x").exists()


def test_generator_imports_no_torch():
    code = (
        "import sys, tinyllava_edge.data.shapes, tinyllava_edge.data.shapes_tokenizer, "
        "tinyllava_edge.cli.data; "
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
