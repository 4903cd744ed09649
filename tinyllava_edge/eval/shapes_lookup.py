"""Does a model find an object by its description? A probe on shapes scenes, by object count.

The shapes benchmark scores answers; it cannot tell a model that finds "the purple triangle"
among four objects from one that answers about *some* object of the image. This probe asks
three lookup questions about every object that its description singles out, groups the answers
by the number of objects in the image, and sets each accuracy beside the **random-object
baseline**: the accuracy of answering with the attribute of an object picked at random (1/n when
the n objects differ in that attribute). A model that looks up nothing sits on the baseline at
every n; one that does climbs towards 100 % however many objects there are.

* ``where``  "Where is the purple triangle?" -> "top left" (by colour and shape; reads the cell)
* ``shape``  "What shape is the red object?" -> "circle" (by colour; reads the shape)
* ``colour`` "What colour is the square?" -> "blue" (by shape; reads the colour)

Scenes come from the generator itself (:func:`tinyllava_edge.data.shapes.scenes`), so the probe
needs only the generator's seed and split, not a dataset on disk.

    python benchmarks/shapes_lookup.py --model runs/tiny-shapes/model
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tinyllava_edge.data.shapes import CELL_NAMES, ShapeObject, ShapesConfig, scenes
from tinyllava_edge.eval.metrics import exact_match_text, percent

PROBES = ("where", "shape", "colour")


@dataclass(frozen=True)
class LookupItem:
    probe: str  # one of PROBES
    image: Any  # PIL image
    question: str
    answer: str
    n_objects: int
    baseline: float  # accuracy of answering with the attribute of a random object of the image


def _attribute(probe: str, o: ShapeObject) -> str:
    if probe == "where":
        return CELL_NAMES[o.row][o.col]
    return o.shape if probe == "shape" else o.colour


def _questions(objects: Sequence[ShapeObject]) -> list[tuple[str, str, ShapeObject]]:
    """(probe, question, object) for every object its probe's description singles out."""
    pairs = Counter((o.colour, o.shape) for o in objects)
    colours = Counter(o.colour for o in objects)
    shapes = Counter(o.shape for o in objects)
    out = []
    for o in objects:
        if pairs[(o.colour, o.shape)] == 1:
            out.append(("where", f"Where is the {o.colour} {o.shape}?", o))
        if colours[o.colour] == 1:
            out.append(("shape", f"What shape is the {o.colour} object?", o))
        if shapes[o.shape] == 1:
            out.append(("colour", f"What colour is the {o.shape}?", o))
    return out


def lookup_items(config: ShapesConfig, split: str = "test", n: int = 400) -> list[LookupItem]:
    """The probe's questions about the first `n` scenes of `split`."""
    items = []
    for scene in scenes(config, split, n):
        for probe, question, target in _questions(scene.objects):
            answer = _attribute(probe, target)
            baseline = sum(_attribute(probe, o) == answer for o in scene.objects) / len(scene.objects)
            items.append(LookupItem(probe, scene.image, question, answer, len(scene.objects), baseline))
    return items


def score_lookup(items: Sequence[LookupItem], answers: Sequence[str]) -> dict:
    """Accuracy and random-object baseline (both %) per probe and object count, and over all counts;
    answers compare as the shapes benchmark compares them (:func:`.metrics.exact_match_text`)."""
    if len(items) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(items)} questions")
    groups: dict[tuple[str, Any], list[tuple[bool, float]]] = defaultdict(list)
    for item, answer in zip(items, answers):
        right = exact_match_text(answer) == exact_match_text(item.answer)
        groups[(item.probe, item.n_objects)].append((right, item.baseline))
        groups[(item.probe, "all")].append((right, item.baseline))
    out: dict[str, dict] = {}
    for (probe, count), rows in sorted(groups.items(), key=lambda kv: (PROBES.index(kv[0][0]), str(kv[0][1]))):
        out.setdefault(probe, {})[str(count)] = {
            "n": len(rows),
            "accuracy": round(percent(sum(r for r, _ in rows), len(rows)), 2),
            "baseline": round(percent(sum(b for _, b in rows), len(rows)), 2),
        }
    return out


def run_lookup(predict: Callable[[list[tuple[Any, str]]], list[str]], config: ShapesConfig,
               split: str = "test", n: int = 400) -> dict:
    items = lookup_items(config, split, n)
    return score_lookup(items, predict([(i.image, i.question) for i in items]))


def markdown_rows(scores: dict) -> Iterable[str]:
    """A markdown table of :func:`score_lookup`'s figures, one row per probe and object count."""
    yield "| probe | objects | questions | accuracy % | random-object baseline % |"
    yield "|---|---|---|---|---|"
    for probe, by_count in scores.items():
        for count, g in by_count.items():
            yield f"| {probe} | {count} | {g['n']} | {g['accuracy']} | {g['baseline']} |"
