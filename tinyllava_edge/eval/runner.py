"""Running a benchmark end to end, or scoring an answers file that exists.

:func:`run_benchmark`: read the questions -> check each has an image file and ground truth
(bad ones raise, or are skipped and counted) -> answer with a predictor in batches, showing a
progress bar and writing ``answers.jsonl`` as it goes -> score -> write ``results.json``,
``results.md`` and the benchmark's submission files. :func:`score_answers` does the last two
steps for an answers file (ours, LLaVA's or TinyLLaVA_Factory's).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tinyllava_edge.errors import DataError, TinyLlavaError
from tinyllava_edge.eval.benchmark import Benchmark, Truth, get_benchmark
from tinyllava_edge.eval.formats import (
    Answer, BadData, Question, Sources, answer_record, read_answers, write_answer,
)
from tinyllava_edge.eval.predictor import Predictor, Request
from tinyllava_edge.eval.report import results_markdown

ANSWERS_FILE = "answers.jsonl"
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"


def run_benchmark(benchmark: str | Benchmark, predictor: Predictor | Callable[[], Predictor], sources: Sources,
                  out_dir: str | Path, *, limit: int | None = None, skip_bad: bool = False, progress: bool = True,
                  settings: dict | None = None) -> dict:
    """Answer a benchmark's questions with ``predictor`` and score them; returns the results dict.

    ``predictor`` may also be a function that makes one: it is called once the files have been
    read and checked, so bad data fails before a model loads.
    ``limit`` asks only the first N questions; ``skip_bad`` skips and counts bad records
    (broken lines, missing images, questions without ground truth) instead of raising
    :class:`~tinyllava_edge.eval.formats.BadRecordError`; ``settings`` is recorded as given.
    """
    from tqdm import tqdm

    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    if limit is not None and limit < 1:
        raise TinyLlavaError(f"limit must be at least 1, got {limit}")
    out = _out_dir(out_dir)
    bad = BadData(skip_bad)
    started = time.perf_counter()
    read = bench.read_questions(sources, bad)
    n_read = len(read)
    questions = read[:limit] if limit is not None else read
    truth = bench.load_truth(sources, bad)
    # Every check before the model runs, so bad data fails in seconds, not after the predictions.
    if truth is not None:
        questions = [q for q in questions if _has_truth(q, truth, bad)]
    readable: dict[Path, bool] = {}
    questions = [q for q in questions if q.image is None or _image_ok(q, bad, readable)]
    if not questions:
        raise DataError(f"no questions left to ask from {sources.questions or sources.image_folder}")
    if not isinstance(predictor, Predictor):
        predictor = predictor()

    answers: list[Answer] = []
    predict_start = time.perf_counter()
    answers_path = out / ANSWERS_FILE
    with open(answers_path, "w", encoding="utf-8") as handle, \
            tqdm(total=len(questions), desc=bench.name, unit="q", disable=not progress) as bar:
        step = max(1, int(getattr(predictor, "batch_size", 1)))
        for start in range(0, len(questions), step):
            chunk = questions[start:start + step]
            texts = predictor.predict([Request(q.image, q.prompt) for q in chunk])
            if len(texts) != len(chunk):
                raise TinyLlavaError(f"predictor {predictor.model_id} gave {len(texts)} answers for {len(chunk)} questions")
            for q, text in zip(chunk, texts):
                record = answer_record(q, text, predictor.model_id)
                write_answer(handle, record)
                answers.append(Answer(q.question_id, record["prompt"], text, q.where, q.metadata))
            handle.flush()  # a long run that stops keeps what it answered
            bar.update(len(chunk))
    predict_seconds = time.perf_counter() - predict_start

    results = _finish(bench, answers, truth, bad, out, model=predictor.model_id, sources=sources, questions=read,
                      answers_path=answers_path, counts={"questions": n_read, "asked": len(questions)},
                      settings={**(settings or {}), "limit": limit, "decoding": "greedy"})
    results["seconds"] = {"predict": predict_seconds, "total": time.perf_counter() - started,
                          "per_question": predict_seconds / len(questions)}
    return _write(bench, results, out)


def score_answers(benchmark: str | Benchmark, answers_file: str | Path, sources: Sources, out_dir: str | Path, *,
                  skip_bad: bool = False) -> dict:
    """Score an answers file (LLaVA format) against the benchmark's ground truth.

    With ``sources.questions``, the benchmark's submission file lists every question of that
    file (VQAv2: give LLaVA's llava_vqav2_mscoco_test2015.jsonl for the server's test phases).
    """
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    answers_path = Path(answers_file)
    if not answers_path.is_file():
        raise DataError(f"answers file {answers_path} does not exist; expected LLaVA answers JSON lines")
    out = _out_dir(out_dir)
    bad = BadData(skip_bad)
    started = time.perf_counter()
    answers = read_answers(answers_path, bad)
    if not answers:
        raise DataError(f"{answers_path} holds no answers")
    truth = bench.load_truth(sources, bad)
    # the questions file, when given, is what a submission file lists in full
    questions = None
    if bench.write_extras is not None and sources.questions is not None:
        questions = bench.read_questions(sources, bad)
    results = _finish(bench, answers, truth, bad, out, model=None, sources=sources, questions=questions,
                      answers_path=answers_path, counts={}, settings={"score_only": True})
    results["seconds"] = {"total": time.perf_counter() - started}
    return _write(bench, results, out)


# ---- steps -----------------------------------------------------------------------------------

def _out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; expected a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _recorded_prompt(q: Question) -> str:
    return q.answer_prompt if q.answer_prompt is not None else q.prompt


def _has_truth(q: Question, truth: Truth, bad: BadData) -> bool:
    if truth.find(q.question_id, _recorded_prompt(q)) is not None:
        return True
    bad.report(q.where, f"question_id {q.question_id!r} has no ground truth in {truth.source}")
    return False


def _image_ok(q: Question, bad: BadData, readable: dict[Path, bool]) -> bool:
    from PIL import Image, UnidentifiedImageError

    path = Path(q.image)
    if path not in readable:
        problem = None
        if not path.is_file():
            problem = f"image file {path} does not exist"
        else:
            try:
                with Image.open(path):  # reads the header only
                    pass
            except (OSError, UnidentifiedImageError, ValueError) as err:
                problem = f"image file {path} cannot be read as an image ({err})"
        readable[path] = problem is None
        if problem:
            bad.report(q.where, problem)
            return False
    elif not readable[path]:
        bad.report(q.where, f"image file {path} cannot be used (reported above)")
    return readable[path]


def _pairs(answers: list[Answer], truth: Truth, bad: BadData) -> list[tuple[Answer, Any]]:
    pairs, first = [], {}
    for a in answers:
        key = truth.key(a.question_id, a.prompt)
        gt = truth.find(a.question_id, a.prompt)
        if gt is None:
            bad.report(a.where, f"question_id {a.question_id!r} has no ground truth in {truth.source}")
        elif key in first:
            bad.report(a.where, f"question_id {a.question_id!r} is answered twice (first at {first[key]})")
        else:
            first[key] = a.where
            pairs.append((a, gt))
    return pairs


def _finish(bench: Benchmark, answers: list[Answer], truth: Truth | None, bad: BadData, out: Path, *,
            model: str | None, sources: Sources, questions: list[Question] | None, answers_path: Path, counts: dict,
            settings: dict) -> dict:
    metrics, note, pairs = None, None, []
    if truth is None or bench.score is None:
        note = bench.extra.get("unscored_note")
    else:
        pairs = _pairs(answers, truth, bad)
        metrics = bench.score(pairs)
    extras, submission = bench.write_extras(answers, out, questions) if bench.write_extras else ({}, None)
    files = {"answers": answers_path, "results": out / RESULTS_FILE, "markdown": out / MARKDOWN_FILE, **extras}
    return {
        "benchmark": bench.name,
        "title": bench.title,
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": {k: (str(v) if v is not None else None) for k, v in vars(sources).items()},
        "ground_truth": str(truth.source) if truth is not None else None,
        "settings": settings,
        "counts": {**counts, "answers": len(answers), "scored": len(pairs)},
        "skipped": bad.to_dict(),
        "units": "percent",
        "scorer": bench.scorer,
        "metrics": metrics,
        "note": note,
        "submission": submission or None,
        "files": {k: str(v) for k, v in files.items()},
    }


def _write(bench: Benchmark, results: dict, out: Path) -> dict:
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / MARKDOWN_FILE).write_text(results_markdown(bench, results), encoding="utf-8")
    return results
