"""ScienceQA-IMG: multiple choice, answered with the option's letter.

Ground truth is ScienceQA's own ``problems.json`` (``{pid: {"question", "choices", "answer":
index, "hint", "image": "image.png" | null, "subject", ...}}``) with ``pid_splits.json``
(``{"test": [pid, ...], ...}``); ``--annotations`` names their directory (or problems.json).
Images are ``<image folder>/<pid>/image.png`` (ScienceQA's ``images/test``).

Questions come from LLaVA's ``llava_test_CQM-A.json`` (``[{"id", "image", "conversations"}]``)
when ``--questions`` is given, else are built from problems.json as LLaVA's
``convert_sqa_to_llava.py`` builds that file (format ``CQM-A``): ``Context: <hint or N/A>\\n
Question: <q>\\nOptions: (A) <c0> (B) <c1> ...``. Built questions are the split's problems with
an image (ScienceQA-IMG). As TinyLLaVA_Factory's ``model_vqa_science.py --single-pred-prompt``,
the prompt gets ``"\\nAnswer with the option's letter from the given choices directly."`` and
the answers file records ``"<image>\\n" + prompt`` for questions with an image.

Scored as ``eval_science_qa.py``: the letter is read by :func:`metrics.scienceqa_letter`; "IMG
accuracy" counts problems with an image. Unlike that script, problems of the split without an
answer are not counted as wrong (so ``--limit`` runs score what they asked); they are reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
from tinyllava_edge.errors import DataError
from tinyllava_edge.eval.benchmark import BENCHMARKS, Benchmark, Table, Truth
from tinyllava_edge.eval.formats import (
    Answer, BadData, Question, RecordError, Sources, get, image_path, key_of, read_json,
)
from tinyllava_edge.eval.metrics import (
    SCIENCEQA_OPTIONS, grouped_accuracy, percent, scienceqa_choice, scienceqa_letter,
)

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def _base_dir(src: Sources) -> Path:
    path = src.require("annotations", "the ScienceQA directory holding problems.json and pid_splits.json")
    return path.parent if path.is_file() else path


def _problems(src: Sources) -> tuple[Path, dict, list[str]]:
    base = _base_dir(src)
    problems_file, splits_file = base / "problems.json", base / "pid_splits.json"
    for f in (problems_file, splits_file):
        if not f.is_file():
            raise DataError(f"{f} does not exist; ScienceQA needs problems.json and pid_splits.json side by side")
    problems, splits = read_json(problems_file), read_json(splits_file)
    if not isinstance(problems, dict):
        raise DataError(f"{problems_file} is a JSON {type(problems).__name__}; expected {{pid: problem}}")
    if not isinstance(splits, dict) or not isinstance(splits.get(src.split), list):
        known = ", ".join(sorted(splits)) if isinstance(splits, dict) else "none"
        raise DataError(f"{splits_file} has no split {src.split!r} (splits: {known})")
    return problems_file, problems, [str(p) for p in splits[src.split]]


def cqm_prompt(problem: dict) -> str:
    """LLaVA's CQM-A test prompt for one problem (convert_sqa_to_llava_base_prompt.py,
    ``create_one_example_chatbot`` with ``use_caption=False``, ``test_example=False``)."""
    context = " ".join([str(problem.get("hint") or ""), ""]).strip() or "N/A"
    choices = get(problem, "choices", list)
    if not 2 <= len(choices) <= len(SCIENCEQA_OPTIONS):
        raise RecordError(f"has {len(choices)} choices; expected 2 to {len(SCIENCEQA_OPTIONS)}")
    choice = " ".join(f"({o}) {c}" for o, c in zip(SCIENCEQA_OPTIONS, choices))
    text = f"Context: {context}\nQuestion: {get(problem, 'question')}\nOptions: {choice}\n"
    return text.replace("  ", " ").strip()


def _question(pid: str, question: str, image: Path | None, where: str, subject: Any = None) -> Question:
    prompt = f"{question}\n{SINGLE_PRED_PROMPT}"
    return Question(pid, prompt, image, where, {"subject": subject} if subject else {},
                    answer_prompt=f"{DEFAULT_IMAGE_TOKEN}\n{prompt}" if image is not None else prompt)


def read_scienceqa_questions(src: Sources, bad: BadData) -> list[Question]:
    if src.questions is not None:
        return _llava_questions(src, bad)
    problems_file, problems, pids = _problems(src)

    def parse(where: str, pid: str) -> Question | None:
        if pid not in problems:
            raise RecordError(f"pid {pid!r} of split {src.split!r} is not in problems.json")
        problem = problems[pid]
        if not isinstance(problem, dict) or problem.get("image") is None:
            return None  # ScienceQA-IMG: only problems with an image
        image = image_path(src.image_folder, f"{pid}/{problem['image']}")
        return _question(pid, cqm_prompt(problem), image, where, problem.get("subject"))

    items = ((f"{problems_file}, problem {pid!r}", pid) for pid in pids)
    return [q for q in bad.records(items, parse) if q is not None]


def _llava_questions(src: Sources, bad: BadData) -> list[Question]:
    path = src.require("questions", "LLaVA's llava_test_CQM-A.json")
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path} is a JSON {type(records).__name__}; expected LLaVA's list of {{'id', 'conversations'}}")

    def parse(where: str, rec: dict) -> Question:
        conversations = get(rec, "conversations", list)
        if not conversations or not isinstance(conversations[0], dict):
            raise RecordError("has no conversations[0]")
        question = get(conversations[0], "value").replace(DEFAULT_IMAGE_TOKEN, "").strip()
        image = rec.get("image")
        return _question(key_of(get(rec, "id", (str, int))), question,
                         image_path(src.image_folder, image) if isinstance(image, str) else None, where)

    return list(bad.records(((f"{path}, record {i}", r) for i, r in enumerate(records)), parse))


def load_scienceqa_truth(src: Sources, bad: BadData) -> Truth:
    problems_file, problems, pids = _problems(src)

    def parse(where: str, pid: str) -> tuple[str, dict]:
        problem = problems.get(pid)
        if not isinstance(problem, dict):
            raise RecordError(f"pid {pid!r} of split {src.split!r} is not in problems.json")
        return pid, {"answer": get(problem, "answer", int), "n_choices": len(get(problem, "choices", list)),
                     "has_image": problem.get("image") is not None, "subject": str(problem.get("subject", "unknown"))}

    records = dict(bad.records(((f"{problems_file}, problem {pid!r}", pid) for pid in pids), parse))
    return Truth(problems_file, records)


def score_scienceqa(pairs: list[tuple[Answer, dict]]) -> dict:
    rows = [(gt, float(scienceqa_choice(a.text, gt["n_choices"]) == gt["answer"]), a) for a, gt in pairs]
    img = [s for gt, s, _ in rows if gt["has_image"]]
    return {
        "n": len(rows),
        "accuracy": percent(sum(s for _, s, _ in rows), len(rows)),
        "n_img": len(img),
        "img_accuracy": percent(sum(img), len(img)),
        "unparsed": sum(scienceqa_letter(a.text) == "FAILED" for _, _, a in rows),
        "per_subject": grouped_accuracy((gt["subject"], s) for gt, s, _ in rows),
    }


def scienceqa_tables(m: dict) -> list[Table]:
    rows = [["IMG (with image)", m["n_img"], m["img_accuracy"]], ["all answered", m["n"], m["accuracy"]]]
    rows += [[f"subject: {s}", g["n"], g["accuracy"]] for s, g in m["per_subject"].items()]
    return [("ScienceQA", ["subset", "questions", "accuracy"], rows),
            ("Answers", ["no option letter found"], [[m["unparsed"]]])]


BENCHMARKS.add("scienceqa", Benchmark(
    name="scienceqa", title="ScienceQA-IMG", max_new_tokens=16,
    read_questions=read_scienceqa_questions, load_truth=load_scienceqa_truth, score=score_scienceqa,
    tables=scienceqa_tables, headline=("img_accuracy", "accuracy"),
    files_help="--annotations DIR with problems.json + pid_splits.json, --image-folder images/test, "
               "optionally --questions llava_test_CQM-A.json, --split (default test)",
    scorer="LLaVA's eval_science_qa.py",
))
