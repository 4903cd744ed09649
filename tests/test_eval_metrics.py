"""Scoring functions of tinyllava_edge.eval, against numbers worked out by hand."""

import random

import pytest

from tinyllava_edge.eval.metrics import (
    binary_metrics, exact_match_text, gqa_prediction, grouped_accuracy, leave_one_out_accuracy, m4c_accuracy,
    m4c_answer_scores, mme_parse, mme_subtask, pope_parse, scienceqa_choice, scienceqa_letter, top_confusions,
    vqa_eval_accuracy,
)
from tinyllava_edge.eval.normalize import normalize_answer, vqa_eval_normalize


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                     # number words become digits
    ("Two dogs.", "2 dogs"),          # a final period goes
    ("none", "0"),
    ("The cat", "cat"),               # articles go
    ("an apple", "apple"),
    ("A dog", "dog"),
    ("isnt", "isn't"),                # contractions get their apostrophe
    ("dont", "don't"),
    ("couldn'tve", "couldn't've"),
    ("It's", "it 's"),                # EvalAI's word_tokenize splits 's off
    ("yes!", "yes"),                  # "!" not touching a space becomes a space
    ("t-shirt", "t shirt"),
    ("hello - world", "hello world"),  # a mark touching a space is deleted
    ("3.5", "3.5"),                   # a period before a digit stays
    ("10,000", "10000"),              # commas go first
    ("What?", "what"),
    ("  Yes\n", "yes"),
    ("black and white", "black and white"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("Two dogs.", "2 dogs"), ("The cat", "cat"), ("dont", "don't"),
    ("It's", "it's"),                 # no 's split, unlike EvalAI's "it 's"
    ("red,blue", "red blue"),         # a comma is a mark like any other (EvalAI drops it first)
    ("red, blue", "red blue"),        # touching a space: deleted
    ("10,000", "10000"),              # digit,digit: every mark is deleted
    ("1,,000", "1  000"),             # two commas are no digit,digit comma for vqaEval.py (m4c: "1000")
    ("t-shirt", "t shirt"), ("What?", "what"), ("2:30", "2:30"),
])
def test_vqa_eval_normalize(raw, expected):
    assert vqa_eval_normalize(raw) == " ".join(expected.split())


def test_vqa_eval_accuracy_by_hand():
    assert leave_one_out_accuracy(3, 10) == pytest.approx(0.9)
    assert leave_one_out_accuracy(0, 10) == 0.0 and leave_one_out_accuracy(10, 10) == 1.0
    # the humans disagree: both sides are normalised ("Two." -> "2", "two" -> "2": 3 of 10)
    assert vqa_eval_accuracy("Two.", ["two", "2", "2"] + ["three"] * 7) == pytest.approx(0.9)
    # all ten agree: nothing is normalised, only stripped
    assert vqa_eval_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_eval_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_eval_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_eval_accuracy("it's", ["it's"] * 6 + ["its"] * 4) == pytest.approx(1.0)
    assert vqa_eval_accuracy("it 's", ["it's"] * 6 + ["its"] * 4) == 0.0  # EvalAI's split never matches
    assert vqa_eval_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5 * 1 / 3)  # any number of humans
    assert vqa_eval_accuracy("cat", []) == 0.0


def _m4c_scores(answers):
    """m4c_evaluator.py's _compute_answer_scores loop, written out as the original has it."""
    answers = [normalize_answer(a) for a in answers]
    gt = list(enumerate(answers))
    scores = {}
    for unique in set(answers):
        accs = []
        for item in gt:
            others = [x for x in gt if x != item]
            accs.append(min(1, len([x for x in others if x[1] == unique]) / 3))
        scores[unique] = sum(accs) / len(accs)
    return scores


