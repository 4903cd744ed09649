"""The shapes benchmark: held-out splits of the synthetic shapes dataset (``tinyllava-data``).

A split file (``test.json`` / ``val.json``) is a JSON list of LLaVA records, one question each:
``{"id", "image": "images/<split>_NNNNNN.png", "conversations": [{"from": "human", "value":
"<image>\\n<question>"}, {"from": "gpt", "value": <answer>}], "kind"}`` with ``kind`` one of
shape / colour / count / position / exists. The question is asked as is (no format line; the
model is trained on these very questions). Answers come from a closed vocabulary, so the score
is exact match after :func:`metrics.exact_match_text` (strip, no trailing period, lower case):
overall, per kind, and the most common (expected -> got) confusions.
"""

from __future__ import annotations

from pathlib import Path

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
from tinyllava_edge.errors import DataError
from tinyllava_edge.eval.benchmark import BENCHMARKS, Benchmark, Table, Truth
from tinyllava_edge.eval.formats import (
    Answer, BadData, Question, RecordError, Sources, get, image_path, key_of, read_json,
)
from tinyllava_edge.eval.metrics import exact_match_text, grouped_accuracy, percent, top_confusions

CONFUSIONS_SHOWN = 10
_GOT_WIDTH = 40  # long wrong answers are cut in the confusion table


def _records(src: Sources) -> tuple[Path, list]:
    path = src.require("questions", "a shapes split file (DIR/test.json from tinyllava-data)", option="--data/--split")
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path} is a JSON {type(records).__name__}; expected a list of LLaVA records")
    return path, records


def _parse(where: str, rec: dict) -> tuple[str, str, str, str, str]:
    """(id, image, question, answer, kind) of one record."""
    conversations = get(rec, "conversations", list)
    if len(conversations) < 2 or not all(isinstance(c, dict) for c in conversations[:2]):
        raise RecordError("needs a question and an answer in 'conversations'")
    question = get(conversations[0], "value").replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return key_of(get(rec, "id")), get(rec, "image"), question, get(conversations[1], "value"), get(rec, "kind")


def read_shapes_questions(src: Sources, bad: BadData) -> list[Question]:
    path, records = _records(src)
    folder = src.image_folder if src.image_folder is not None else path.parent
    parsed = bad.records(((f"{path}, record {i}", r) for i, r in enumerate(records)),
                         lambda w, r: (w, _parse(w, r)))
    return [Question(qid, question, image_path(folder, image), where, {"kind": kind})
            for where, (qid, image, question, _, kind) in parsed]


def load_shapes_truth(src: Sources, bad: BadData) -> Truth:
    path, records = _records(src)
    parsed = bad.records(((f"{path}, record {i}", r) for i, r in enumerate(records)), _parse)
    return Truth(path, {qid: {"answer": answer, "kind": kind} for qid, _, _, answer, kind in parsed})


def score_shapes(pairs: list[tuple[Answer, dict]]) -> dict:
    rows = [(gt["kind"], exact_match_text(gt["answer"]), exact_match_text(a.text)) for a, gt in pairs]
    right = [float(expected == got) for _, expected, got in rows]
    return {
        "n": len(rows),
        "correct": int(sum(right)),
        "exact_match": percent(sum(right), len(rows)),
        "per_kind": grouped_accuracy((kind, s) for (kind, _, _), s in zip(rows, right)),
        "confusions": top_confusions(((k, e, g[:_GOT_WIDTH]) for k, e, g in rows), CONFUSIONS_SHOWN),
    }


def shapes_tables(m: dict) -> list[Table]:
    kinds = [[k, g["n"], int(g["correct"]), g["accuracy"]] for k, g in m["per_kind"].items()]
    kinds.append(["all", m["n"], m["correct"], m["exact_match"]])
    confusions = [[c["kind"], c["expected"], c["got"] or "(empty)", c["count"]] for c in m["confusions"]]
    return [("Exact match per question kind", ["kind", "questions", "correct", "exact match"], kinds),
            ("Most common errors", ["kind", "expected", "got", "count"], confusions)]


BENCHMARKS.add("shapes", Benchmark(
    name="shapes", title="Shapes (synthetic, held-out split)", max_new_tokens=8,
    read_questions=read_shapes_questions, load_truth=load_shapes_truth, score=score_shapes,
    tables=shapes_tables, headline=("exact_match",),
    files_help="--data DIR written by tinyllava-data and --split (default test)",
    scorer="exact match after strip, final period dropped, lower-case (this project's)",
))
