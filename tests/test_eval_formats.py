"""Each benchmark's published file formats, read, answered by a scripted predictor and scored.

The fixtures are tiny files in each exact format (keys and layout of the official releases and
of LLaVA's eval.zip); the expected numbers are worked out by hand in the comments.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

from tinyllava_edge.errors import DataError
from tinyllava_edge.eval import (
    BENCHMARKS, BadRecordError, Sources, get_benchmark, run_benchmark, score_answers,
)

SHORT = "\nAnswer the question using a single word or phrase."


class ScriptedPredictor:
    """Answers from a {first line of the question: answer} table (a Predictor)."""

    model_id = "scripted"

    def __init__(self, answers, batch_size=2):
        self.answers = answers
        self.batch_size = batch_size
        self.seen = []

    def predict(self, requests):
        self.seen += list(requests)
        return [self.answers.get(question.split("\n")[0], "") for _, question in requests]


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _vqa_answers(*counts):
    """VQAv2 annotation answers: [("2", 3), ("3", 7)] -> ten {"answer", "answer_confidence", "answer_id"}."""
    texts = [t for t, n in counts for _ in range(n)]
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


# ---- fixtures, one per benchmark -----------------------------------------------------------

def vqav2_fixture(tmp: Path):
    images = tmp / "val2014"
    for image_id in (42, 7):
        _image(images / f"COCO_val2014_{image_id:012d}.jpg")
    questions = _json(tmp / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "questions": [
            {"image_id": 42, "question": "How many dogs are there?", "question_id": 420},
            {"image_id": 42, "question": "What color is the cat?", "question_id": 421},
            {"image_id": 7, "question": "Is it sunny?", "question_id": 70},
        ]})
    annotations = _json(tmp / "v2_mscoco_val2014_annotations.json", {"info": {}, "license": {}, "annotations": [
        {"question_id": 420, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "3", "answers": _vqa_answers(("2", 3), ("3", 7))},
        {"question_id": 421, "image_id": 42, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "black", "answers": _vqa_answers(("white", 1), ("black", 9))},
        {"question_id": 70, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "yes", "answers": _vqa_answers(("yes", 10))},
    ]})
    answers = {"How many dogs are there?": "Two", "What color is the cat?": "White.", "Is it sunny?": "Yes"}
    # 420: "two" -> "2", 3 of 10 humans -> 0.9; 421: 1 of 10 -> 0.3; 70: 1.0
    expected = {"accuracy": (0.9 + 0.3 + 1.0) / 3 * 100,
                "per_answer_type": {"number": {"accuracy": 90.0}, "other": {"accuracy": 30.0},
                                    "yes/no": {"accuracy": 100.0}}}
    return Sources(questions=questions, image_folder=images, annotations=annotations), answers, expected


def gqa_fixture(tmp: Path):
    images = tmp / "images"
    for name in ("n1", "n2"):
        _image(images / f"{name}.jpg")

    def q(image, question, answer, structural, semantic, balanced=True):
        return {"semantic": [], "entailed": [], "equivalent": [], "question": question, "imageId": image,
                "isBalanced": balanced, "groups": {"global": None, "local": "10c-cup_color"},
                "answer": answer, "semanticStr": "", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                "types": {"detailed": "verifyAttr", "semantic": semantic, "structural": structural},
                "fullAnswer": f"The answer is {answer}."}

    questions = _json(tmp / "testdev_balanced_questions.json", {
        "201": q("n1", "Is the cup red?", "yes", "verify", "attr"),
        "202": q("n1", "What is under the cup?", "table", "query", "rel"),
        "203": q("n2", "Is it day?", "no", "verify", "global", balanced=False),
    })
    answers = {"Is the cup red?": "Yes.", "What is under the cup?": "chair", "Is it day?": "no"}
    # balanced only: 201 right (binary), 202 wrong (open); 203 is not balanced
    expected = {"accuracy": 50.0, "binary": 100.0, "open": 0.0, "not_balanced": 1, "n": 2}
    return Sources(questions=questions, image_folder=images), answers, expected


def textvqa_fixture(tmp: Path):
    images = tmp / "train_images"
    for image_id in ("abc123", "def456"):
        _image(images / f"{image_id}.jpg")

    def item(qid, image_id, question, answers):
        return {"question": question, "image_id": image_id, "image_classes": ["Poster"], "flickr_original_url": "",
                "flickr_300k_url": "", "image_width": 8, "image_height": 8, "answers": answers,
                "question_tokens": question.split(), "question_id": qid, "set_name": "val"}

    data = _json(tmp / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                                 "dataset_version": "0.5.1", "data": [
        item(34602, "abc123", "what brand is this phone?", ["nokia"] * 10),
        item(34603, "def456", "What year is shown?", ["1990"] * 2 + ["1991"] * 8),
    ]})
    answers = {"what brand is this phone?": "Nokia.", "What year is shown?": "1990"}
    # 1.0 and (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    expected = {"accuracy": 80.0}
    return Sources(questions=data, image_folder=images, annotations=data), answers, expected


def scienceqa_fixture(tmp: Path):
    images = tmp / "images" / "test"
    for pid in ("1", "3"):
        _image(images / pid / "image.png")

    def problem(question, choices, answer, hint, image, split, subject="natural science"):
        return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
                "task": "closed choice", "grade": "grade2", "subject": subject, "topic": "biology",
                "category": "Classify", "skill": "", "lecture": "", "solution": "", "split": split}

    base = tmp / "scienceqa"
    _json(base / "problems.json", {
        "1": problem("Which is a mammal?", ["frog", "dog"], 1, "", "image.png", "test"),
        "2": problem("Which word is a noun?", ["run", "cat"], 1, "", None, "test", "language science"),
        "3": problem("Which color is shown?", ["red", "blue", "green"], 0, "Look at the picture.", "image.png", "test"),
        "4": problem("Which is hot?", ["ice", "fire"], 1, "", "image.png", "train"),
    })
    _json(base / "pid_splits.json", {"train": ["4"], "val": [], "test": ["1", "2", "3"], "minival": []})
    answers = {"Context: N/A": "B", "Context: Look at the picture.": "The answer is B."}
    # IMG questions only (1 and 3): 1 right, 3 wrong
    expected = {"img_accuracy": 50.0, "n_img": 2, "accuracy": 50.0, "unparsed": 0}
    return Sources(image_folder=images, annotations=base), answers, expected


def pope_fixture(tmp: Path):
    images = tmp / "val2014"
    rows = [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 3, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a car in the image?", "label": "no"},
        {"question_id": 4, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a bus in the image?", "label": "yes"},
    ]
    for r in rows:
        _image(images / r["image"])
    questions = _jsonl(tmp / "coco" / "coco_pope_adversarial.json", rows)
    answers = {"Is there a dog in the image?": "Yes, there is a dog.",   # TP
               "Is there a cat in the image?": "Yes",                    # FP
               "Is there a car in the image?": "No, there is not.",      # TN
               "Is there a bus in the image?": "There is no bus."}       # FN
    expected = {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0,
                "per_category": {"adversarial": {"n": 4}}}
    return Sources(questions=questions, image_folder=images), answers, expected


def mme_fixture(tmp: Path):
    root = tmp / "MME_Benchmark_release_version"
    # flat subtasks: image and its question file side by side
    for task, stem, qa in [
        ("existence", "0001", [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")]),
        ("existence", "0002", [("Is there a car in this image?", "Yes"), ("Is there a bus in this image?", "No")]),
        ("code_reasoning", "0020", [("Is a python code shown in the picture?", "Yes"),
                                    ("Is a c++ code shown in the picture?", "No")]),
    ]:
        _image(root / task / f"{stem}.png")
        (root / task / f"{stem}.txt").write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in qa))
    # nested subtasks: images/ and questions_answers_YN/
    _image(root / "artwork" / "images" / "10002.jpg")
    qa_dir = root / "artwork" / "questions_answers_YN"
    qa_dir.mkdir(parents=True)
    (qa_dir / "10002.txt").write_text("Is this artwork created by Titian? Please answer yes or no.\tYes\n"
                                      "Is this artwork created by Monet? Please answer yes or no.\tNo\n")
    answers = {"Is there a dog in this image?": "Yes", "Is there a cat in this image?": "No",
               "Is there a car in this image?": "Yes", "Is there a bus in this image?": "Yes",
               "Is this artwork created by Titian?": "No", "Is this artwork created by Monet?": "Yes",
               "Is a python code shown in the picture?": "Yes, it is.", "Is a c++ code shown in the picture?": "no"}
    # existence: 3/4 right, 1/2 images both right -> 75 + 50; artwork 0 + 0; code_reasoning 100 + 100
    expected = {"perception": 125.0, "cognition": 200.0,
                "subtasks": {"existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0},
                             "artwork": {"acc": 0.0, "acc_plus": 0.0}}}
    return Sources(image_folder=root), answers, expected


def mmvet_fixture(tmp: Path):
    images = tmp / "mm-vet" / "images"
    for i in range(2):
        _image(images / f"v1_{i}.png")
    questions = _json(tmp / "mm-vet" / "mm-vet.json", {
        "v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is x?", "answer": "-1 <AND> -5"},
        "v1_1": {"imagename": "v1_1.png", "capability": ["rec"], "question": "What animal is this?", "answer": "dog"},
    })
    answers = {"What is x?": "x is -1", "What animal is this?": "A dog."}
    return Sources(questions=questions, image_folder=images), answers, None


def shapes_fixture(tmp: Path):
    from tinyllava_edge.data.shapes import write_dataset

    write_dataset(tmp / "shapes", n_train=1, n_val=1, n_test=3, image_size=32)
    records = json.loads((tmp / "shapes" / "test.json").read_text())
    # right for colour questions (with a trailing period and capitals), "2" for the rest
    answers = {r["conversations"][0]["value"].replace("<image>\n", ""):
               (r["conversations"][1]["value"].title() + "." if r["kind"] == "colour" else "2") for r in records}
    right = [r["kind"] == "colour" or r["conversations"][1]["value"] == "2" for r in records]
    expected = {"n": len(records), "correct": sum(right), "exact_match": 100.0 * sum(right) / len(records)}
    return Sources(questions=tmp / "shapes" / "test.json", image_folder=tmp / "shapes"), answers, expected


FIXTURES = {
    "vqav2": vqav2_fixture, "gqa": gqa_fixture, "textvqa": textvqa_fixture, "scienceqa": scienceqa_fixture,
    "pope": pope_fixture, "mme": mme_fixture, "mmvet": mmvet_fixture, "shapes": shapes_fixture,
}


def _assert_subset(actual, expected, path="metrics"):
    for key, value in expected.items():
        assert key in actual, f"{path}.{key} missing"
        if isinstance(value, dict):
            _assert_subset(actual[key], value, f"{path}.{key}")
        elif isinstance(value, float):
            assert actual[key] == pytest.approx(value), f"{path}.{key}"
        else:
            assert actual[key] == value, f"{path}.{key}"


def test_every_benchmark_has_a_fixture():
    assert set(BENCHMARKS) == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_run_and_score(name, tmp_path):
    sources, answers, expected = FIXTURES[name](tmp_path)
    predictor = ScriptedPredictor(answers)
    results = run_benchmark(name, predictor, sources, tmp_path / "out", progress=False)
    assert {q.split("\n")[0] for _, q in predictor.seen} == set(answers), "every fixture question asked once"
    assert all(image is None or Path(image).is_file() for image, _ in predictor.seen)
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == len(answers) == results["counts"]["answers"]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["skipped"]["count"] == 0
    assert (out / "results.md").read_text().startswith(f"# {get_benchmark(name).title}")
    if expected is None:
        assert on_disk["metrics"] is None and on_disk["note"]
    else:
        _assert_subset(on_disk["metrics"], expected)
        # scoring the answers file again gives the same numbers
        again = score_answers(name, out / "answers.jsonl", sources, tmp_path / "rescored")
        _assert_subset(again["metrics"], expected)


def test_prompts_follow_the_reference_scripts(tmp_path):
    sources, answers, _ = scienceqa_fixture(tmp_path)
    predictor = ScriptedPredictor(answers)
    run_benchmark("scienceqa", predictor, sources, tmp_path / "out", progress=False)
    # CQM-A (convert_sqa_to_llava.py) + --single-pred-prompt (model_vqa_science.py); problem 2 has no image
    assert sorted(q for _, q in predictor.seen) == [
        "Context: Look at the picture.\nQuestion: Which color is shown?\nOptions: (A) red (B) blue (C) green\n"
        "Answer with the option's letter from the given choices directly.",
        "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) dog\n"
        "Answer with the option's letter from the given choices directly.",
    ]
    recorded = [json.loads(line)["prompt"] for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert all(p.startswith("<image>\nContext: ") for p in recorded)  # eval_science_qa.py's IMG test

    sources, answers, _ = vqav2_fixture(tmp_path / "v")
    predictor = ScriptedPredictor(answers)
    run_benchmark("vqav2", predictor, sources, tmp_path / "v" / "out", progress=False)
    assert predictor.seen[0][1] == "How many dogs are there?" + SHORT
    submission = json.loads((tmp_path / "v" / "out" / "vqav2_submission.json").read_text())
    assert submission[0] == {"question_id": 420, "answer": "2"}

    sources, answers, _ = mme_fixture(tmp_path / "m")
    predictor = ScriptedPredictor(answers)
    run_benchmark("mme", predictor, sources, tmp_path / "m" / "out", progress=False)
    assert "Is a python code shown in the picture?" + SHORT in {q for _, q in predictor.seen}


def test_submission_files(tmp_path):
    sources, answers, _ = mmvet_fixture(tmp_path)
    run_benchmark("mmvet", ScriptedPredictor(answers), sources, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "mmvet_submission.json").read_text()) == {"v1_0": "x is -1", "v1_1": "A dog."}

    sources, answers, _ = gqa_fixture(tmp_path / "g")
    run_benchmark("gqa", ScriptedPredictor(answers), sources, tmp_path / "g" / "out", progress=False)
    predictions = json.loads((tmp_path / "g" / "out" / "testdev_balanced_predictions.json").read_text())
    assert {"questionId": "201", "prediction": "yes"} in predictions


def test_llava_files_and_answers(tmp_path):
    """LLaVA's eval.zip formats: question jsonl, answers scored by (image id, question) or in order."""
    sources, _, _ = textvqa_fixture(tmp_path)
    # LLaVA's TextVQA answers: question_id is the image id, the prompt carries OCR tokens
    answers = _jsonl(tmp_path / "llava_textvqa_answers.jsonl", [
        {"question_id": "abc123", "prompt": "what brand is this phone?\nReference OCR token: nokia, 3310" + SHORT,
         "text": "nokia", "answer_id": "x", "model_id": None, "metadata": {}},
        {"question_id": "def456", "prompt": "What year is shown?" + SHORT, "text": "1991", "answer_id": "y",
         "model_id": None, "metadata": {}},
    ])
    results = score_answers("textvqa", answers, Sources(annotations=sources.annotations), tmp_path / "out")
    assert results["metrics"]["accuracy"] == pytest.approx(100.0)

    # llava_pope_test.jsonl has no labels; eval_pope.py pairs each category with coco_pope_<category>.json in order
    pope = _jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10, "image": "a.jpg", "text": "Is there a dog in the image?", "category": "random"},
        {"question_id": 11, "image": "a.jpg", "text": "Is there a cat in the image?", "category": "popular"},
        {"question_id": 12, "image": "a.jpg", "text": "Is there a car in the image?", "category": "random"},
    ])
    labels = tmp_path / "coco"
    _jsonl(labels / "coco_pope_random.json", [{"question_id": 1, "image": "a.jpg", "text": "-", "label": "yes"},
                                              {"question_id": 2, "image": "a.jpg", "text": "-", "label": "no"}])
    _jsonl(labels / "coco_pope_popular.json", [{"question_id": 1, "image": "a.jpg", "text": "-", "label": "no"}])
    answers = _jsonl(tmp_path / "pope_answers.jsonl", [
        {"question_id": 10, "prompt": "", "text": "Yes", "answer_id": "", "model_id": "", "metadata": {}},
        {"question_id": 11, "prompt": "", "text": "No", "answer_id": "", "model_id": "", "metadata": {}},
        {"question_id": 12, "prompt": "", "text": "Yes", "answer_id": "", "model_id": "", "metadata": {}},
    ])
    results = score_answers("pope", answers, Sources(questions=pope, annotations=labels), tmp_path / "pope_out")
    assert results["metrics"]["per_category"]["random"]["accuracy"] == pytest.approx(50.0)
    assert results["metrics"]["per_category"]["popular"]["accuracy"] == pytest.approx(100.0)


