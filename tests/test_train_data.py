"""Training data: label masks, every bad-data case (error or counted skip), collation, sampling."""

import json

import pytest
import torch

from tinyllava_edge.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tinyllava_edge.data.shapes import write_dataset
from tinyllava_edge.data.template import get_template
from tinyllava_edge.errors import DataError
from tinyllava_edge.model import load_tokenizer
from tinyllava_edge.testing.checkpoints import build_miniature
from tinyllava_edge.train.data import (Collator, SampleChecker, SupervisedDataset, image_token_count,
                                       load_samples)
from tinyllava_edge.train.sampler import (LengthGroupedSampler, SeededRandomSampler,
                                          modality_length_grouped_indices)

IMAGE_TOKENS = 15  # the SigLIP miniature: (30 // 7)^2 patches, `patch` drops one


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    write_dataset(root / "data", n_train=8, n_val=2, n_test=2, image_size=32)
    mini = build_miniature("TinyLLaVA-TinyLlama-SigLIP", root / "mini")
    return {"root": root, "data": root / "data", "tokenizer": load_tokenizer(mini)}


def _checker(env, template="llama", max_length=2048, truncate=False):
    return SampleChecker(get_template(template), env["tokenizer"], env["data"], IMAGE_TOKENS, max_length, truncate)


