"""Synthetic "shapes" VQA data: filled coloured shapes on a 3x3 grid, with questions and captions.

Each image holds 1 to ``max_objects`` (default 4) objects (a shape in a colour), each in its own
cell of a 3x3 grid over a mid-grey background. Every object stays inside the middle 80 % of its cell,
so neighbours are separated by at least a fifth of a cell and "left of" / "above" follow from the
cells alone.

Every image gets one question per kind where that kind can be asked unambiguously (records stay
one question-answer pair each):

- ``shape``    "What shape is the red object?" -> "circle" (asked only of a colour seen once)
- ``colour``   "What colour is the triangle?" -> "blue" (asked only of a shape seen once)
- ``count``    "How many circles are there?" / "...objects..." / "...red objects..." -> "2"
- ``position`` "Is the red circle left or right of the blue square?" -> "left" (or
  "above" / "below"); both objects are unique by colour and shape and sit in different
  columns (or rows)
- ``exists``   "Is there a green cross?" -> "yes" / "no", about half each

Answers come from a closed set of lowercase words (``ANSWERS``), so exact match scores them.

Captions ("blue square center, red circle top left.") name every object as colour, shape, cell,
in a seeded random order. Both choices are for stage 1, which trains on them: in random order
the next cell cannot be read off a scan of the grid, and with the cell right after the shape
(no "at the" in between) predicting it is one lookup of the object just named. That lookup is
what "where", relative-position and existence questions build on (docs/tiny-shapes-training.md,
sixth look).

Stage 1's file (``pretrain.json``) names the objects of a quarter of the images the other way
round and without cells ("square blue, circle red."), drawn per image: after a shape word comes
that object's colour, the lookup "What colour is the square?" needs (find an object by its shape,
read its colour), which the colour-first form never trains. The two lookups compete early in
stage 1: with cells, or with half of the images in this form, the cell lookup often never forms
(relative position at chance); with none, the lookup by shape often does not (colour at 64 %).
A quarter, without cells, formed both at every seed measured (docs/tiny-shapes-training.md,
tenth and eleventh looks).

For training, ``instruct.json`` holds one multi-turn conversation per train image: every question
of the image, plus ``EXTRA_TURNS`` (two "Where is the red circle?" -> "top left" and one more
existence question), in a seeded random order, then a request for its caption (last, so no
question can be read off the caption; LLaVA's instruction data is multi-turn in the same way).
One image then serves six to nine supervised answers in one sequence, which is most of what
makes the default model train in minutes on a CPU.

Held-out combinations: the (colour, shape) pairs in ``HELD_OUT_PAIRS`` never appear in a train
image, nor in a train question; val and test images contain them freely, and a quarter of them
are made to contain one, so about half of all val/test images hold at least one.

Determinism: an image and its questions depend only on (seed, split, index) through their own
numpy generator, so equal arguments give byte-identical PNGs and JSON, and a smaller ``n`` gives a
prefix of a larger one.

This module imports numpy, PIL and the standard library only (no torch), so the data can be made
on any machine.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
from tinyllava_edge.errors import DataError

GENERATOR_NAME = "tinyllava_edge.data.shapes"  # written to meta.json; marks our datasets
# 2: grey background, outlined shapes, instruct.json; 3: instruct turns (caption last, extra);
# 4: terse captions ("red circle top left, ..."), objects in a random order (images and questions as in 3)
# (5: shape-first captions with cells, an experiment not adopted); 6: a quarter of pretrain.json's
# captions name shapes first, without cells ("circle red, square blue."); images, questions,
# instruct.json and the samples' captions as in 4
GENERATOR_VERSION = 6
# The share of stage-1 captions in the shape-first form, and the stream that draws it per image
# (a stream of its own, so images, questions and caption orders stay those of version 4).
SHAPE_FIRST_SHARE = 0.25
_SHAPE_FIRST_STREAM = 777
# Training-only turns added to each instruct conversation: "Where is the red circle?" -> "top left"
# (finding an object by colour and shape, then reading its cell: the skill relative-position and
# existence questions build on) twice, and one more existence question. The single-turn splits
# (train.json, val.json, test.json) keep the five benchmark kinds.
EXTRA_TURNS = ("where", "where", "exists")
SPLITS = ("train", "val", "test")
KINDS = ("shape", "colour", "count", "position", "exists")

# Hues far apart (red 0°, orange ~30°, yellow ~55°, green ~130°, blue ~225°, purple ~270°) at high
# saturation, so the colours stay distinct after resizing and on a 32-px image.
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 40),
    "green": (40, 190, 60),
    "blue": (45, 95, 235),
    "purple": (155, 65, 215),
})
# Mid-grey: after SigLIP's (x - 0.5) / 0.5 normalisation the background sits near 0 and every
# colour stands out from it in some channel; on the dark grey of version 1 the randomly
# initialised tower of the default model told colours apart measurably worse.
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: Mapping[str, str] = MappingProxyType({
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
})
GRID = 3
# CELL_NAMES[row][col], as used in captions ("red circle top left") and "where" answers.
CELL_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

# 5 of the 30 (colour, shape) pairs (17 %), one per shape and at most one per colour, so every
# colour and every shape still appears in train in at least four other combinations.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "diamond"),
    ("green", "triangle"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("purple", "square"),
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
# Share of val/test images forced to contain a held-out pair; the others contain one by chance
# (about 35 % of them with 1-4 objects), so about half of val/test images hold one in all.
EVAL_FORCED_HELD_OUT = 0.25

# Object geometry in units of a cell's width: half-extent (radius) and how far the centre may move
# from the cell centre. radius + shift <= 0.40 leaves a gap of >= 0.20 cell between neighbours.
RADIUS_RANGE = (0.30, 0.36)
MAX_SHIFT = 0.04
# Shapes are drawn this many times larger, then box-reduced: smoother edges at 32-64 px without
# giving up exact reproducibility. The drawing is kept under ~1024 px on a side.
SUPERSAMPLE = 4
MAX_DRAW_SIZE = 1024
# Every shape has a black outline this wide (in cell widths; 1.5 px at 48 px). The outline is the
# same for every colour, so a shape's silhouette reaches the vision features apart from its fill:
# random features of filled shapes alone told shapes apart for the colours seen in training but
# not for the held-out pairs (a probe on the default model's frozen tower: 11-19 % on held-out
# pairs without the outline, 99-100 % with it).
OUTLINE_WIDTH = 0.094
OUTLINE = (0, 0, 0)

SHAPE_TEMPLATES = (
    "What shape is the {colour} object?",
    "What is the shape of the {colour} object?",
    "Which shape is {colour}?",
)
COLOUR_TEMPLATES = (
    "What colour is the {shape}?",
    "What is the colour of the {shape}?",
    "What color is the {shape}?",
)
COUNT_ALL_TEMPLATES = (
    "How many objects are there?",
    "How many shapes are in the image?",
    "Count the objects.",
)
COUNT_SHAPE_TEMPLATES = (
    "How many {shapes} are there?",
    "How many {shapes} are in the image?",
    "Count the {shapes}.",
)
COUNT_COLOUR_TEMPLATES = (
    "How many {colour} objects are there?",
    "How many {colour} shapes are in the image?",
    "Count the {colour} objects.",
)
# {a} and {b} are "red circle"-style references; the answer says where {a} is relative to {b}.
HORIZONTAL_TEMPLATES = (
    "Is the {a} left or right of the {b}?",
    "Is the {a} to the left or to the right of the {b}?",
    "Relative to the {b}, is the {a} on the left or on the right?",
)
VERTICAL_TEMPLATES = (
    "Is the {a} above or below the {b}?",
    "Is the {a} located above or below the {b}?",
    "Relative to the {b}, is the {a} above or below?",
)
DESCRIBE_TEMPLATES = (
    "Describe the image.",
    "What is in the image?",
    "List the objects in the image.",
)
EXISTS_TEMPLATES = (
    "Is there {article} {colour} {shape}?",
    "Is there {article} {colour} {shape} in the image?",
    "Does the image contain {article} {colour} {shape}?",
)

MAX_OBJECTS_LIMIT = GRID * GRID
ANSWERS: tuple[str, ...] = (
    *SHAPES,
    *COLOURS,
    *(str(n) for n in range(1, MAX_OBJECTS_LIMIT + 1)),
    "left",
    "right",
    "above",
    "below",
    "yes",
    "no",
)


class ShapeObject(NamedTuple):
    """One drawn object: shape and colour names, and its grid cell (row 0 top, col 0 left)."""

    shape: str
    colour: str
    row: int
    col: int


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that decides a shapes dataset; written to meta.json beside the data."""

    seed: int = 0
    image_size: int = 64
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 400
    max_objects: int = 4

    def __post_init__(self) -> None:
        for name in ("seed", "image_size", "n_train", "n_val", "n_test", "max_objects"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"shapes {name} must be an integer, got {value!r}")
        if self.seed < 0:
            raise DataError(f"shapes seed must be >= 0, got {self.seed}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise DataError(f"shapes {name} must be >= 0, got {getattr(self, name)}")
        if not 32 <= self.image_size <= MAX_DRAW_SIZE:
            raise DataError(
                f"shapes image_size must be between 32 and {MAX_DRAW_SIZE} pixels, "
                f"got {self.image_size}"
            )
        if not 1 <= self.max_objects <= MAX_OBJECTS_LIMIT:
            raise DataError(
                f"shapes max_objects must be between 1 and {MAX_OBJECTS_LIMIT} (one object per "
                f"cell of the {GRID}x{GRID} grid), got {self.max_objects}"
            )

    def split_size(self, split: str) -> int:
        _check_split(split)
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


@dataclass(frozen=True)
class ShapesSample:
    """One question-answer pair about one image; the questions of an image share its ``image``."""

    id: str
    split: str
    index: int  # the image's index within its split
    image: Image.Image
    image_file: str  # relative path used in the JSON, e.g. "images/train_000000.png"
    question: str
    answer: str
    kind: str
    caption: str
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class _Scene:
    objects: tuple[ShapeObject, ...]
    # (cx, cy, radius) per object, as fractions of the image side
    placements: tuple[tuple[float, float, float], ...]


def held_out_pairs() -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs that never appear in train images or train questions."""
    return HELD_OUT_PAIRS


def has_held_out(objects: tuple[ShapeObject, ...] | list[ShapeObject]) -> bool:
    return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in objects)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown shapes split {split!r}; expected one of {', '.join(SPLITS)}")


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _caption_order(seed: int, split: str, index: int, n: int) -> list[int]:
    """The order a caption names an image's ``n`` objects in: random, from a stream of its own,
    so the image and its questions stay those of the image stream alone.

    In reading order the next object's cell is the next occupied cell, so a caption can be
    continued without finding the object just named in the image; in random order it cannot,
    and stage 1 then trains the lookup (colour and shape -> the object's cell) that "where",
    relative-position and existence questions need."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
    return [int(i) for i in rng.permutation(n)]


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _make_scene(rng: np.random.Generator, split: str, max_objects: int) -> _Scene:
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    pairs = TRAIN_PAIRS if split == "train" else ALL_PAIRS
    chosen = [_pick(rng, pairs) for _ in range(n)]
    if split != "train" and rng.random() < EVAL_FORCED_HELD_OUT:
        chosen[0] = _pick(rng, HELD_OUT_PAIRS)
    objects, placements = [], []
    for (colour, shape), cell in zip(chosen, cells):
        row, col = divmod(int(cell), GRID)
        radius = rng.uniform(*RADIUS_RANGE)
        dx, dy = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2)
        objects.append(ShapeObject(shape, colour, row, col))
        placements.append(((col + 0.5 + dx) / GRID, (row + 0.5 + dy) / GRID, radius / GRID))
    # reading order, so captions and JSON do not depend on the order cells were drawn in
    order = sorted(range(n), key=lambda i: (objects[i].row, objects[i].col))
    return _Scene(tuple(objects[i] for i in order), tuple(placements[i] for i in order))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon outline of a shape whose bounding box is the square of half-side ``r``."""
    if shape == "square":
        h = 0.82 * r  # a little smaller than its box, so its area is close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = 0.34 * r  # half the arm thickness
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"no outline for shape {shape!r}")


def _render(scene: _Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    factor = max(1, min(SUPERSAMPLE, MAX_DRAW_SIZE // image_size))
    side = image_size * factor
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    width = max(1, round(OUTLINE_WIDTH * side / GRID))
    for obj, (fx, fy, fr) in zip(scene.objects, scene.placements):
        cx, cy, r = fx * side, fy * side, fr * side
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=OUTLINE, width=width)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill, outline=OUTLINE, width=width)
    return image.reduce(factor) if factor > 1 else image


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(objects: tuple[ShapeObject, ...] | list[ShapeObject]) -> str:
    """Name every object, in the order given: "red circle top left, blue square center."."""
    return ", ".join(f"{o.colour} {o.shape} {CELL_NAMES[o.row][o.col]}" for o in objects) + "."


def shape_first_caption(objects: tuple[ShapeObject, ...] | list[ShapeObject]) -> str:
    """Name every object shape first, without its cell, in the order given: "circle red, square blue."."""
    return ", ".join(f"{o.shape} {o.colour}" for o in objects) + "."


def _ask_shape(rng, objects) -> tuple[str, str] | None:
    counts = Counter(o.colour for o in objects)
    unique = [c for c in COLOURS if counts[c] == 1]
    if not unique:
        return None
    colour = _pick(rng, unique)
    answer = next(o.shape for o in objects if o.colour == colour)
    return _pick(rng, SHAPE_TEMPLATES).format(colour=colour), answer


def _ask_colour(rng, objects) -> tuple[str, str] | None:
    counts = Counter(o.shape for o in objects)
    unique = [s for s in SHAPES if counts[s] == 1]
    if not unique:
        return None
    shape = _pick(rng, unique)
    answer = next(o.colour for o in objects if o.shape == shape)
    return _pick(rng, COLOUR_TEMPLATES).format(shape=shape), answer


def _ask_count(rng, objects) -> tuple[str, str]:
    # Half the questions count all objects: their answers spread evenly over 1..max_objects,
    # where counts of one shape or colour are mostly "1".
    target = _pick(rng, ("all", "all", "shape", "colour"))
    if target == "all":
        return _pick(rng, COUNT_ALL_TEMPLATES), str(len(objects))
    # Name the shape (or colour) of a random object rather than a random distinct shape: shapes
    # seen more often are asked about more often, which keeps answers above "1" common.
    chosen = _pick(rng, objects)
    if target == "shape":
        n = sum(o.shape == chosen.shape for o in objects)
        return _pick(rng, COUNT_SHAPE_TEMPLATES).format(shapes=PLURALS[chosen.shape]), str(n)
    n = sum(o.colour == chosen.colour for o in objects)
    return _pick(rng, COUNT_COLOUR_TEMPLATES).format(colour=chosen.colour), str(n)


def _ask_position(rng, objects) -> tuple[str, str] | None:
    counts = Counter((o.colour, o.shape) for o in objects)
    unique = [o for o in objects if counts[(o.colour, o.shape)] == 1]
    pairs = [(a, b) for a in unique for b in unique if a != b]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    axes = [axis for axis, differs in (("h", a.col != b.col), ("v", a.row != b.row)) if differs]
    axis = _pick(rng, axes)
    names = {"a": f"{a.colour} {a.shape}", "b": f"{b.colour} {b.shape}"}
    if axis == "h":
        answer = "left" if a.col < b.col else "right"
        return _pick(rng, HORIZONTAL_TEMPLATES).format(**names), answer
    answer = "above" if a.row < b.row else "below"
    return _pick(rng, VERTICAL_TEMPLATES).format(**names), answer


def _ask_where(rng, objects) -> tuple[str, str] | None:
    counts = Counter((o.colour, o.shape) for o in objects)
    unique = [o for o in objects if counts[(o.colour, o.shape)] == 1]
    if not unique:
        return None
    o = _pick(rng, unique)
    return f"Where is the {o.colour} {o.shape}?", CELL_NAMES[o.row][o.col]


def _ask_exists(rng, objects, split: str) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present, key=ALL_PAIRS.index))
        answer = "yes"
    else:
        pairs = TRAIN_PAIRS if split == "train" else ALL_PAIRS
        absent = [p for p in pairs if p not in present]
        # Half the "no" questions share a colour or a shape with an object in the image, so the
        # answer needs the binding of colour to shape, not just one of them.
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        colour, shape = _pick(rng, near if near and rng.random() < 0.5 else absent)
        answer = "no"
    template = _pick(rng, EXISTS_TEMPLATES)
    return template.format(article=_article(colour), colour=colour, shape=shape), answer


def _questions(rng, objects, split: str) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every kind that can be asked of these objects."""
    asked = {
        "shape": _ask_shape(rng, objects),
        "colour": _ask_colour(rng, objects),
        "count": _ask_count(rng, objects),
        "position": _ask_position(rng, objects),
        "exists": _ask_exists(rng, objects, split),
    }
    return [(kind, *qa) for kind, qa in asked.items() if qa is not None]


@dataclass(frozen=True)
class _GeneratedImage:
    index: int
    image_file: str
    image: Image.Image
    objects: tuple[ShapeObject, ...]
    caption: str
    pretrain_caption: str  # stage 1's: the caption, or (a quarter of the images) its shape-first form
    questions: list[tuple[str, str, str]]
    # The instruct conversation: (kind, question, answer) turns, the caption request among them.
    turns: list[tuple[str, str, str]]


def _conversation(rng, questions: list[tuple[str, str, str]], text: str, objects, split: str
                  ) -> list[tuple[str, str, str]]:
    """The instruct turns of one image: its questions plus the EXTRA_TURNS drawn afresh, shuffled,
    then the caption request. The caption comes last so that no question can be answered by
    reading the caption back from the text (with it anywhere, half the questions of a
    conversation were answerable without looking at the image)."""
    turns = list(questions)
    ask = {"where": lambda: _ask_where(rng, objects), "exists": lambda: _ask_exists(rng, objects, split)}
    for kind in EXTRA_TURNS:
        qa = ask[kind]()
        if qa is not None and (kind, *qa) not in turns:
            turns.append((kind, *qa))
    turns = [turns[int(i)] for i in rng.permutation(len(turns))]
    return [*turns, ("caption", _pick(rng, DESCRIBE_TEMPLATES), text)]



def _iter_images(config: ShapesConfig, split: str, n: int) -> Iterator[_GeneratedImage]:
    form_rng = np.random.default_rng([config.seed, _SHAPE_FIRST_STREAM])  # one draw per image, in order
    for index in range(n):
        rng = _image_rng(config.seed, split, index)
        scene = _make_scene(rng, split, config.max_objects)
        ordered = [scene.objects[i] for i in _caption_order(config.seed, split, index, len(scene.objects))]
        text = caption(ordered)
        shape_first = form_rng.random() < SHAPE_FIRST_SHARE
        questions = _questions(rng, scene.objects, split)
        yield _GeneratedImage(
            index=index,
            image_file=f"images/{split}_{index:06d}.png",
            image=_render(scene, config.image_size),
            objects=scene.objects,
            caption=text,
            pretrain_caption=shape_first_caption(ordered) if shape_first else text,
            questions=questions,
            turns=_conversation(rng, questions, text, scene.objects, split),
        )


class Scene(NamedTuple):
    """One generated image and what it shows."""

    index: int
    image: Image.Image
    objects: tuple[ShapeObject, ...]


def scenes(config: ShapesConfig, split: str, n: int) -> Iterator[Scene]:
    """The first `n` images of `split` exactly as the dataset has them, with their objects."""
    _check_split(split)
    for item in _iter_images(config, split, n):
        yield Scene(item.index, item.image, item.objects)


def generate(
    split: str,
    n: int,
    seed: int = ShapesConfig.seed,
    image_size: int = ShapesConfig.image_size,
    max_objects: int = ShapesConfig.max_objects,
) -> list[ShapesSample]:
    """Make ``n`` images of ``split`` in memory and return their question-answer samples.

    Each image yields one sample per kind that can be asked of it (between 3 and 5), so the list
    is longer than ``n``; samples of one image share its ``image`` and ``objects``.
    """
    _check_split(split)
    config = ShapesConfig(seed=seed, image_size=image_size, max_objects=max_objects)
    if not isinstance(n, int) or n < 0:
        raise DataError(f"number of shapes images must be an integer >= 0, got {n!r}")
    return [
        ShapesSample(
            id=f"{split}_{item.index:06d}_{kind}",
            split=split,
            index=item.index,
            image=item.image,
            image_file=item.image_file,
            question=question,
            answer=answer,
            kind=kind,
            caption=item.caption,
            objects=item.objects,
        )
        for item in _iter_images(config, split, n)
        for kind, question, answer in item.questions
    ]


def qa_record(sample_id: str, image_file: str, question: str, answer: str, kind: str) -> dict:
    """One LLaVA-format record (the layout TinyLLaVA_Factory and LLaVA read)."""
    return {
        "id": sample_id,
        "image": image_file,
        "conversations": [
            {"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "kind": kind,
    }


def caption_record(sample_id: str, image_file: str, text: str) -> dict:
    """A pretrain record: the image alone as the human turn, its caption as the answer."""
    return {
        "id": sample_id,
        "image": image_file,
        "conversations": [
            {"from": "human", "value": DEFAULT_IMAGE_TOKEN},
            {"from": "gpt", "value": text},
        ],
        "kind": "caption",
    }


def conversation_record(sample_id: str, image_file: str, turns: list[tuple[str, str, str]]) -> dict:
    """A multi-turn LLaVA record: the image comes with the first question; ``kinds`` per turn."""
    conversations = []
    for i, (_kind, question, answer) in enumerate(turns):
        value = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "image": image_file, "conversations": conversations,
            "kinds": [kind for kind, _, _ in turns]}


def _holds_shapes_dataset(out: Path) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR_NAME


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"dataset output {out} is a file; expected a directory (new or empty)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(
                f"dataset output {out} is not empty; pick a new directory or overwrite it "
                "(--overwrite)"
            )
        if not _holds_shapes_dataset(out):
            raise DataError(
                f"refusing to overwrite {out}: it is not empty and holds no shapes dataset "
                "(no meta.json written by this generator)"
            )
        shutil.rmtree(out)


def _dump_json(path: Path, obj) -> int:
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def write_dataset(
    out_dir: str | Path,
    seed: int = ShapesConfig.seed,
    n_train: int = ShapesConfig.n_train,
    n_val: int = ShapesConfig.n_val,
    n_test: int = ShapesConfig.n_test,
    image_size: int = ShapesConfig.image_size,
    max_objects: int = ShapesConfig.max_objects,
    *,
    overwrite: bool = False,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Write the dataset to ``out_dir`` and return a summary of what was written.

    Layout: ``images/{split}_{index:06d}.png``, ``train.json`` / ``val.json`` / ``test.json``
    (LLaVA records, one question each, with a ``kind`` field), ``pretrain.json`` (one caption per
    train image: colour first with cells, or for a quarter of the images, drawn per image, shape
    first without them), ``instruct.json`` (one multi-turn conversation per train image) and ``meta.json`` (config, held-out pairs, counts, generator version).
    ``progress`` is called with 1 after each image written. An existing non-empty ``out_dir`` is
    replaced only with ``overwrite`` and only when it holds a previous shapes dataset.
    """
    config = ShapesConfig(
        seed=seed,
        image_size=image_size,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        max_objects=max_objects,
    )
    out = Path(out_dir)
    try:
        _prepare_dir(out, overwrite)
        (out / "images").mkdir(parents=True, exist_ok=True)
        counts, sizes = {}, {}
        image_bytes = 0
        for split in SPLITS:
            records, pretrain, instruct = [], [], []
            by_kind: Counter[str] = Counter()
            with_held_out = 0
            for item in _iter_images(config, split, config.split_size(split)):
                path = out / item.image_file
                item.image.save(path, format="PNG")
                image_bytes += path.stat().st_size
                with_held_out += has_held_out(item.objects)
                stem = f"{split}_{item.index:06d}"
                for kind, question, answer in item.questions:
                    record = qa_record(f"{stem}_{kind}", item.image_file, question, answer, kind)
                    records.append(record)
                    by_kind[kind] += 1
                if split == "train":
                    record = caption_record(f"{stem}_caption", item.image_file, item.pretrain_caption)
                    pretrain.append(record)
                    instruct.append(conversation_record(f"{stem}_instruct", item.image_file, item.turns))
                if progress is not None:
                    progress(1)
            sizes[f"{split}.json"] = _dump_json(out / f"{split}.json", records)
            if split == "train":
                sizes["pretrain.json"] = _dump_json(out / "pretrain.json", pretrain)
                sizes["instruct.json"] = _dump_json(out / "instruct.json", instruct)
            counts[split] = {
                "images": config.split_size(split),
                "records": len(records),
                "images_with_held_out": with_held_out,
                "by_kind": {k: by_kind[k] for k in KINDS},
            }
        counts["pretrain"] = {"images": config.n_train, "records": config.n_train}
        counts["instruct"] = {"images": config.n_train, "records": config.n_train}
        meta = {
            "generator": GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "config": asdict(config),
            "shapes": list(SHAPES),
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "background": list(BACKGROUND),
            "grid": GRID,
            "kinds": list(KINDS),
            "answers": list(ANSWERS),
            "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
            "counts": counts,
        }
        sizes["meta.json"] = _dump_json(out / "meta.json", meta)
    except OSError as err:
        raise DataError(f"cannot write the shapes dataset to {out}: {err.strerror or err}") from err
    return {
        "out_dir": str(out),
        "config": asdict(config),
        "counts": counts,
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "files": sizes,
        "image_bytes": image_bytes,
    }


def all_questions() -> list[str]:
    """Every question the generator can ask, each once (used to train the tokenizer)."""
    questions: list[str] = list(COUNT_ALL_TEMPLATES) + list(DESCRIBE_TEMPLATES)
    for colour in COLOURS:
        questions += [t.format(colour=colour) for t in SHAPE_TEMPLATES + COUNT_COLOUR_TEMPLATES]
    for shape in SHAPES:
        questions += [t.format(shape=shape) for t in COLOUR_TEMPLATES]
        questions += [t.format(shapes=PLURALS[shape]) for t in COUNT_SHAPE_TEMPLATES]
    for colour, shape in ALL_PAIRS:
        article = _article(colour)
        questions += [
            t.format(article=article, colour=colour, shape=shape) for t in EXISTS_TEMPLATES
        ]
        for other in ALL_PAIRS:
            if other != (colour, shape):
                names = {"a": f"{colour} {shape}", "b": " ".join(other)}
                questions += [t.format(**names) for t in HORIZONTAL_TEMPLATES + VERTICAL_TEMPLATES]
    return questions


def sample_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of ``n`` random layouts of up to nine objects, without drawing images."""
    rng = np.random.default_rng([seed, len(SPLITS)])  # a stream no image uses
    return [caption(_make_scene(rng, "test", MAX_OBJECTS_LIMIT).objects) for _ in range(n)]