def test_m4c_accuracy_by_hand():
    # 3 of 10 said "cat": 3 subsets keep 2 matches (2/3), 7 keep 3 (1): (3*2/3 + 7) / 10 = 0.9
    assert m4c_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert m4c_accuracy("dog", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(1.0)
    # 1 of 10: 9 subsets keep 1 match (1/3): 9/3/10 = 0.3
    assert m4c_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert m4c_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert m4c_accuracy("bird", ["cat"] * 10) == 0.0
    # normalisation applies to the prediction and to the human answers
    assert m4c_accuracy("Two.", ["two", "2", "2"] + ["three"] * 7) == pytest.approx(0.9)


def test_m4c_scores_match_m4c_loop():
    rng = random.Random(0)
    vocab = ["yes", "no", "Two", "2", "the cat", "cat", "red", "blue."]
    for _ in range(200):
        answers = [rng.choice(vocab) for _ in range(10)]
        ours = m4c_answer_scores(answers)
        reference = _m4c_scores(answers)
        assert ours.keys() == reference.keys()
        for k in ours:
            assert ours[k] == pytest.approx(reference[k])


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"),
    ("No.", "no"),
    ("There is not a dog in the image.", "no"),
    ("no, there is no dog", "no"),
    ("Not really", "yes"),            # eval_pope.py checks "No", "no", "not": "Not" is none of them
    ("Yes. No.", "yes"),              # only the first sentence counts
    ("", "yes"),
])
def test_pope_parse(text, expected):
    assert pope_parse(text) == expected


def test_binary_metrics_by_hand():
    preds = ["yes", "yes", "no", "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]  # TP, FP, TN, FN, TP
    m = binary_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)
    none = binary_metrics(["no", "no"], ["no", "no"])  # no positives at all: 0, not a division error
    assert none["precision"] == none["recall"] == none["f1"] == 0.0 and none["accuracy"] == 100.0


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no.", "no"), (" NO", "no"), ("Yes, it is.", "yes"),
    ("The answer is yes", "other"),   # calculation.py only looks at the first four characters
    ("ayes", "yes"), ("I think", "other"), ("nope", "no"), (" not sure", "no"),
    ("  no", "no"), ("  yes", "other"), ("   No", "other"),  # nothing is stripped: spaces use up the four
])
def test_mme_parse(text, expected):
    assert mme_parse(text) == expected


def test_mme_subtask_by_hand():
    rows = [("img1", "Yes", "yes"), ("img1", "No", "no"),      # both right
            ("img2", "Yes", "yes"), ("img2", "No", "other")]   # one right
    m = mme_subtask(rows)
    assert m["acc"] == pytest.approx(75.0)
    assert m["acc_plus"] == pytest.approx(50.0)
    assert m["score"] == pytest.approx(125.0)
    assert (m["images"], m["questions"], m["other_answers"], m["images_not_paired"]) == (2, 4, 1, 0)


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B. Louisiana", "B"), ("The answer is C.", "C"),
    ("The answer is C. The answer is D.", "FAILED"),   # two matches: eval_science_qa.py gives up
    ("b", "FAILED"), ("(A)", "FAILED"),
])
def test_scienceqa_letter(text, letter):
    assert scienceqa_letter(text) == letter


def test_scienceqa_choice_respects_the_number_of_choices():
    assert scienceqa_choice("B", 2) == 1
    assert scienceqa_choice("C", 2) == -1
    assert scienceqa_choice("E", 5) == 4


def test_small_helpers():
    assert gqa_prediction("Yes.") == "yes"
    assert gqa_prediction("Table..") == "table"
    assert exact_match_text(" Red. ") == "red"
    groups = grouped_accuracy([("b", 1.0), ("a", 0.0), ("b", 0.0)])
    assert list(groups) == ["a", "b"] and groups["b"]["accuracy"] == pytest.approx(50.0)
    confusions = top_confusions([("k", "1", "2"), ("k", "1", "2"), ("k", "1", "1"), ("c", "red", "blue")])
    assert confusions[0] == {"kind": "k", "expected": "1", "got": "2", "count": 2}
    assert len(confusions) == 2  # right answers are no confusion
