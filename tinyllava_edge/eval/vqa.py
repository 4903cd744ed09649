"""VQAv2, GQA and TextVQA: short open answers.

Question files, either format:

* LLaVA's (eval.zip of LLaVA-1.5, used by TinyLLaVA_Factory's ``scripts/eval/*.sh``): JSON lines
  ``{"question_id", "image", "text", "category"}`` whose text already ends with
  ``"\\nAnswer the question using a single word or phrase."``
  (``llava_vqav2_mscoco_test-dev2015.jsonl``, ``llava_gqa_testdev_balanced.jsonl``,
  ``llava_textvqa_val_v051_ocr.jsonl``);
* the official ones, to which that line is appended: VQAv2 ``v2_OpenEnded_mscoco_*_questions.json``
  (``{"data_subtype", "questions": [{"image_id", "question", "question_id"}]}``, images
  ``COCO_<subtype>_<image_id:012d>.jpg``, test-dev images under ``test2015``); GQA
  ``testdev_balanced_questions.json`` (``{qid: {"imageId", "question", "answer", "types",
  "isBalanced", ...}}``, images ``<imageId>.jpg``); TextVQA ``TextVQA_0.5.1_val.json``
  (``{"data": [{"question_id", "image_id", "question", "answers"}]}``, images
  ``<image_id>.jpg``; LLaVA's file adds Rosetta OCR tokens to the prompt, which the official
  file cannot give).

Ground truth: VQAv2 ``v2_mscoco_*_annotations.json`` (``{"annotations": [{"question_id",
"answers": [{"answer"} x 10], "answer_type", "question_type"}]}``); GQA the official questions
file; TextVQA the official file.

Scoring, each as the code whose numbers people report:

* VQAv2: the answers as LLaVA's ``convert_vqav2_for_submission.py`` submits them (EvalAI
  processing, :func:`normalize.normalize_answer`), scored by the official VQA evaluator
  (GT-Vision-Lab/VQA ``vqaEval.py``, what the VQA server runs: :func:`metrics.vqa_eval_accuracy`),
  so a val score is what the server gives for the same submission file;
* TextVQA: m4c's ``TextVQAAccuracyEvaluator`` as LLaVA's ``eval_textvqa.py`` runs it (EvalAI
  processing of both sides, always); answers are matched by image id and lower-cased question,
  as LLaVA's TextVQA file uses the image id as ``question_id``;
* GQA: ``eval.py`` (exact match of ``text.rstrip('.').lower()`` on balanced questions; "open" =
  structural type ``query``).

The VQAv2 submission (``vqav2_submission.json``, ``[{"question_id", "answer"}]``) lists every
question of the questions file, in its order, with ``""`` for the unanswered ones: the
evaluator refuses a results file that misses a question, and LLaVA's converter fills every
test2015 question the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tinyllava_edge.atomic import write_text
from tinyllava_edge.errors import DataError
from tinyllava_edge.eval.benchmark import BENCHMARKS, Benchmark, Table, Truth
from tinyllava_edge.eval.formats import (
    SHORT_ANSWER_PROMPT, Answer, BadData, Question, RecordError, Sources, get, image_path,
    is_json_lines, key_of, llava_questions, question_id, read_json,
)
from tinyllava_edge.eval.metrics import (
    gqa_prediction, grouped_accuracy, m4c_accuracy, percent, vqa_eval_accuracy,
)
from tinyllava_edge.eval.normalize import normalize_answer


def _short(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER_PROMPT}"


def _listed(doc: Any, key: str, path: Path, what: str) -> list:
    items = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise DataError(f"{path} has no {key!r} list; expected {what}")
    return items


def _human_answers(rec: dict) -> list[str]:
    answers = get(rec, "answers", list)
    # VQAv2: [{"answer": str, ...}]; TextVQA: [str]
    texts = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise RecordError(f"field 'answers' must be a non-empty list of answers, got {answers!r:.80}")
    return texts


def _write_json(path: Path, obj: Any) -> Path:
    # whole or not at all: a submission cut short would be refused only at the server
    return write_text(path, json.dumps(obj))


# ---- VQAv2 ---------------------------------------------------------------------------------

def read_vqav2_questions(src: Sources, bad: BadData) -> list[Question]:
    path = src.require("questions", "LLaVA's llava_vqav2_*.jsonl or VQAv2's v2_OpenEnded_mscoco_*_questions.json")
    if is_json_lines(path):
        return llava_questions(path, src.image_folder, bad)
    doc = read_json(path)
    items = _listed(doc, "questions", path, "VQAv2's questions file {'questions': [...]}")
    subtype = str(doc.get("data_subtype", "val2014"))
    image_split = "test2015" if subtype.startswith("test") else subtype  # test-dev images live in test2015

    def parse(where: str, rec: dict) -> Question:
        image_id = get(rec, "image_id", int)
        return Question(question_id(rec), _short(get(rec, "question")),
                        image_path(src.image_folder, f"COCO_{image_split}_{image_id:012d}.jpg"), where,
                        {"image_id": image_id})

    return list(bad.records(((f"{path}, questions[{i}]", r) for i, r in enumerate(items)), parse))


def load_vqav2_truth(src: Sources, bad: BadData) -> Truth | None:
    if src.annotations is None:
        return None  # test-dev: answers go to the EvalAI server
    path = src.require("annotations", "VQAv2's v2_mscoco_*_annotations.json")
    items = _listed(read_json(path), "annotations", path, "VQAv2's annotations file {'annotations': [...]}")

    def parse(where: str, rec: dict) -> tuple[str, dict]:
        return key_of(question_id(rec)), {
            "answers": _human_answers(rec),
            "answer_type": str(rec.get("answer_type", "unknown")),
            "question_type": str(rec.get("question_type", "unknown")),
        }

    records = dict(bad.records(((f"{path}, annotations[{i}]", r) for i, r in enumerate(items)), parse))
    return Truth(path, records)


def submitted_answer(text: str) -> str:
    """A VQAv2 answer as the submission file holds it (LLaVA's converter: EvalAI processing)."""
    return normalize_answer(text)


def _vqa_metrics(scored: list[tuple[dict, float]]) -> dict:
    metrics = {"n": len(scored), "accuracy": percent(sum(s for _, s in scored), len(scored))}
    if any(gt.get("answer_type") for gt, _ in scored):
        metrics["per_answer_type"] = grouped_accuracy((gt["answer_type"], s) for gt, s in scored)
    if any(gt.get("question_type") for gt, _ in scored):
        metrics["per_question_type"] = grouped_accuracy((gt["question_type"], s) for gt, s in scored)
    return metrics


def score_vqav2(pairs: list[tuple[Answer, dict]]) -> dict:
    return _vqa_metrics([(gt, vqa_eval_accuracy(submitted_answer(a.text), gt["answers"])) for a, gt in pairs])


def score_textvqa(pairs: list[tuple[Answer, dict]]) -> dict:
    return _vqa_metrics([(gt, m4c_accuracy(a.text, gt["answers"])) for a, gt in pairs])


def vqa_tables(m: dict) -> list[Table]:
    rows = [["all", m["n"], m["accuracy"]]]
    rows += [[t, g["n"], g["accuracy"]] for t, g in m.get("per_answer_type", {}).items()]
    return [("VQA accuracy", ["answer type", "questions", "accuracy"], rows)]


def write_vqav2_submission(answers: list[Answer], out_dir: Path,
                           questions: list[Question] | None) -> tuple[dict[str, Path], dict]:
    """``vqav2_submission.json``: every question of ``questions`` in order, answered or ``""``
    (convert_vqav2_for_submission.py's file); only the answers when there are no questions."""
    name = "vqav2_submission.json"
    if questions is None:
        rows = [{"question_id": a.question_id, "answer": submitted_answer(a.text)} for a in answers]
        facts = {"questions": None, "answered": len(rows), "empty": 0, "answers_not_listed": 0,
                 "note": f"{name} lists only the {len(rows)} answered questions; the VQA server needs every "
                         "question: score again with --questions (LLaVA's llava_vqav2_mscoco_test2015.jsonl "
                         "for test-dev and test-standard)."}
    else:
        by_id = {key_of(a.question_id): submitted_answer(a.text) for a in answers}  # a repeated id: the last answer
        listed = {key_of(q.question_id) for q in questions}
        rows = [{"question_id": q.question_id, "answer": by_id.get(key_of(q.question_id), "")} for q in questions]
        empty = sum(key_of(q.question_id) not in by_id for q in questions)
        left_out = sum(k not in listed for k in by_id)
        note = (f"{name} lists all {len(rows)} questions of the questions file, {len(rows) - empty} answered "
                f"and {empty} with an empty answer, as the VQA server takes them.")
        if left_out:
            note += f" {left_out} answers to questions not in that file are left out."
        facts = {"questions": len(rows), "answered": len(rows) - empty, "empty": empty,
                 "answers_not_listed": left_out, "note": note}
    return {"submission": _write_json(out_dir / name, rows)}, facts


# ---- GQA -----------------------------------------------------------------------------------

def _gqa_doc(path: Path) -> dict:
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path} is a JSON {type(doc).__name__}; expected GQA's questions file {{question_id: {{...}}}}")
    return doc


