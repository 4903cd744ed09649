"""POPE and MME: yes/no questions.

POPE (github.com/AoiDragon/POPE ``output/coco``): ``coco_pope_{random,popular,adversarial}.json``
are JSON lines ``{"question_id", "image", "text", "label": "yes"|"no"}``; LLaVA's
``llava_pope_test.jsonl`` has the three in one file with a ``category`` and no label, and its
``eval_pope.py`` pairs each category's answers *in file order* with the lines of
``<annotation dir>/coco_pope_<category>.json``. Both are read: labels in the questions file
are used directly; otherwise ``--annotations`` names that directory. The prompt is the text as
given; answers are read as ``eval_pope.py`` reads them (:func:`metrics.pope_parse`).

MME (``MME_Benchmark_release_version/<subtask>/``): per image a ``<stem>.txt`` of two lines
``question<TAB>Yes|No``, with the image beside it or, for artwork / celebrity / landmark /
posters / scene, in ``images/`` and the text files in ``questions_answers_YN/``. The questions
are read from that directory (or from LLaVA's ``llava_mme.jsonl``, ``question_id``
``"<subtask>/<image file>"``); as in LLaVA's file, "Please answer yes or no." becomes
``"\\nAnswer the question using a single word or phrase."``. Answers are matched to the ground
truth by subtask, image stem and question text (``convert_answer_to_mme.py``) and scored as
MME's ``eval_tool/calculation.py`` does: each answer read from its first four characters, not
stripped (:func:`metrics.mme_parse`); acc, acc+ (both questions of an image right) and score =
acc + acc+ per subtask, summed over the perception and the cognition subtasks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from tinyllava_edge.errors import DataError
from tinyllava_edge.eval.benchmark import BENCHMARKS, Benchmark, Table, Truth
from tinyllava_edge.eval.formats import (
    SHORT_ANSWER_PROMPT, Answer, BadData, Question, RecordError, Sources, iter_jsonl, key_of,
    llava_questions,
)
from tinyllava_edge.eval.metrics import binary_metrics, mean_of, mme_parse, mme_subtask, pope_parse

# ---- POPE ----------------------------------------------------------------------------------

_POPE_FILE = re.compile(r"coco_pope_(\w+)\.json$")  # eval_pope.py: file[10:-5]


def _pope_category(path: Path) -> str:
    match = _POPE_FILE.search(Path(path).name)
    return match.group(1) if match else "all"


def read_pope_questions(src: Sources, bad: BadData) -> list[Question]:
    path = src.require("questions", "a POPE questions file (coco_pope_<category>.json or llava_pope_test.jsonl)")
    default = _pope_category(path)
    questions = llava_questions(path, src.image_folder, bad, keep=("category", "label"))
    # Without a category field, the file name gives it (POPE ships one file per category).
    return [q if "category" in q.metadata else Question(q.question_id, q.prompt, q.image, q.where,
                                                        {**q.metadata, "category": default})
            for q in questions]


def _label(value: Any) -> str:
    if value not in ("yes", "no"):
        raise RecordError(f"label is {value!r}; expected 'yes' or 'no'")
    return value


def load_pope_truth(src: Sources, bad: BadData) -> Truth | None:
    questions = read_pope_questions(src, bad)
    if src.annotations is None:
        def parse(where: str, q: Question) -> tuple[str, dict]:
            if "label" not in q.metadata:
                raise RecordError("has no 'label'; give --annotations, the directory of coco_pope_<category>.json")
            return key_of(q.question_id), {"label": _label(q.metadata["label"]),
                                           "category": str(q.metadata["category"])}

        return Truth(src.questions, dict(bad.records(((q.where, q) for q in questions), parse)))

    folder = src.require("annotations", "the directory of POPE's coco_pope_<category>.json label files")
    if not folder.is_dir():
        raise DataError(f"--annotations {folder} is a file; for POPE give the directory of coco_pope_<category>.json")
    by_category: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_category[str(q.metadata["category"])].append(q)
    records: dict[str, dict] = {}
    for category, qs in by_category.items():
        label_file = folder / f"coco_pope_{category}.json"
        if not label_file.is_file():
            raise DataError(f"{label_file} does not exist; POPE labels for category {category!r} are read from it")
        labels = list(bad.records(iter_jsonl(label_file, bad), lambda w, r: _label(r.get("label"))))
        if len(labels) != len(qs):
            raise DataError(
                f"{label_file} has {len(labels)} labels for {len(qs)} {category!r} questions in {src.questions}; "
                "eval_pope.py pairs them one to one, in order"
            )
        for q, label in zip(qs, labels):
            records[key_of(q.question_id)] = {"label": label, "category": category}
    return Truth(folder, records)


def score_pope(pairs: list[tuple[Answer, dict]]) -> dict:
    per_category: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for a, gt in pairs:
        preds, labels = per_category[gt["category"]]
        preds.append(pope_parse(a.text))
        labels.append(gt["label"])
    categories = {c: binary_metrics(p, l) for c, (p, l) in sorted(per_category.items())}
    every = binary_metrics([pope_parse(a.text) for a, _ in pairs], [gt["label"] for _, gt in pairs])
    return {**every, "per_category": categories, "f1_mean_over_categories": mean_of(categories, "f1")}


def pope_tables(m: dict) -> list[Table]:
    keys = ("n", "accuracy", "precision", "recall", "f1", "yes_ratio")
    rows = [[c, *(g[k] for k in keys)] for c, g in m["per_category"].items()]
    rows.append(["all", *(m[k] for k in keys)])
    return [("POPE", ["category", "questions", "accuracy", "precision", "recall", "F1", "yes ratio"], rows)]


# ---- MME -----------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_MME_SUFFIX = re.compile(r"\s*Please answer yes or no\.\s*$")
_IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")


def mme_question(text: str) -> str:
    """The question without its answer-format line, whitespace collapsed: what an MME question
    and an answer's prompt are matched by."""
    text = text.replace(SHORT_ANSWER_PROMPT, "")
    return " ".join(_MME_SUFFIX.sub("", text).split())