# ---- bad data ------------------------------------------------------------------------------

def _llava_vqav2(tmp: Path, rows):
    images = tmp / "test2015"
    _image(images / "COCO_test2015_000000000001.jpg")
    return Sources(questions=_jsonl(tmp / "llava_vqav2_mscoco_test-dev2015.jsonl", rows), image_folder=images)


_OK = {"question_id": 1, "image": "COCO_test2015_000000000001.jpg", "text": "What is it?" + SHORT, "category": "default"}


def test_missing_image_names_file_and_line(tmp_path):
    missing = {**_OK, "question_id": 2, "image": "COCO_test2015_000000000002.jpg"}
    sources = _llava_vqav2(tmp_path, [_OK, missing])
    with pytest.raises(BadRecordError, match=r"llava_vqav2_mscoco_test-dev2015.jsonl, line 2: image file .*000000000002.jpg does not exist"):
        run_benchmark("vqav2", ScriptedPredictor({}), sources, tmp_path / "out", progress=False)
    results = run_benchmark("vqav2", ScriptedPredictor({"What is it?": "a cat"}), sources, tmp_path / "out",
                            skip_bad=True, progress=False)
    assert results["skipped"]["count"] == 1 and "line 2" in results["skipped"]["records"][0]
    assert results["counts"]["answers"] == 1
    assert results["metrics"] is None  # test-dev: no annotations, a submission file instead
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped"]["count"] == 1