def read_gqa_questions(src: Sources, bad: BadData) -> list[Question]:
    path = src.require("questions", "LLaVA's llava_gqa_testdev_balanced.jsonl or GQA's testdev_balanced_questions.json")
    if is_json_lines(path):
        return llava_questions(path, src.image_folder, bad)

    def parse(where: str, item: tuple[str, Any]) -> Question:
        qid, rec = item
        return Question(qid, _short(get(rec, "question")),
                        image_path(src.image_folder, f"{get(rec, 'imageId')}.jpg"), where)

    doc = _gqa_doc(path)
    return list(bad.records(((f"{path}, question {k!r}", (k, v)) for k, v in doc.items()), parse))


def load_gqa_truth(src: Sources, bad: BadData) -> Truth | None:
    path = src.annotations
    if path is None and src.questions is not None and not is_json_lines(src.questions):
        path = src.questions  # the official questions file holds the answers
    if path is None:
        raise DataError("GQA needs --annotations: GQA's testdev_balanced_questions.json (it holds the answers)")
    path = Path(path)
    if not path.exists():
        raise DataError(f"--annotations {path} does not exist; expected GQA's testdev_balanced_questions.json")

    def parse(where: str, item: tuple[str, Any]) -> tuple[str, dict]:
        qid, rec = item
        types = get(rec, "types", dict)
        return key_of(qid), {
            "answer": get(rec, "answer"),
            "structural": str(types.get("structural", "unknown")),
            "semantic": str(types.get("semantic", "unknown")),
            "balanced": bool(rec.get("isBalanced", True)),
        }

    doc = _gqa_doc(path)
    records = dict(bad.records(((f"{path}, question {k!r}", (k, v)) for k, v in doc.items()), parse))
    return Truth(path, records)