def _mme_entries(root: Path, bad: BadData) -> list[tuple[str, Path, str, str, str]]:
    """(subtask, image path, question, answer "yes"/"no", where) for every line of the release."""
    entries = []
    known = MME_PERCEPTION + MME_COGNITION
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name in known):
        nested = (task_dir / "images").is_dir()
        qa_dir = task_dir / "questions_answers_YN" if nested else task_dir
        image_dir = task_dir / "images" if nested else task_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            image = next((image_dir / (txt.stem + e) for e in _IMAGE_EXTENSIONS if (image_dir / (txt.stem + e)).exists()),
                         image_dir / (txt.stem + ".jpg"))
            try:
                lines = txt.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"cannot read {txt}: {err}") from None
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{txt}, line {n}"
                parts = line.strip().split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    bad.report(where, f"is {line.strip()!r:.80}; expected 'question<TAB>Yes' or 'question<TAB>No'")
                    continue
                entries.append((task_dir.name, image, parts[0], parts[1].strip().lower(), where))
    if not entries:
        raise DataError(f"{root} holds no MME question files (<subtask>/*.txt or <subtask>/questions_answers_YN/*.txt "
                        f"for the subtasks {', '.join(known)})")
    return entries


def _mme_root(src: Sources) -> Path:
    root = src.annotations or src.image_folder
    if root is None:
        raise DataError("MME needs --image-folder (or --annotations): the MME_Benchmark_release_version directory")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; expected MME_Benchmark_release_version")
    return root


def read_mme_questions(src: Sources, bad: BadData) -> list[Question]:
    if src.questions is not None:
        return llava_questions(src.require("questions", "LLaVA's llava_mme.jsonl"), src.image_folder, bad)
    return [
        Question(f"{task}/{image.name}", f"{mme_question(question)}\n{SHORT_ANSWER_PROMPT}", image, where,
                 {"category": task})
        for task, image, question, _, where in _mme_entries(_mme_root(src), bad)
    ]


def _mme_key(question_id: Any, prompt: str) -> tuple[str, str, str]:
    qid = str(question_id)
    return qid.split("/")[0], Path(qid.split("/")[-1]).stem, mme_question(prompt)


def load_mme_truth(src: Sources, bad: BadData) -> Truth:
    root = _mme_root(src)
    records = {
        (task, image.stem, mme_question(question)): {"answer": answer, "category": task, "image": f"{task}/{image.stem}"}
        for task, image, question, answer, _ in _mme_entries(root, bad)
    }
    return Truth(root, records, key=_mme_key)


def score_mme(pairs: list[tuple[Answer, dict]]) -> dict:
    rows: dict[str, list] = defaultdict(list)
    for a, gt in pairs:
        rows[gt["category"]].append((gt["image"], gt["answer"], mme_parse(a.text)))
    subtasks = {t: mme_subtask(r) for t, r in sorted(rows.items())}
    perception = sum(m["score"] for t, m in subtasks.items() if t in MME_PERCEPTION)
    cognition = sum(m["score"] for t, m in subtasks.items() if t in MME_COGNITION)
    return {
        "n": len(pairs), "perception": perception, "cognition": cognition, "total": perception + cognition,
        "subtasks": subtasks,
        "missing_subtasks": [t for t in MME_PERCEPTION + MME_COGNITION if t not in subtasks],
    }


def mme_tables(m: dict) -> list[Table]:
    order = [t for t in MME_PERCEPTION + MME_COGNITION if t in m["subtasks"]]
    order += [t for t in m["subtasks"] if t not in order]
    rows = [[t, "perception" if t in MME_PERCEPTION else "cognition" if t in MME_COGNITION else "-",
             *(m["subtasks"][t][k] for k in ("images", "questions", "acc", "acc_plus", "score"))] for t in order]
    totals = [["perception", m["perception"]], ["cognition", m["cognition"]], ["total", m["total"]]]
    return [("MME per subtask", ["subtask", "group", "images", "questions", "acc", "acc+", "score"], rows),
            ("MME totals (sum of subtask scores)", ["group", "score"], totals)]


BENCHMARKS.add("pope", Benchmark(
    name="pope", title="POPE", max_new_tokens=16,
    read_questions=read_pope_questions, load_truth=load_pope_truth, score=score_pope, tables=pope_tables,
    headline=("accuracy", "f1", "yes_ratio"),
    scorer="LLaVA's eval_pope.py",
    files_help="--questions coco_pope_<category>.json (with labels) or llava_pope_test.jsonl, --image-folder "
               "(COCO val2014), --annotations DIR of coco_pope_<category>.json when the questions have no labels",
))
BENCHMARKS.add("mme", Benchmark(
    name="mme", title="MME", max_new_tokens=16,
    read_questions=read_mme_questions, load_truth=load_mme_truth, score=score_mme, tables=mme_tables,
    headline=("perception", "cognition"),
    scorer="MME's eval_tool/calculation.py on LLaVA's convert_answer_to_mme.py files (answers not stripped)",
    files_help="--image-folder MME_Benchmark_release_version (questions and answers are read from it); "
               "optionally --questions llava_mme.jsonl",
))
