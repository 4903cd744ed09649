"""Scores against the official scorers' own figures (issue 17, section 4).

Each set below is a small file set in the published layout, built to hit the places where a
scorer's answer handling matters. The expected numbers were not worked out by hand: they are
what the official code printed when it was run, outside this repository, on exactly these
files (the official code is not part of the repository):

* VQAv2: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (commit a013f00,
  the current one), under Python 2.7 as published, on results files of the raw answers and of
  the answers as LLaVA's ``scripts/convert_vqav2_for_submission.py`` submits them (EvalAI
  processing, LLaVA's ``llava/eval/m4c_evaluator.py``);
* the VQAv2 submission: LLaVA's ``convert_vqav2_for_submission.py`` on the same answers;
* MME: LLaVA's ``playground/data/eval/MME/convert_answer_to_mme.py`` (LLaVA commit 32cebc3),
  then MME's ``eval_tool/calculation.py`` (BradyFU/Awesome-Multimodal-Large-Language-Models,
  branch Evaluation, ``tools/eval_tool.zip``; scikit-learn 1.9.1).

The tests themselves never run official code; they compare this project's scorers with those
recorded figures.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

from tinyllava_edge.cli.eval import main as eval_main
from tinyllava_edge.eval import Sources, run_benchmark, score_answers
from tinyllava_edge.eval.metrics import m4c_accuracy, vqa_eval_accuracy
from tinyllava_edge.eval.vqa import submitted_answer

# ---- VQAv2 edge cases ------------------------------------------------------------------------

# (question_id, answer_type, question_type, human answers as (text, count) runs, model answer)
VQAV2_CASES = [
    (1001, "other", "whose", [("man's", 10)], "man's"),
    (1002, "other", "what is", [("it's", 6), ("its", 2), ("it is", 2)], "It's"),
    (1003, "number", "how many", [("2", 10)], "Two"),
    (1004, "number", "how many", [("2", 7), ("two", 3)], "two"),
    (1005, "other", "what is the", [("dog", 10)], "a dog"),
    (1006, "other", "what is the", [("the dog", 2), ("dog", 5), ("puppy", 3)], "dog"),
    (1007, "number", "how many", [("10,000", 4), ("10000", 3), ("many", 3)], "10,000"),
    (1008, "other", "what color is the", [("red blue", 3), ("red, blue", 3), ("red and blue", 4)], "red,blue"),
    (1009, "yes/no", "is the", [("yes", 10)], "Yes"),
    (1010, "yes/no", "is the", [("yes", 10)], "yes."),
    (1011, "yes/no", "is there a", [("no", 10)], "  no\n"),
    (1012, "other", "what is the man wearing", [("t-shirt", 5), ("shirt", 5)], "T-shirt"),
    (1013, "other", "what is the man wearing", [("t-shirt", 10)], "t-shirt"),
    (1014, "other", "what is", [("2 people", 10)], "two people"),
    (1015, "other", "what is", [("don't know", 4), ("unknown", 6)], "dont know"),
    (1016, "number", "how many", [("0", 5), ("none", 2), ("zero", 3)], "none"),
    (1017, "other", "what animal is", [("cat", 2), ("dog", 8)], "cat"),
    (1018, "number", "how many", [("3.5", 3), ("3", 7)], "3.5."),
    (1019, "other", "what color is the", [("Red", 3), ("red", 7)], "red"),
    (1020, "other", "what time", [("2:30", 6), ("2:30 pm", 4)], "2:30"),
    (1021, "other", "whose", [("children's", 5), ("kids", 5)], "children's"),
    (1022, "yes/no", "is this", [("yes", 10)], "Yes, it is."),
    (1023, "other", "what is this", [("fire hydrant", 4), ("hydrant", 6)], "the fire-hydrant"),
    (1024, "other", "what sport is", [("skiing", 10)], "skiing"),
    (1025, "yes/no", "is there a", [("no", 10)], "No"),
]
VQAV2_IMAGE_ID = 42


def _answers_file(path: Path, rows) -> Path:
    """A LLaVA answers file (model_vqa_loader.py): one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": qid, "prompt": prompt, "text": text, "answer_id": str(i),
                                        "model_id": "edge", "metadata": {}}) + "\n"
                            for i, (qid, prompt, text) in enumerate(rows)), encoding="utf-8")
    return path