def score_gqa(pairs: list[tuple[Answer, dict]]) -> dict:
    # eval.py scores balanced questions only; a prediction equals the gold answer exactly
    rows = [(gt, float(gqa_prediction(a.text) == gt["answer"])) for a, gt in pairs if gt["balanced"]]
    binary = [s for gt, s in rows if gt["structural"] != "query"]
    open_ = [s for gt, s in rows if gt["structural"] == "query"]
    return {
        "n": len(rows),
        "accuracy": percent(sum(s for _, s in rows), len(rows)),
        "binary": percent(sum(binary), len(binary)),
        "open": percent(sum(open_), len(open_)),
        "not_balanced": len(pairs) - len(rows),
        "per_structural_type": grouped_accuracy((gt["structural"], s) for gt, s in rows),
        "per_semantic_type": grouped_accuracy((gt["semantic"], s) for gt, s in rows),
    }


def gqa_tables(m: dict) -> list[Table]:
    overall = [["accuracy", m["accuracy"]], ["binary", m["binary"]], ["open", m["open"]]]
    tables: list[Table] = [("GQA", ["metric", "value"], overall)]
    for key, title in (("per_structural_type", "structural type"), ("per_semantic_type", "semantic type")):
        rows = [[t, g["n"], g["accuracy"]] for t, g in m[key].items()]
        tables.append((f"Accuracy per {title}", [title, "questions", "accuracy"], rows))
    return tables


def write_gqa_predictions(answers: list[Answer], out_dir: Path,
                          questions: list[Question] | None) -> tuple[dict[str, Path], dict]:
    # convert_gqa_for_eval.py: what GQA's eval.py reads as {tier}_predictions.json
    rows = [{"questionId": a.question_id, "prediction": gqa_prediction(a.text)} for a in answers]
    return {"predictions": _write_json(out_dir / "testdev_balanced_predictions.json", rows)}, {}


# ---- TextVQA -------------------------------------------------------------------------------