def _good(question="What colour is the circle?", answer="red", image="images/train_000000.png"):
    return {"id": "x", "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def _write(env, name, records):
    path = env["root"] / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def test_image_token_count_matches_the_model():
    from tinyllava_edge.testing.checkpoints import miniature_config, random_model

    for tower, strategy in (("siglip", "patch"), ("siglip", "cls_patch"), ("clip", "patch")):
        config = miniature_config("llama", tower, 96, vision_feature_select_strategy=strategy)
        model = random_model(config)
        size = config.vision_config.image_size
        assert model.encode_images(torch.zeros(1, 3, size, size)).shape[1] == image_token_count(config)


def test_labels_cover_only_the_assistant_turns(env):
    tok = env["tokenizer"]
    checker = _checker(env)
    two_rounds = {"image": "images/train_000000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "3"}]}
    path = _write(env, "mask.json", [two_rounds])
    samples, _ = load_samples(path, checker, skip_bad=False)
    item = SupervisedDataset(samples, checker, _preprocess())[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    learned = [t for t in labels if t != IGNORE_INDEX]
    # exactly the answers with their end-of-answer token, nothing of the system prompt or questions
    assert tok.decode(learned).replace(" ", "") == "red</s>3</s>"
    starts = [i for i, t in enumerate(labels) if t != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    assert len(starts) == 2  # two separate supervised spans, one per assistant turn
    for i, t in enumerate(labels):
        assert t == IGNORE_INDEX or t == ids[i]  # labels are the ids themselves where not masked


def test_pretrain_template_learns_the_whole_caption(env):
    tok = env["tokenizer"]
    checker = _checker(env, template="pretrain")
    samples, _ = load_samples(env["data"] / "pretrain.json", checker, skip_bad=False)
    record = json.loads((env["data"] / "pretrain.json").read_text())[0]
    item = SupervisedDataset(samples, checker, _preprocess())[0]
    learned = [t for t in item["labels"].tolist() if t != IGNORE_INDEX]
    assert tok.decode(learned).strip() == record["conversations"][1]["value"]


def _preprocess():
    from tinyllava_edge.data.preprocess import PreprocessConfig

    return PreprocessConfig.siglip(size=30)


BAD_CASES = {
    "missing_image": (_good(image="images/nope.png"), "not found"),
    "image_without_token": ({"image": "images/train_000000.png", "conversations": [
        {"from": "human", "value": "What colour is the circle?"}, {"from": "gpt", "value": "red"}]}, "no '<image>'"),
    "image_token_without_image": ({"conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}, "but no 'image'"),
    "no_assistant_turn": ({"image": "images/train_000000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"}]}, "no assistant"),
    "too_long": (_good(question="What colour is the circle? " * 40), "over tokenizer_model_max_length 300"),
    "unreadable_image": (_good(image="broken.png"), "cannot be read"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_each_bad_record_is_an_error_naming_file_record_and_line(env, kind):
    (env["data"] / "broken.png").write_bytes(b"not a png")
    record, expected = BAD_CASES[kind]
    path = _write(env, f"bad_{kind}.json", [_good(), _good(), record, _good()])
    checker = _checker(env, max_length=300)
    with pytest.raises(DataError) as info:
        load_samples(path, checker, skip_bad=False)
    message = str(info.value)
    assert f"{path} record 2 (line " in message and expected in message and "--skip-bad" in message

    samples, report = load_samples(path, checker, skip_bad=True)
    assert len(samples) == 3 and report.records == 4 and report.kept == 3
    assert report.skipped == {kind: 1} and "record 2" in report.examples[0]


def test_truncate_cuts_over_long_samples_at_the_model_limit(env):
    long = _good(question="What colour is the circle? " * 40)
    path = _write(env, "long.json", [long, _good()])
    checker = _checker(env, max_length=200, truncate=True)
    samples, report = load_samples(path, checker, skip_bad=False)
    assert report.truncated == 1 and samples[0].length == 200
    item = SupervisedDataset(samples, checker, _preprocess())[0]
    assert item["input_ids"].shape[0] + IMAGE_TOKENS - 1 == 200 == item["labels"].shape[0] + IMAGE_TOKENS - 1


def test_broken_json_list_is_an_error_with_its_line(env):
    path = env["root"] / "broken.json"
    text = json.dumps([_good(), _good()], indent=1)
    path.write_text(text.replace('"gpt"', '"gpt" "oops"', 1))
    line = text[: text.index('"gpt"')].count("\n") + 1
    for skip in (False, True):  # a list cannot be read past its break, even with skip_bad
        with pytest.raises(DataError, match=rf"{path} line {line} column \d+: invalid JSON in record 0"):
            load_samples(path, _checker(env), skip_bad=skip)


def test_broken_jsonl_line_is_an_error_or_a_counted_skip(env):
    path = _write(env, "broken.jsonl", [_good(), '{"conversations": [', _good()])
    with pytest.raises(DataError, match=rf"{path} line 2 column \d+: invalid JSON"):
        load_samples(path, _checker(env), skip_bad=False)
    samples, report = load_samples(path, _checker(env), skip_bad=True)
    assert len(samples) == 2 and report.skipped == {"broken_json": 1}
    assert samples[1].source.index == 2 and samples[1].source.line == 3


def test_nothing_usable_is_an_error(env):
    path = _write(env, "all_bad.json", [_good(image="images/nope.png")])
    with pytest.raises(DataError, match="holds no usable record"):
        load_samples(path, _checker(env), skip_bad=True)
    with pytest.raises(DataError, match="does not exist"):
        load_samples(env["root"] / "absent.json", _checker(env), skip_bad=False)


def test_text_only_samples_get_a_zero_image_and_the_collator_pads_right(env):
    text_only = {"conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]}
    path = _write(env, "mixed.json", [_good(), text_only])
    checker = _checker(env)
    samples, report = load_samples(path, checker, skip_bad=False)
    assert report.with_image == 1 and report.kept == 2
    dataset = SupervisedDataset(samples, checker, _preprocess())
    assert dataset.modality_lengths[0] > 0 > dataset.modality_lengths[1]
    items = [dataset[0], dataset[1]]
    assert torch.count_nonzero(items[1]["images"]) == 0 and torch.count_nonzero(items[0]["images"]) > 0
    batch = Collator(pad_token_id=env["tokenizer"].pad_token_id)(items)
    lengths = [it["input_ids"].shape[0] for it in items]
    assert batch["images"].shape == (2, 3, 30, 30)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = min(range(2), key=lambda i: lengths[i])
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, lengths[short]:] == env["tokenizer"].pad_token_id).all()


def test_modality_grouping_keeps_batches_single_modality():
    lengths = [10 + i for i in range(13)] + [-(5 + i) for i in range(9)]
    gen = torch.Generator().manual_seed(0)
    order = modality_length_grouped_indices(lengths, batch_size=2, world_size=2, generator=gen)
    assert sorted(order) == list(range(len(lengths)))
    megabatches = [order[i:i + 4] for i in range(0, len(order), 4)]
    mixed = [mb for mb in megabatches if len({lengths[i] > 0 for i in mb}) > 1]
    assert len(mixed) <= 1  # only the joined leftovers may mix


def test_samplers_are_seeded_per_epoch():
    lengths = [3, -4, 5, 6, -7, 8, 9, -2]
    a, b = LengthGroupedSampler(lengths, 2, 1, seed=3), LengthGroupedSampler(lengths, 2, 1, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(8))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    r = SeededRandomSampler(8, seed=3)
    assert list(r) == list(SeededRandomSampler(8, seed=3)) and sorted(r) == list(range(8))
