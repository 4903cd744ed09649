"""Chat templates: golden strings and label masks, as TinyLLaVA_Factory renders and masks them.

The expected strings are written out literally. Label masks are checked token by token on tiny
byte-level BPE tokenizers trained here, with the special tokens of each template's family.
"""

from __future__ import annotations

import logging

import pytest

from tinyllava_edge.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tinyllava_edge.data.template import (
    TEMPLATES,
    Template,
    default_template_for_family,
    get_template,
    tokenizer_image_token,
)
from tinyllava_edge.errors import DataError, TinyLlavaError

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
Q1, A1 = "<image>\nWhat is in the picture?", "A red square."
Q2, A2 = "How many shapes?", "There are two shapes."
ONE = [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}]
TWO = ONE + [{"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]

# template -> (1-turn, 2-turn, generation prompt for Q1, generation prompt for Q2 after turn 1)
GOLDEN = {
    "phi": (
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|endoftext|>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|endoftext|>"
        "USER: How many shapes? ASSISTANT: There are two shapes.<|endoftext|>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT:",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|endoftext|>"
        "USER: How many shapes? ASSISTANT:",
    ),
    "llama": (
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.</s>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.</s>"
        "USER: How many shapes? ASSISTANT: There are two shapes.</s>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT:",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.</s>USER: How many shapes? ASSISTANT:",
    ),
    "gemma": (
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<eos>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<eos>"
        "USER: How many shapes? ASSISTANT: There are two shapes.<eos>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT:",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<eos>USER: How many shapes? ASSISTANT:",
    ),
    "qwen2_base": (
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|endoftext|>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|endoftext|>"
        "USER: How many shapes? ASSISTANT: There are two shapes.<|endoftext|>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT:",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|endoftext|>"
        "USER: How many shapes? ASSISTANT:",
    ),
    "qwen2_instruct": (
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|im_end|>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|im_end|>"
        "USER: How many shapes? ASSISTANT: There are two shapes.<|im_end|>",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT:",
        SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|im_end|>"
        "USER: How many shapes? ASSISTANT:",
    ),
    # Questions are dropped; every turn is "<image>" + answer + "\n".
    "pretrain": (
        "<image>A red square.\n",
        "<image>A red square.\n<image>There are two shapes.\n",
        "<image>",
        "<image>A red square.\n<image>",
    ),
}
STOP = {
    "phi": ("<|endoftext|>",),
    "llama": ("</s>",),
    "gemma": ("<eos>",),
    "qwen2_base": ("<|endoftext|>",),
    "qwen2_instruct": ("<|im_end|>",),
    "pretrain": ("\n",),
}

CORPUS = [
    SYS,
    "USER: What is in the picture? ASSISTANT: A red square on a blue circle.",
    "USER: How many shapes are there? ASSISTANT: There are two shapes.",
    "Describe the image briefly. A small green triangle.",
]
# The family tokenizers' special tokens (Factory sets pad = unk for phi, llama and gemma; Qwen2's
# pad is <|endoftext|>): (specials, bos, eos, pad, adds bos?)
TOKENIZERS = {
    "phi": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", False),
    "qwen2_base": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>", False),
    "qwen2_instruct": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", False),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>", "<eos>", "<unk>", True),
    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", True),
}
# Which tokenizers each template's labels are checked with.
LABEL_CASES = {
    "phi": ["phi"], "qwen2_base": ["qwen2_base"], "qwen2_instruct": ["qwen2_instruct"],
    "gemma": ["gemma"], "llama": ["llama"], "pretrain": ["phi", "llama"],
}


def _build_tokenizer(name: str):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials, bos, eos, pad, add_bos = TOKENIZERS[name]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 2, trainer)
    if add_bos:  # like Llama / Gemma tokenizers: bos in front of every encoded text
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=pad, model_max_length=2048
    )


@pytest.fixture(scope="module")
def toks():
    return {name: _build_tokenizer(name) for name in TOKENIZERS}