def textvqa_question(prompt: str) -> str | None:
    """The question inside a TextVQA prompt, lower-cased (``eval_textvqa.py`` ``prompt_processor``);
    None where that function would fail its assertion."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            return None
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        return None
    return question.lower()


def _textvqa_key(question_id: Any, prompt: str) -> tuple[str, str] | None:
    question = textvqa_question(prompt)
    return None if question is None else (key_of(question_id), question)


def _textvqa_data(path: Path) -> list:
    return _listed(read_json(path), "data", path, "TextVQA's TextVQA_0.5.1_val.json {'data': [...]}")


def read_textvqa_questions(src: Sources, bad: BadData) -> list[Question]:
    path = src.require("questions", "LLaVA's llava_textvqa_val_v051_ocr.jsonl or TextVQA_0.5.1_val.json")
    if is_json_lines(path):
        return llava_questions(path, src.image_folder, bad)

    def parse(where: str, rec: dict) -> Question:
        image_id = get(rec, "image_id")
        # question_id is the image id, as in LLaVA's TextVQA file and eval_textvqa.py
        return Question(image_id, _short(get(rec, "question")), image_path(src.image_folder, f"{image_id}.jpg"),
                        where, {"textvqa_question_id": rec.get("question_id")})

    items = _textvqa_data(path)
    return list(bad.records(((f"{path}, data[{i}]", r) for i, r in enumerate(items)), parse))


def load_textvqa_truth(src: Sources, bad: BadData) -> Truth | None:
    path = src.annotations
    if path is None and src.questions is not None and not is_json_lines(src.questions):
        path = src.questions
    if path is None:
        raise DataError("TextVQA needs --annotations: TextVQA_0.5.1_val.json")
    path = Path(path)
    if not path.exists():
        raise DataError(f"--annotations {path} does not exist; expected TextVQA_0.5.1_val.json")

    def parse(where: str, rec: dict) -> tuple[tuple[str, str], dict]:
        key = (key_of(get(rec, "image_id")), get(rec, "question").lower())
        return key, {"answers": _human_answers(rec)}

    items = _textvqa_data(path)
    records = dict(bad.records(((f"{path}, data[{i}]", r) for i, r in enumerate(items)), parse))
    return Truth(path, records, key=_textvqa_key)


BENCHMARKS.add("vqav2", Benchmark(
    name="vqav2", title="VQAv2", max_new_tokens=16,
    read_questions=read_vqav2_questions, load_truth=load_vqav2_truth, score=score_vqav2, tables=vqa_tables,
    headline=("accuracy",), write_extras=write_vqav2_submission,
    scorer="the official VQA evaluator (GT-Vision-Lab/VQA vqaEval.py) on the answers as submitted "
           "(EvalAI processing, LLaVA's convert_vqav2_for_submission.py)",
    files_help="--questions llava_vqav2_*.jsonl or v2_OpenEnded_mscoco_*_questions.json, --image-folder "
               "(COCO images), --annotations v2_mscoco_*_annotations.json (omit for test-dev: submit "
               "vqav2_submission.json to EvalAI)",
    extra={"unscored_note": "No annotations given: submit vqav2_submission.json to the EvalAI VQA server."},
))
BENCHMARKS.add("gqa", Benchmark(
    name="gqa", title="GQA", max_new_tokens=16,
    read_questions=read_gqa_questions, load_truth=load_gqa_truth, score=score_gqa, tables=gqa_tables,
    headline=("accuracy", "binary", "open"), write_extras=write_gqa_predictions,
    scorer="GQA's eval.py on LLaVA's convert_gqa_for_eval.py predictions",
    files_help="--questions llava_gqa_testdev_balanced.jsonl or testdev_balanced_questions.json, "
               "--image-folder (GQA images), --annotations testdev_balanced_questions.json",
))
BENCHMARKS.add("textvqa", Benchmark(
    name="textvqa", title="TextVQA", max_new_tokens=16,
    read_questions=read_textvqa_questions, load_truth=load_textvqa_truth, score=score_textvqa, tables=vqa_tables,
    headline=("accuracy",),
    scorer="m4c TextVQAAccuracyEvaluator (EvalAI processing), as LLaVA's eval_textvqa.py",
    files_help="--questions llava_textvqa_val_v051_ocr.jsonl or TextVQA_0.5.1_val.json, --image-folder "
               "(train_images), --annotations TextVQA_0.5.1_val.json",
))
