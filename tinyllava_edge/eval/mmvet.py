"""MM-Vet: open-ended answers graded by GPT-4 with MM-Vet's own evaluator, not here.

Questions: MM-Vet's ``mm-vet.json`` (``{"v1_0": {"imagename", "question", "answer",
"capability"}, ...}``, images in ``mm-vet/images``) or LLaVA's ``llava-mm-vet.jsonl``
(``{"question_id": 0, "image": "v1_0.png", "text"}``). The prompt is the question as given
(LLaVA docs/Evaluation.md: natural QA, no format line). The answers are also written in the
official submission format, ``{"v1_<question_id>": answer}`` (``convert_mmvet_for_eval.py``),
to ``mmvet_submission.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tinyllava_edge.errors import DataError
from tinyllava_edge.eval.benchmark import BENCHMARKS, Benchmark, Table, Truth
from tinyllava_edge.eval.formats import (
    Answer, BadData, Question, Sources, get, image_path, is_json_lines, llava_questions, read_json,
)

_OFFICIAL_KEY = re.compile(r"v1_(\d+)")


def read_mmvet_questions(src: Sources, bad: BadData) -> list[Question]:
    path = src.require("questions", "MM-Vet's mm-vet.json or LLaVA's llava-mm-vet.jsonl")
    if is_json_lines(path):
        return llava_questions(path, src.image_folder, bad)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path} is a JSON {type(doc).__name__}; expected MM-Vet's {{'v1_0': {{...}}, ...}}")

    def parse(where: str, item: tuple[str, Any]) -> Question:
        key, rec = item
        match = _OFFICIAL_KEY.fullmatch(key)
        # LLaVA's file numbers the questions; the submission key is "v1_" + that number.
        qid: int | str = int(match.group(1)) if match else key
        capability = rec.get("capability") if isinstance(rec, dict) else None
        return Question(qid, get(rec, "question"), image_path(src.image_folder, get(rec, "imagename")), where,
                        {"capability": capability} if capability else {})

    return list(bad.records(((f"{path}, question {k!r}", (k, v)) for k, v in doc.items()), parse))


def submission_key(question_id: Any) -> str:
    text = str(question_id)
    return text if text.startswith("v1_") else f"v1_{text}"


def write_mmvet_submission(answers: list[Answer], out_dir: Path,
                           questions: list[Question] | None) -> tuple[dict[str, Path], dict]:
    path = out_dir / "mmvet_submission.json"
    path.write_text(json.dumps({submission_key(a.question_id): a.text for a in answers}, indent=2), encoding="utf-8")
    return {"submission": path}, {}


def _no_truth(src: Sources, bad: BadData) -> Truth | None:
    return None


def _no_tables(metrics: dict) -> list[Table]:
    return []


BENCHMARKS.add("mmvet", Benchmark(
    name="mmvet", title="MM-Vet", max_new_tokens=512,
    read_questions=read_mmvet_questions, load_truth=_no_truth, score=None, tables=_no_tables,
    headline=(), write_extras=write_mmvet_submission,
    files_help="--questions mm-vet.json or llava-mm-vet.jsonl, --image-folder mm-vet/images",
    extra={"unscored_note": "MM-Vet is graded by GPT-4 with MM-Vet's evaluator: give it mmvet_submission.json."},
    scorer="none here: MM-Vet's GPT-4 grader scores mmvet_submission.json",
))
