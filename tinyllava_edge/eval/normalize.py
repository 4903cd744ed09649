"""VQA answer processing, two variants: the official VQA evaluator's and EvalAI's (m4c).

Both share one table of contractions, number words and articles and one list of punctuation
marks; they differ in what runs before, and in when the official evaluator applies them at all.

:func:`normalize_answer` reproduces ``EvalAIAnswerProcessor`` of LLaVA's and TinyLLaVA_Factory's
``eval/m4c_evaluator.py`` (from facebookresearch/mmf), step for step, quirks included:

1. lower-case; drop ``,`` and ``?``; ``'s`` becomes `` 's`` (so "it's" -> "it 's");
2. newlines and tabs become spaces; strip;
3. each punctuation mark in :data:`PUNCTUATIONS` is deleted where it touches a space (or the
   text has a digit,digit comma) and replaced by a space elsewhere ("t-shirt" -> "t shirt");
   a ``.`` not followed by a digit is deleted ("3.5" keeps its point). The original passes
   ``re.UNICODE`` (= 32) as the *count* of ``re.sub``, so only the first 32 periods go: kept.
   Its lookbehind is misspelt ``(?!<=\\d)`` (a lookahead for the text "<=" + digit), so a
   period after a digit is deleted too: kept;
4. number words zero..ten (and "none") become digits, the articles a/an/the are dropped, and
   contraction spellings without apostrophes get them ("dont" -> "don't").

LLaVA uses it for TextVQA (``eval_textvqa.py``) and to write the VQAv2 submission
(``convert_vqav2_for_submission.py``).

:func:`vqa_eval_normalize` is what the official VQA evaluator (GT-Vision-Lab/VQA ``vqaEval.py``,
the code the VQA server runs) does to an answer: steps 3 and 4 only, with its own digit,digit
test (exactly one comma between two digits). No lower-casing before step 3, no comma or
question-mark removal first, no split of "'s" ("it's" stays "it's"). The evaluator applies it
only to questions whose human answers differ (see ``metrics.vqa_eval_accuracy``).

Pure Python; no torch.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

CONTRACTIONS: Mapping[str, str] = MappingProxyType({
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
})

NUMBER_MAP: Mapping[str, str] = MappingProxyType({
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# The period rule of both processors, quirks kept (see the module docstring).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# "Does the text hold a comma between digits?": m4c accepts a run of commas, vqaEval.py exactly one.
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
VQA_EVAL_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the original's positional `re.UNICODE` lands in `count`


def word_tokenize(text: str) -> str:
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def process_punctuation(text: str, digit_comma: re.Pattern = COMMA_STRIP) -> str:
    out = text
    touches_digits = digit_comma.search(text) is not None
    for p in PUNCTUATIONS:
        # The test looks at the *input* text each time, as the original does.
        if (p + " " in text or " " + p in text) or touches_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """An answer as EvalAI compares it: ``"Two dogs."`` -> ``"2 dogs"``, ``"The cat"`` -> ``"cat"``."""
    text = word_tokenize(answer)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    return process_digit_article(text)


def vqa_eval_normalize(answer: str) -> str:
    """An answer as the official VQA evaluator normalises it: ``"Two dogs."`` -> ``"2 dogs"``,
    ``"It's"`` -> ``"it's"`` (EvalAI's processor gives ``"it 's"``)."""
    return process_digit_article(process_punctuation(answer, VQA_EVAL_DIGIT_COMMA))