def test_broken_json_line(tmp_path):
    sources = _llava_vqav2(tmp_path, [_OK, '{"question_id": 3, "image": ', {**_OK, "question_id": 4}])
    with pytest.raises(BadRecordError, match=r"\.jsonl, line 2: is not valid JSON"):
        run_benchmark("vqav2", ScriptedPredictor({}), sources, tmp_path / "out", progress=False)
    results = run_benchmark("vqav2", ScriptedPredictor({}), sources, tmp_path / "out", skip_bad=True, progress=False)
    assert results["skipped"]["count"] == 1 and results["counts"]["answers"] == 2


def test_question_without_ground_truth(tmp_path):
    sources, answers, _ = vqav2_fixture(tmp_path)
    questions = json.loads(sources.questions.read_text())
    questions["questions"].append({"image_id": 7, "question": "Why?", "question_id": 999})
    sources.questions.write_text(json.dumps(questions))
    with pytest.raises(BadRecordError, match=r"questions\[3\]: question_id 999 has no ground truth in .*annotations.json"):
        run_benchmark("vqav2", ScriptedPredictor(answers), sources, tmp_path / "out", progress=False)
    results = run_benchmark("vqav2", ScriptedPredictor(answers), sources, tmp_path / "out", skip_bad=True,
                            progress=False)
    assert results["skipped"]["count"] == 1 and results["counts"]["scored"] == 3

    # the same in an answers file: the answers file and line are named
    answers_file = _jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 420, "prompt": "", "text": "2", "answer_id": "", "model_id": "", "metadata": {}},
        {"question_id": 12345, "prompt": "", "text": "2", "answer_id": "", "model_id": "", "metadata": {}},
    ])
    with pytest.raises(BadRecordError, match=r"answers.jsonl, line 2: question_id 12345 has no ground truth"):
        score_answers("vqav2", answers_file, sources, tmp_path / "score")
    results = score_answers("vqav2", answers_file, sources, tmp_path / "score", skip_bad=True)
    assert results["skipped"]["count"] == 1 and results["metrics"]["n"] == 1