def write_vqav2_edge_files(tmp: Path) -> tuple[Path, Path, Path]:
    """VQAv2's val questions and annotations files (v2_*_mscoco_val2014_*.json) for the cases,
    and a LLaVA answers file of the model answers: (questions, annotations, answers)."""
    tmp.mkdir(parents=True, exist_ok=True)
    header = {"info": {"description": "edge cases"}, "license": {"name": "-"}, "data_subtype": "val2014",
              "data_type": "mscoco"}
    questions = tmp / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({
        **header, "task_type": "Open-Ended",
        "questions": [{"image_id": VQAV2_IMAGE_ID, "question": f"Question {qid}?", "question_id": qid}
                      for qid, *_ in VQAV2_CASES]}), encoding="utf-8")
    annotations = []
    for qid, answer_type, question_type, runs, _ in VQAV2_CASES:
        texts = [t for t, n in runs for _ in range(n)]
        annotations.append({
            "question_id": qid, "image_id": VQAV2_IMAGE_ID, "question_type": question_type,
            "answer_type": answer_type, "multiple_choice_answer": max(runs, key=lambda r: r[1])[0],
            "answers": [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)],
        })
    truth = tmp / "v2_mscoco_val2014_annotations.json"
    truth.write_text(json.dumps({**header, "annotations": annotations}), encoding="utf-8")
    answers = _answers_file(tmp / "answers.jsonl", [
        (qid, f"Question {qid}?\nAnswer the question using a single word or phrase.", text)
        for qid, *_, text in VQAV2_CASES])
    return questions, truth, answers


# ---- VQAv2 test-dev submission -----------------------------------------------------------------

# LLaVA's llava_vqav2_mscoco_test2015.jsonl layout: (question_id, image id, question); answers for
# some of them only (a test-dev run answers the test-dev subset of test2015).
SUBMISSION_QUESTIONS = [(4000, 1, "What is it?"), (4001, 1, "How many cats?"), (4002, 2, "Is it day?"),
                        (4003, 3, "What color is the bus?"), (4004, 3, "Who is it?")]
SUBMISSION_ANSWERS = {4003: "The red bus.", 4001: "Two", 4004: "It's a man"}


def write_submission_files(tmp: Path) -> tuple[Path, Path]:
    """LLaVA's test2015 question file and an answers file for some of its questions: (questions, answers)."""
    questions = tmp / "llava_vqav2_mscoco_test2015.jsonl"
    questions.parent.mkdir(parents=True, exist_ok=True)
    questions.write_text("".join(json.dumps({
        "question_id": qid, "image": f"COCO_test2015_{image_id:012d}.jpg",
        "text": f"{q}\nAnswer the question using a single word or phrase.", "category": "default"}) + "\n"
        for qid, image_id, q in SUBMISSION_QUESTIONS), encoding="utf-8")
    prompts = {qid: q for qid, _, q in SUBMISSION_QUESTIONS}
    answers = _answers_file(tmp / "merge.jsonl", [
        (qid, f"{prompts[qid]}\nAnswer the question using a single word or phrase.", text)
        for qid, text in SUBMISSION_ANSWERS.items()])
    return questions, answers


# ---- MME edge cases --------------------------------------------------------------------------

# subtask -> [(image stem, [(question, ground truth, model answer) x 2])]; the answers lead with
# zero to four spaces, which decides what calculation.py's first-four-characters rule sees.
MME_CASES = {
    "existence": [("0001", [("Is there a dog in this image?", "Yes", " yes"),
                            ("Is there a cat in this image?", "No", "  no")]),
                  ("0002", [("Is there a car in this image?", "Yes", "  yes"),
                            ("Is there a bus in this image?", "No", "No")])],
    "count": [("0001", [("Are there two dogs in the image?", "Yes", "   Yes"),
                        ("Are there three dogs in the image?", "No", "no")])],
    "position": [("0001", [("Is the cat on the left of the image?", "Yes", "Yes, it is."),
                           ("Is the cat on the right of the image?", "No", " No.")])],
    "color": [("0001", [("Is the car red?", "Yes", "yes"), ("Is the car blue?", "No", " nope")])],
    "posters": [("tt0001", [("Is this movie titled Up?", "Yes", "The answer is yes"),
                            ("Is this movie titled Down?", "No", "no")])],
    "celebrity": [("tt0002", [("Is the actor inside the red box named Tom Hanks?", "Yes", "  Yes, he is"),
                              ("Is the actor inside the red box named Tom Cruise?", "No", " No")])],
    "scene": [("Places365_val_00000001", [("Is this picture captured in a beach?", "Yes", "yes"),
                                          ("Is this picture captured in a forest?", "No", "no")])],
    "landmark": [("0001", [("Is this a photo of Big Ben?", "Yes", "Yes"),
                           ("Is this a photo of the Eiffel Tower?", "No", "Yes")])],
    "artwork": [("10002", [("Is this artwork created by Titian?", "Yes", "yes"),
                           ("Is this artwork created by Monet?", "No", " not sure")])],
    "OCR": [("0001", [('Is the word in the logo "angie\'s"?', "Yes", "yes"),
                      ('Is the word in the logo "angle\'s"?', "No", "  No")])],
    "commonsense_reasoning": [("0001", [("Should I take an umbrella?", "Yes", "Yes"),
                                        ("Is it sunny?", "No", "No")])],
    "numerical_calculation": [("0001", [("Is the answer 5?", "Yes", "    yes"),
                                        ("Is the answer 6?", "No", "no")])],
    "text_translation": [("0001", [("Is it appropriate to translate the text as 'hello'?", "Yes", " Yes"),
                                   ("Is it appropriate to translate the text as 'bye'?", "No", " No")])],
    "code_reasoning": [("0020", [("Is a python code shown in the picture?", "Yes", "yes"),
                                 ("Is a c++ code shown in the picture?", "No", "  no.")])],
}
MME_NESTED = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/


