"""Scoring functions: pure Python, no torch, no files. Every rate is returned in percent.

Each function cites the script whose numbers it reproduces; where we deliberately differ, the
docstring says how.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Hashable, Iterable, Mapping, Sequence

from tinyllava_edge.eval.normalize import normalize_answer, vqa_eval_normalize

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py `--options`
_SCIENCEQA_SENTENCE = re.compile(r"The answer is ([A-Z]).")  # eval_science_qa.py, verbatim


def percent(part: float, whole: float) -> float:
    """``100 * part / whole``; 0.0 for an empty whole (nothing to score is not an error here)."""
    return 100.0 * part / whole if whole else 0.0


# ---- VQAv2: the official VQA evaluator -------------------------------------------------------

def leave_one_out_accuracy(matches: int, n: int) -> float:
    """Mean of ``min(1, matching humans / 3)`` over the n subsets that leave one human out, for
    an answer that ``matches`` of the n humans gave (the VQA accuracy formula)."""
    # Leaving out a matching human leaves matches-1 in the subset; leaving out another leaves all.
    own = matches * min(1.0, (matches - 1) / 3)
    other = (n - matches) * min(1.0, matches / 3)
    return (own + other) / n


def _vqa_eval_text(text: str) -> str:
    # vqaEval.py turns line breaks and tabs into spaces and strips every answer, always
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_eval_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one answer in [0, 1], as GT-Vision-Lab/VQA ``vqaEval.py`` computes it.

    Answers are stripped. Only when the human answers are not all the same text does the
    evaluator normalise, and then both sides (:func:`normalize.vqa_eval_normalize`); when all
    agree, the answer must equal theirs as written ("Yes" does not match ten "yes"). The score
    is ``min(1, matches / 3)`` over each leave-one-out subset of the humans (10 choose 9 for
    VQAv2), averaged. vqaEval.py leaves out a whole answer record, which is leaving out one
    position wherever the records differ, as their ``answer_id`` makes them in every release.
    """
    humans = [_vqa_eval_text(h) for h in human_answers]
    if not humans:
        return 0.0
    answer = _vqa_eval_text(answer)
    if len(set(humans)) > 1:
        humans = [vqa_eval_normalize(h) for h in humans]
        answer = vqa_eval_normalize(answer)
    return leave_one_out_accuracy(sum(h == answer for h in humans), len(humans))


# ---- TextVQA: m4c (EvalAI processing), as LLaVA's eval_textvqa.py ---------------------------

def m4c_answer_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every distinct (EvalAI-normalised) human answer, m4c's ``_compute_answer_scores``.

    For each of the n human answers, count how many of the *other* n-1 gave the candidate; the
    candidate scores ``min(1, count / 3)`` on that subset, and its score is the mean over the n
    leave-one-out subsets. m4c asserts exactly ten answers; any n >= 1 is accepted here and
    gives the same formula. Unlike :func:`vqa_eval_accuracy`, every answer is normalised, also
    when all humans agree.
    """
    answers = [normalize_answer(a) for a in human_answers]
    n = len(answers)
    if n == 0:
        return {}
    counts: dict[str, int] = defaultdict(int)
    for a in answers:
        counts[a] += 1
    return {candidate: leave_one_out_accuracy(total, n) for candidate, total in counts.items()}


def m4c_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction in [0, 1] (m4c ``TextVQAAccuracyEvaluator``)."""
    return m4c_answer_scores(human_answers).get(normalize_answer(prediction), 0.0)


# ---- GQA -----------------------------------------------------------------------------------

def gqa_prediction(text: str) -> str:
    """What ``convert_gqa_for_eval.py`` submits: ``text.rstrip('.').lower()``."""
    return text.rstrip(".").lower()


# ---- POPE ----------------------------------------------------------------------------------