def test_bad_files_give_one_clear_error(tmp_path):
    broken = tmp_path / "v2_mscoco_val2014_annotations.json"
    broken.write_text('{"annotations": [\n{"question_id": 1,\n}]}')
    sources, _, _ = vqav2_fixture(tmp_path / "v")
    with pytest.raises(DataError, match=r"annotations.json, line 3: not valid JSON"):
        run_benchmark("vqav2", ScriptedPredictor({}), Sources(sources.questions, sources.image_folder, broken),
                      tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"needs --questions"):
        run_benchmark("pope", ScriptedPredictor({}), Sources(), tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"pid_splits.json has no split 'dev'"):
        s, _, _ = scienceqa_fixture(tmp_path / "s")
        run_benchmark("scienceqa", ScriptedPredictor({}), Sources(image_folder=s.image_folder,
                      annotations=s.annotations, split="dev"), tmp_path / "out", progress=False)
    mme = tmp_path / "mme" / "existence"
    _image(mme / "0001.png")
    (mme / "0001.txt").write_text("Is there a dog? Please answer yes or no.\tMaybe\n")
    with pytest.raises(BadRecordError, match=r"0001.txt, line 1: .*expected 'question<TAB>Yes'"):
        run_benchmark("mme", ScriptedPredictor({}), Sources(image_folder=tmp_path / "mme"), tmp_path / "out",
                      progress=False)