def _unmasked_spans(input_ids, labels):
    """Runs of positions whose label is kept; kept labels must equal the input ids."""
    assert len(labels) == len(input_ids)
    spans, cur = [], []
    for tid, lab in zip(input_ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert lab == tid and tid != IMAGE_TOKEN_INDEX
            cur.append(lab)
    return spans + ([cur] if cur else [])


# ---- registry coverage ---------------------------------------------------------------------


def test_every_registered_template_has_golden_cases():
    assert set(TEMPLATES.keys()) == set(GOLDEN) == set(STOP) == set(LABEL_CASES)


def test_unknown_template_names_the_known_ones():
    with pytest.raises(TinyLlavaError, match="known: gemma, llama, phi, pretrain, qwen2_base, qwen2_instruct"):
        get_template("vicuna")


# ---- strings -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_strings(name):
    t = get_template(name)
    one, two, prompt_one, prompt_two = GOLDEN[name]
    assert t.render(ONE) == one
    assert t.render(TWO) == two
    assert t.render_prompt(Q1) == prompt_one
    assert t.render_prompt(ONE[:1]) == prompt_one
    assert t.render_prompt(ONE[:1] + [{"from": "gpt", "value": None}]) == prompt_one  # Factory's Message
    assert t.render_prompt(TWO[:3]) == prompt_two
    assert t.stop == STOP[name]


def test_image_anywhere_in_the_question_moves_to_the_front():
    t = get_template("phi")
    assert t.render_prompt("Look: <image> what is this? ") == SYS + " USER: <image>\nLook:  what is this? ASSISTANT:"
    assert t.render_prompt("<image>\n<image>\nTwo?") == SYS + " USER: <image>\nTwo? ASSISTANT:"
    assert t.render_prompt("  no image ") == SYS + " USER:   no image  ASSISTANT:"


def test_first_message_not_from_human_is_skipped():
    t = get_template("phi")
    assert t.render([{"from": "gpt", "value": "hello"}] + ONE) == GOLDEN["phi"][0]


def test_bad_conversations():
    t = get_template("phi")
    with pytest.raises(DataError, match="one answer per question"):
        t.render(TWO[:3])
    with pytest.raises(DataError, match="must be a string"):
        t.render([{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}])
    with pytest.raises(DataError, match="answer that is None"):
        t.render(ONE[:1] + [{"from": "gpt", "value": None}])
    with pytest.raises(DataError, match="end with a question"):
        t.render_prompt(ONE)


def test_family_defaults():
    assert {f: default_template_for_family(f) for f in ["phi", "llama", "gemma", "qwen2", "stablelm"]} == {
        "phi": "phi", "llama": "llama", "gemma": "gemma", "qwen2": "qwen2_base", "stablelm": "phi",
    }
    with pytest.raises(TinyLlavaError, match="known: gemma, llama, phi, qwen2, stablelm"):
        default_template_for_family("Qwen2")  # exact keys only


def test_template_record_round_trip():
    for name in TEMPLATES:
        t = get_template(name)
        assert Template.from_dict(t.to_dict()) == t
    with pytest.raises(TinyLlavaError, match="unknown: \\['roles'\\]"):
        Template.from_dict({**get_template("phi").to_dict(), "roles": ["USER", "ASSISTANT"]})


# ---- tokens and labels ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in sorted(LABEL_CASES) if n != "pretrain"])
def test_labels_keep_exactly_the_answers_and_their_eos(name, toks):
    t = get_template(name)
    tok = toks[LABEL_CASES[name][0]]
    for conv, answers in [(ONE, [A1]), (TWO, [A1, A2])]:
        out = t.encode(conv, tok, mode="train")
        assert out["prompt"] == t.render(conv)
        spans = _unmasked_spans(out["input_ids"], out["labels"])
        # Byte-level BPE puts the space after "ASSISTANT:" into the answer's first token.
        expected = [tok(" " + a + t.eos, add_special_tokens=False)["input_ids"] for a in answers]
        assert spans == expected
        assert [tok.decode(s) for s in spans] == [" " + a + t.eos for a in answers]
        # The last label is the last answer's EOS.
        assert out["labels"][-1] == out["input_ids"][-1] == tok.convert_tokens_to_ids(t.eos)


@pytest.mark.parametrize("tok_name", LABEL_CASES["pretrain"])
def test_pretrain_labels_keep_the_caption(tok_name, toks):
    tok = toks[tok_name]
    out = get_template("pretrain").encode(ONE, tok)
    n_masked = 2 if TOKENIZERS[tok_name][4] else 1  # [bos, -200] or [-200]
    assert out["labels"][:n_masked] == [IGNORE_INDEX] * n_masked
    assert out["input_ids"][n_masked - 1] == IMAGE_TOKEN_INDEX
    assert out["labels"][n_masked:] == out["input_ids"][n_masked:]
    assert tok.decode(out["labels"][n_masked:]) == "A red square.\n"  # no EOS in pretraining


@pytest.mark.parametrize("name", ["phi", "qwen2_instruct", "gemma", "llama"])
def test_image_token_placement(name, toks):
    t = get_template(name)
    tok = toks[name]
    adds_bos = TOKENIZERS[name][4]
    ids = t.encode(TWO, tok)["input_ids"]
    before, after = t.render(TWO).split("<image>")
    prefix = tok(before)["input_ids"]
    suffix = tok(after)["input_ids"][1 if adds_bos else 0 :]  # each chunk's own bos is dropped
    assert ids == prefix + [IMAGE_TOKEN_INDEX] + suffix
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    if adds_bos:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert ids[: len(prefix)] == tok(before, add_special_tokens=False)["input_ids"]

    no_image = [{"from": "human", "value": "What is in the picture?"}, {"from": "gpt", "value": A1}]
    out = t.encode(no_image, tok)
    assert IMAGE_TOKEN_INDEX not in out["input_ids"]
    assert out["input_ids"] == tok(t.render(no_image))["input_ids"]
    assert len(_unmasked_spans(out["input_ids"], out["labels"])) == 1


def test_tokenizer_image_token_bos_quirk(toks):
    bos_tok, plain = toks["llama"], toks["phi"]
    a = bos_tok("a")["input_ids"][1:]
    b = bos_tok("b")["input_ids"][1:]
    bos = bos_tok.bos_token_id
    assert tokenizer_image_token("a<image>b<image>", bos_tok) == [bos, *a, -200, *b, -200]
    # An empty first chunk of a bos tokenizer is [bos]: the bos is still kept once.
    assert tokenizer_image_token("<image>b", bos_tok) == [bos, -200, *b]
    assert tokenizer_image_token("<image>b", plain) == [-200, *plain("b")["input_ids"]]
    assert tokenizer_image_token("<image>", plain) == [-200]


def test_eval_mode(toks):
    for name in ["phi", "llama"]:
        t = get_template(name)
        out = t.encode(TWO[:3], toks[name], mode="eval")
        assert out["labels"] is None
        assert out["prompt"] == GOLDEN[name][3]
        assert out["input_ids"] == tokenizer_image_token(out["prompt"], toks[name])
    with pytest.raises(TinyLlavaError, match="encode mode 'test'"):
        get_template("phi").encode(ONE, toks["phi"], mode="test")


def test_tokenization_mismatch_masks_the_whole_sample(toks, caplog):
    # An answer containing the separator splits its round in three: Factory stops counting
    # there, the counts disagree and the whole sample is masked.
    conv = [{"from": "human", "value": Q1}, {"from": "gpt", "value": "x ASSISTANT: y"}]
    with caplog.at_level(logging.WARNING, logger="tinyllava_edge.data.template"):
        out = get_template("phi").encode(conv, toks["phi"])
    assert set(out["labels"]) == {IGNORE_INDEX}
    assert "tokenization mismatch" in caplog.text


def test_mismatch_check_is_skipped_at_model_max_length():
    # Factory compares the counts only while the counted length is below model_max_length.
    tok = _build_tokenizer("phi")
    tok.model_max_length = 1
    conv = ONE + [{"from": "human", "value": Q2}, {"from": "gpt", "value": "x ASSISTANT: y"}]
    out = get_template("phi").encode(conv, tok)
    # Round 2 stops the count; round 1's answer is kept, everything after it masked.
    spans = _unmasked_spans(out["input_ids"], out["labels"])
    assert [tok.decode(s) for s in spans] == [" A red square.<|endoftext|>"]


def test_llama_non_legacy_tokenizer_shifts_later_rounds():
    # llama_template.py counts rounds after the first one token shorter when the tokenizer has
    # legacy=False (SentencePiece's prefix space). On a tokenizer without that effect the
    # counts then disagree and multi-turn samples are masked whole; one turn is unaffected.
    tok = _build_tokenizer("llama")
    tok.legacy = False
    t = get_template("llama")
    assert set(t.encode(TWO, tok)["labels"]) == {IGNORE_INDEX}
    out = t.encode(ONE, tok)
    assert len(_unmasked_spans(out["input_ids"], out["labels"])) == 1