def pope_parse(text: str) -> str:
    """``"yes"`` or ``"no"`` as ``eval_pope.py`` reads an answer.

    Keep the first sentence (up to the first ``.``), drop commas, split on single spaces; the
    answer is no if a word is exactly ``No``, ``no`` or ``not``, otherwise yes (so an empty
    or unrelated answer counts as yes, as in the original).
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE's accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class.

    ``eval_pope.py`` maps any label other than "no" to yes and adds 1e-6 to denominators; here
    an empty denominator gives 0.0 instead, which changes the numbers by at most 1e-4 percent.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pred = [p != "no" for p in predictions]
    gold = [g != "no" for g in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = percent(tp, tp + fp)
    recall = percent(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": len(pred), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": percent(tp + tn, len(pred)), "precision": precision, "recall": recall,
        "f1": f1, "yes_ratio": percent(sum(pred), len(pred)),
    }


# ---- MME -----------------------------------------------------------------------------------

def mme_parse(text: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``, as MME's ``eval_tool/calculation.py`` reads an answer.

    LLaVA's ``convert_answer_to_mme.py`` writes the answer text unchanged; ``parse_pred_ans``
    lower-cases it and looks for "yes", then "no", in its first four characters. Nothing is
    stripped first, so leading whitespace counts: " yes" is yes, "  yes" is other. (An answer
    holding a tab or line break cannot be written into calculation.py's files at all, as they
    are split on both; the same rule is applied to it here.)
    """
    head = text.lower()[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_subtask(rows: Iterable[tuple[Hashable, str, str]]) -> dict:
    """acc, acc+ and score of one MME subtask from (image key, gt "yes"/"no", parsed prediction).

    calculation.py: acc = right answers / questions; acc+ = images whose questions (two each in
    MME) are all right / images; score = 100 * (acc + acc+). It asserts two questions per
    image; an image with another number is counted in ``images_not_paired`` here instead.
    """
    by_image: dict[Hashable, list[bool]] = defaultdict(list)
    other = 0
    for image, gt, pred in rows:
        by_image[image].append(gt.lower() == pred)
        other += pred == "other"
    n = sum(len(v) for v in by_image.values())
    correct = sum(sum(v) for v in by_image.values())
    both = sum(all(v) for v in by_image.values())
    acc = percent(correct, n)
    acc_plus = percent(both, len(by_image))
    return {
        "questions": n, "images": len(by_image), "acc": acc, "acc_plus": acc_plus,
        "score": acc + acc_plus, "other_answers": other,
        "images_not_paired": sum(len(v) != 2 for v in by_image.values()),
    }


# ---- ScienceQA -----------------------------------------------------------------------------

def scienceqa_letter(text: str) -> str:
    """The option letter ``eval_science_qa.py`` reads from an answer, or ``"FAILED"``.

    Exactly a letter A-E; or a letter followed by ``". "`` ("B. Louisiana"); or exactly one
    match of ``The answer is X.`` in the text.
    """
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SCIENCEQA_SENTENCE.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_choice(text: str, n_choices: int) -> int:
    """Index of the chosen option, -1 when unreadable or past the problem's choices."""
    letter = scienceqa_letter(text)
    options = SCIENCEQA_OPTIONS[:n_choices]
    return options.index(letter) if letter in options else -1


# ---- exact match and grouping --------------------------------------------------------------

def exact_match_text(text: str) -> str:
    """The closed-vocabulary comparison used for the shapes benchmark: strip, drop a trailing
    period, lower-case ("Red." == "red")."""
    return text.strip().rstrip(".").strip().lower()


def grouped_accuracy(items: Iterable[tuple[str, float]]) -> dict[str, dict]:
    """``{group: {"n", "correct", "accuracy"}}`` from (group, score in [0, 1]) pairs, sorted by group."""
    groups: dict[str, list[float]] = defaultdict(list)
    for group, score in items:
        groups[str(group)].append(score)
    return {
        g: {"n": len(s), "correct": sum(s), "accuracy": percent(sum(s), len(s))}
        for g, s in sorted(groups.items())
    }


def top_confusions(pairs: Iterable[tuple[str, str, str]], k: int = 10) -> list[dict]:
    """The k most common wrong (group, expected, got) triples, most frequent first."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for group, expected, got in pairs:
        if expected != got:
            counts[(group, expected, got)] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [{"kind": g, "expected": e, "got": o, "count": c} for (g, e, o), c in ranked]


def mean_of(metrics: Mapping[str, Mapping[str, float]], key: str) -> float:
    """Unweighted mean of ``key`` over the groups of ``metrics`` (0.0 when there are none)."""
    values = [m[key] for m in metrics.values()]
    return sum(values) / len(values) if values else 0.0
