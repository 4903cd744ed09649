"""The lookup probe (tinyllava_edge.eval.shapes_lookup): its questions, baselines and scores."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinyllava_edge.data import shapes
from tinyllava_edge.data.shapes import CELL_NAMES, ShapesConfig, scenes
from tinyllava_edge.errors import DataError
from tinyllava_edge.eval.shapes_lookup import (
    PROBES,
    lookup_items,
    markdown_rows,
    run_lookup,
    score_lookup,
)

CONFIG = ShapesConfig(seed=5, image_size=48)


def test_scenes_are_the_dataset_images(tmp_path):
    shapes.write_dataset(tmp_path / "d", seed=5, n_train=2, n_val=2, n_test=6, image_size=48)
    for scene in scenes(CONFIG, "test", 6):
        written = np.asarray(Image.open(tmp_path / "d" / "images" / f"test_{scene.index:06d}.png").convert("RGB"))
        assert np.array_equal(np.asarray(scene.image), written)
        assert 1 <= len(scene.objects) <= CONFIG.max_objects
    with pytest.raises(DataError, match="unknown shapes split 'dev'"):
        next(scenes(CONFIG, "dev", 1))


def test_items_single_out_their_object_and_baselines_count_matching_objects():
    items = lookup_items(CONFIG, "test", 60)
    assert {i.probe for i in items} == set(PROBES)
    counts = {i.n_objects for i in items}
    assert counts == {1, 2, 3, 4}
    for item in items:
        if item.n_objects == 1:
            assert item.baseline == 1.0
        assert 0 < item.baseline <= 1.0
        if item.probe == "where":
            # cells never repeat, so the baseline is exactly 1/n
            assert item.baseline == pytest.approx(1 / item.n_objects)
            assert item.answer in {c for row in CELL_NAMES for c in row}
    # every 'where' answer is the cell of the one object with that colour and shape
    scene_items = lookup_items(CONFIG, "test", 1)
    scene = next(scenes(CONFIG, "test", 1))
    for item in scene_items:
        if item.probe == "where":
            target = [o for o in scene.objects if f"the {o.colour} {o.shape}?" in item.question]
            assert len(target) == 1 and item.answer == CELL_NAMES[target[0].row][target[0].col]


def test_scores_oracle_random_object_and_wrong():
    items = lookup_items(CONFIG, "test", 80)
    oracle = score_lookup(items, [i.answer for i in items])
    assert all(g["accuracy"] == 100.0 for by in oracle.values() for g in by.values())
    assert set(oracle) == set(PROBES) and "all" in oracle["where"]
    assert sum(g["n"] for k, g in oracle["where"].items() if k != "all") == oracle["where"]["all"]["n"]
    wrong = score_lookup(items, ["purple elephant"] * len(items))
    assert all(g["accuracy"] == 0.0 for by in wrong.values() for g in by.values())
    # the baseline does not depend on the answers; for 'where' it is 100/n
    assert wrong["where"]["2"]["baseline"] == pytest.approx(50.0)
    assert wrong["where"]["4"]["baseline"] == pytest.approx(25.0)
    rows = list(markdown_rows(oracle))
    assert len(rows) == 2 + sum(len(by) for by in oracle.values())
    assert rows[2].startswith("| where | 1 | ") and rows[2].endswith(" | 100.0 | 100.0 |")
    with pytest.raises(ValueError, match="3 answers for"):
        score_lookup(items, ["x"] * 3)


def test_run_lookup_formats_answers_like_the_benchmark():
    asked = []

    def predict(requests):
        asked.extend(requests)
        return [f" {answer.upper()}." for answer in answers]

    items = lookup_items(CONFIG, "test", 10)
    answers = [i.answer for i in items]
    scores = run_lookup(predict, CONFIG, "test", 10)
    assert len(asked) == len(items) and all(isinstance(q, str) for _, q in asked)
    assert scores["shape"]["all"]["accuracy"] == 100.0
