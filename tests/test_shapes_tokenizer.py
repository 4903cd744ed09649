"""The shapes byte-level BPE tokenizer: layout, offline loading, exact round trips, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

from tinyllava_edge.data import shapes  # noqa: E402
from tinyllava_edge.data.shapes_tokenizer import (  # noqa: E402
    DEFAULT_VOCAB_SIZE,
    SYSTEM_PROMPT,
    train_shapes_tokenizer,
)
from tinyllava_edge.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_shapes_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def fast(tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def auto(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def dataset_strings() -> list[str]:
    """Every string a record can hold, alone and inside the chat template."""
    samples = shapes.generate("test", 60, seed=1, image_size=32)
    strings = [f"<image>\n{q}" for q in shapes.all_questions()]
    strings += list(shapes.ANSWERS) + [f" {a}" for a in shapes.ANSWERS]
    strings += sorted({s.caption for s in samples}) + shapes.sample_captions(50, seed=9)
    strings += [
        f"{SYSTEM_PROMPT} USER: <image>\n{s.question} ASSISTANT: {s.answer}</s>" for s in samples
    ]
    return strings


def test_special_tokens_at_llama_ids(fast):
    assert [fast.id_to_token(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    # BPE stops merging once every word the generator uses is one token (510 here)
    assert 480 <= fast.get_vocab_size() <= DEFAULT_VOCAB_SIZE
    assert fast.encode("<image>\nWhat").ids[:2] == [1, 4]


def test_loads_with_auto_tokenizer(auto, fast):
    assert len(auto) == fast.get_vocab_size()
    assert (auto.unk_token_id, auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        0, 1, 2, 3,
    )  # fmt: skip
    assert auto.convert_tokens_to_ids("<image>") == 4
    assert auto.model_max_length == 2048
    # BOS in front as Llama's tokenizers put it (the llama template counts it); no EOS
    assert auto("yes").input_ids == [1, auto.convert_tokens_to_ids("yes")]


def test_every_dataset_string_round_trips(fast, auto):
    strings = dataset_strings()
    encodings = fast.encode_batch(strings)
    decoded = fast.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
    assert [s for s, d in zip(strings, decoded) if "<s>" + s != d] == []
    ids = auto(strings).input_ids
    assert [s for s, i in zip(strings, ids) if auto.decode(i) != "<s>" + s] == []
    assert all(0 not in e.ids for e in encodings)  # byte-level: nothing is unknown


def test_other_text_round_trips(fast):
    for text in ["Ünïcødé 日本語 🙂", "tabs\tand\n\nnewlines  ", "What is a hexagon?"]:
        assert fast.decode(fast.encode(text).ids, skip_special_tokens=True) == text


def test_answers_and_template_words_are_short(fast):
    for answer in shapes.ANSWERS:
        assert len(fast.encode(answer).ids) == 2, answer  # the BOS and the answer
        assert len(fast.encode(f" {answer}").ids) == 2, answer
    assert len(fast.encode(f"{SYSTEM_PROMPT} USER:").ids) <= 41
    question = "<image>\nIs the red circle left or right of the blue square?"
    assert len(fast.encode(question).ids) <= 17


def test_training_is_deterministic(tokenizer_dir, tmp_path):
    again = train_shapes_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_config_names_the_fast_tokenizer(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")


def test_bad_arguments_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        train_shapes_tokenizer(tmp_path / "small", vocab_size=100)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        train_shapes_tokenizer(a_file)