def write_mme_edge_files(tmp: Path, image=None) -> tuple[Path, Path]:
    """MME_Benchmark_release_version with every subtask, and a LLaVA answers file of the model
    answers (question_id ``<subtask>/<image file>``, as in LLaVA's llava_mme.jsonl): (root, answers).
    ``image(path)`` writes an image file (the official scripts never open one)."""
    root = tmp / "MME_Benchmark_release_version"
    rows = []
    for task, images in MME_CASES.items():
        nested = task in MME_NESTED
        image_dir = root / task / "images" if nested else root / task
        qa_dir = root / task / "questions_answers_YN" if nested else root / task
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for stem, qa in images:
            name = f"{stem}.jpg"
            if image is not None:
                image(image_dir / name)
            else:
                (image_dir / name).write_bytes(b"")
            (qa_dir / f"{stem}.txt").write_text(
                "".join(f"{q} Please answer yes or no.\t{gt}\n" for q, gt, _ in qa), encoding="utf-8")
            rows += [(f"{task}/{name}", f"{q}\nAnswer the question using a single word or phrase.", text)
                     for q, _, text in qa]
    return root, _answers_file(tmp / "mme_answers.jsonl", rows)


# ---- the official figures ----------------------------------------------------------------------

# vqaEval.py's evalQA (percent, rounded to 2 places) for each case, on a results file of...
# ...the raw answers: overall 70.0, other 84.0, number 78.0, yes/no 20.0
OFFICIAL_VQA_RAW = {1001: 100.0, 1002: 100.0, 1003: 0.0, 1004: 100.0, 1005: 0.0, 1006: 100.0, 1007: 100.0,
                    1008: 100.0, 1009: 0.0, 1010: 0.0, 1011: 100.0, 1012: 100.0, 1013: 100.0, 1014: 0.0,
                    1015: 100.0, 1016: 100.0, 1017: 60.0, 1018: 90.0, 1019: 100.0, 1020: 100.0, 1021: 100.0,
                    1022: 0.0, 1023: 100.0, 1024: 100.0, 1025: 0.0}
# ...the answers as LLaVA's converter submits them: overall 74.0, other 64.0, number 98.0, yes/no 80.0
OFFICIAL_VQA_SUBMITTED = {1001: 0.0, 1002: 0.0, 1003: 100.0, 1004: 100.0, 1005: 100.0, 1006: 100.0, 1007: 100.0,
                          1008: 0.0, 1009: 100.0, 1010: 100.0, 1011: 100.0, 1012: 100.0, 1013: 0.0, 1014: 100.0,
                          1015: 100.0, 1016: 100.0, 1017: 60.0, 1018: 90.0, 1019: 100.0, 1020: 100.0, 1021: 0.0,
                          1022: 0.0, 1023: 100.0, 1024: 100.0, 1025: 100.0}
# LLaVA's m4c TextVQAAccuracyEvaluator on the raw answers (what this project reported for VQAv2 before)
OFFICIAL_M4C_ACCURACY = 90.0


def _humans(runs):
    return [t for t, n in runs for _ in range(n)]


def test_vqa_eval_accuracy_matches_vqaeval_per_question():
    for qid, _, _, runs, text in VQAV2_CASES:
        assert round(100 * vqa_eval_accuracy(text, _humans(runs)), 2) == OFFICIAL_VQA_RAW[qid], qid
        assert round(100 * vqa_eval_accuracy(submitted_answer(text), _humans(runs)), 2) == \
            OFFICIAL_VQA_SUBMITTED[qid], qid
    m4c = sum(m4c_accuracy(text, _humans(runs)) for *_, runs, text in VQAV2_CASES) / len(VQAV2_CASES)
    assert 100 * m4c == pytest.approx(OFFICIAL_M4C_ACCURACY)


def test_vqav2_score_is_the_servers(tmp_path):
    questions, annotations, answers = write_vqav2_edge_files(tmp_path)
    results = score_answers("vqav2", answers, Sources(questions=questions, annotations=annotations), tmp_path / "out")
    m = results["metrics"]
    assert round(m["accuracy"], 2) == 74.0   # vqaEval.py on the submission; m4c said 90.0, the raw answers 70.0
    assert {t: round(g["accuracy"], 2) for t, g in m["per_answer_type"].items()} == \
        {"other": 64.0, "number": 98.0, "yes/no": 80.0}
    assert m["per_question_type"]["how many"]["n"] == 5
    assert "vqaEval.py" in results["scorer"]
    assert "Scored as the official VQA evaluator" in (tmp_path / "out" / "results.md").read_text()
    # the submission written beside it is the file the evaluator scored: every question, answered
    submission = json.loads((tmp_path / "out" / "vqav2_submission.json").read_text())
    assert [r["question_id"] for r in submission] == [c[0] for c in VQAV2_CASES]
    assert {r["question_id"]: r["answer"] for r in submission}[1002] == "it 's"


def test_cli_names_the_scorer(tmp_path, capsys):
    questions, annotations, answers = write_vqav2_edge_files(tmp_path)
    assert eval_main(["--benchmark", "vqav2", "--score-only", "--answers", str(answers), "--questions", str(questions),
                      "--annotations", str(annotations), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy 74.00 (scored as the official VQA evaluator (GT-Vision-Lab/VQA vqaEval.py)" in printed
    assert "lists all 25 questions" in printed


# LLaVA's convert_vqav2_for_submission.py output for write_submission_files, verbatim
OFFICIAL_SUBMISSION = [{"question_id": 4000, "answer": ""}, {"question_id": 4001, "answer": "2"},
                       {"question_id": 4002, "answer": ""}, {"question_id": 4003, "answer": "red bus"},
                       {"question_id": 4004, "answer": "it 's man"}]


def test_vqav2_submission_lists_every_question(tmp_path):
    questions, answers = write_submission_files(tmp_path)
    results = score_answers("vqav2", answers, Sources(questions=questions), tmp_path / "out")
    assert results["metrics"] is None
    assert json.loads((tmp_path / "out" / "vqav2_submission.json").read_text()) == OFFICIAL_SUBMISSION
    assert results["submission"]["questions"] == 5 and results["submission"]["empty"] == 2
    assert "all 5 questions" in (tmp_path / "out" / "results.md").read_text()

    # without a questions file only the answers can be listed, and the results say so
    results = score_answers("vqav2", answers, Sources(), tmp_path / "bare")
    assert len(json.loads((tmp_path / "bare" / "vqav2_submission.json").read_text())) == 3
    assert "--questions" in results["submission"]["note"]

    # a run asked a part of the file (--limit): the file still lists every question
    images = tmp_path / "test2015"
    images.mkdir()
    for _, image_id, _ in SUBMISSION_QUESTIONS:
        Image.new("RGB", (8, 8)).save(images / f"COCO_test2015_{image_id:012d}.jpg")

    class Scripted:
        model_id, batch_size = "scripted", 2

        def predict(self, requests):
            return ["Two" for _ in requests]

    results = run_benchmark("vqav2", Scripted(), Sources(questions=questions, image_folder=images), tmp_path / "run",
                            limit=2, progress=False)
    rows = json.loads((tmp_path / "run" / "vqav2_submission.json").read_text())
    assert rows == [{"question_id": 4000, "answer": "2"}, {"question_id": 4001, "answer": "2"},
                    {"question_id": 4002, "answer": ""}, {"question_id": 4003, "answer": ""},
                    {"question_id": 4004, "answer": ""}]
    assert results["submission"]["answered"] == 2


# calculation.py's printout for write_mme_edge_files (after convert_answer_to_mme.py); the project
# stripped answers before and gave perception 1700.0, cognition 800.0
OFFICIAL_MME = {"perception": 1325.0, "cognition": 650.0, "subtasks": {
    "existence": 125.0, "count": 50.0, "position": 200.0, "color": 200.0, "posters": 50.0, "celebrity": 50.0,
    "scene": 200.0, "landmark": 50.0, "artwork": 200.0, "OCR": 200.0, "commonsense_reasoning": 200.0,
    "numerical_calculation": 50.0, "text_translation": 200.0, "code_reasoning": 200.0}}


def test_mme_scored_as_calculation_py(tmp_path):
    root, answers = write_mme_edge_files(tmp_path)
    results = score_answers("mme", answers, Sources(image_folder=root), tmp_path / "out")
    m = results["metrics"]
    assert m["perception"] == pytest.approx(OFFICIAL_MME["perception"])
    assert m["cognition"] == pytest.approx(OFFICIAL_MME["cognition"])
    assert {t: round(s["score"], 6) for t, s in m["subtasks"].items()} == OFFICIAL_MME["subtasks"]
    assert m["missing_subtasks"] == []
    assert "calculation.py" in results["scorer"]
