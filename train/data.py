"""LLaVA-format training data: read, check every record up front, load images lazily, collate.

A record is TinyLLaVA_Factory's (tinyllava/data/dataset.py, LLaVA's format)::

    {"id": "...", "image": "relative/path.png",            # "image" absent: a text-only sample
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
                       {"from": "gpt", "value": "..."}, ...]}

in a `.json` file (one list) or a `.jsonl` file (one record a line). Every record is checked
before training starts, so a bad one is reported by file, record index and line instead of
failing hours in: broken JSON, a missing or unreadable image, an image without `<image>` in the
text (or `<image>` without an image), no assistant turn, nothing left to learn after masking,
or too long for `tokenizer_model_max_length` once the image tokens are counted. Each is an error
(:class:`DataError`), or with `skip_bad` a counted skip. A broken `.json` list cannot be read
past the break, so it is always an error; a broken `.jsonl` line can be skipped.

Tokens and labels come from :meth:`Template.encode` (labels masked to the answers exactly as
the Factory masks them). Text-only samples get an all-zero image, as the Factory's
`LazySupervisedDataset` gives them; the model's forward uses one image per row and skips it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
from tinyllava_edge.data.template import Template
from tinyllava_edge.errors import DataError, TinyLlavaError

logger = logging.getLogger(__name__)

ASSISTANT_ROLES = ("gpt", "assistant")


@dataclass(frozen=True)
class Source:
    """Where a record came from, for messages: file, 0-based record index, 1-based line."""

    file: Path
    index: int
    line: int

    def __str__(self) -> str:
        return f"{self.file} record {self.index} (line {self.line})"


@dataclass
class DataReport:
    """What checking the data found: kept samples, skips by reason, truncations."""

    file: str
    records: int = 0
    kept: int = 0
    with_image: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few skip messages

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "records": self.records, "kept": self.kept, "with_image": self.with_image,
                "text_only": self.kept - self.with_image, "truncated": self.truncated,
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "skip_examples": list(self.examples)}


class BadRecord(Exception):
    """One record that cannot be used; `kind` counts it, the message names it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# -- reading ----------------------------------------------------------------------------------------

def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _json_error(path: Path, exc: json.JSONDecodeError, what: str = "") -> str:
    return f"{path} line {exc.lineno} column {exc.colno}: invalid JSON{what} ({exc.msg})"


def iter_records(path: Path, skip_bad: bool, report: DataReport) -> Iterator[tuple[Source, Any]]:
    """(source, record) for each record of a `.json` list or a `.jsonl` file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"training data {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"training data {path} is a directory; expected a .json or .jsonl file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"training data {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text, skip_bad, report)
    else:
        yield from _iter_json_list(path, text)


def _iter_jsonl(path: Path, text: str, skip_bad: bool, report: DataReport) -> Iterator[tuple[Source, Any]]:
    index = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = Source(path, index, number)
        index += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"{path} line {number} column {exc.colno}: invalid JSON ({exc.msg})"
            if not skip_bad:
                raise DataError(message + "; fix the line or pass --skip-bad to skip it") from None
            report.records += 1
            _count_skip(report, "broken_json", message)
            continue
        yield source, record


def _iter_json_list(path: Path, text: str) -> Iterator[tuple[Source, Any]]:
    # raw_decode element by element, so every record's line is known and a break is located.
    decoder = json.JSONDecoder()
    i = _skip_space(text, 0)
    if i >= len(text) or text[i] != "[":
        line = _line_of(text, i)
        raise DataError(f"{path} line {line}: expected a JSON list of records (or use a .jsonl file)")
    i = _skip_space(text, i + 1)
    index = 0
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(_json_error(path, exc, f" in record {index}") + "; a broken .json list "
                            "cannot be read past the break (fix it, or use .jsonl to skip bad lines)") from None
        yield Source(path, index, _line_of(text, i)), record
        index += 1
        i = _skip_space(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_space(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if _skip_space(text, i + 1) != len(text):
                raise DataError(f"{path} line {_line_of(text, i + 1)}: invalid JSON (text after the list)")
            return
        raise DataError(f"{path} line {_line_of(text, i)}: invalid JSON after record {index - 1} "
                        "(expected ',' or ']')")


def _count_skip(report: DataReport, kind: str, message: str) -> None:
    report.skipped[kind] += 1
    if len(report.examples) < 10:
        report.examples.append(message)
    logger.warning("skipped: %s", message)


# -- checking ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """A record that passed the checks; `length` counts tokens with the image's (the model's view)."""

    source: Source
    record: dict
    image: Path | None
    length: int
    keep_tokens: int | None  # cut input_ids/labels here (truncation), None: keep all


def _check_messages(record: Any) -> list[dict]:
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"is a JSON {type(record).__name__}; expected an object")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("no_conversations", "has no 'conversations' list of messages")
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise BadRecord("bad_message", f"message {i} is not an object with a string 'value'")
    if not any(m.get("from") in ASSISTANT_ROLES for m in conversations):
        raise BadRecord("no_assistant_turn", "has no assistant ('gpt') turn to learn from")
    return conversations


def _check_image(record: dict, conversations: list[dict], image_folder: Path) -> Path | None:
    mentions = sum(DEFAULT_IMAGE_TOKEN in m["value"] for m in conversations)
    if "image" not in record:
        if mentions:
            raise BadRecord("image_token_without_image", f"has '{DEFAULT_IMAGE_TOKEN}' in its text but no 'image'")
        return None
    name = record["image"]
    if not isinstance(name, str) or not name:
        raise BadRecord("bad_image_field", f"has 'image' {name!r}; expected a relative file path")
    if not mentions:
        raise BadRecord("image_without_token",
                        f"gives image {name!r} but has no '{DEFAULT_IMAGE_TOKEN}' in its text")
    path = image_folder / name
    if not path.is_file():
        raise BadRecord("missing_image", f"image {name!r} not found in {image_folder}")
    from PIL import Image, UnidentifiedImageError

    try:  # opening reads the header only; the pixels are read when the sample is used
        Image.open(path).close()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadRecord("unreadable_image", f"image {name!r} cannot be read ({exc})") from None
    return path


class SampleChecker:
    """Turns records into :class:`Sample` or raises :class:`BadRecord`."""

    def __init__(self, template: Template, tokenizer: Any, image_folder: Path, image_tokens: int,
                 max_length: int, truncate: bool):
        self.template = template
        self.tokenizer = tokenizer
        self.image_folder = image_folder
        self.image_tokens = image_tokens  # rows one image becomes (replacing its one placeholder)
        self.max_length = max_length
        self.truncate = truncate

    def encode(self, conversations: list[dict]) -> dict:
        try:
            return self.template.encode(conversations, self.tokenizer, mode="train")
        except TinyLlavaError as exc:
            raise BadRecord("bad_conversation", str(exc)) from None

    def check(self, source: Source, record: Any) -> Sample:
        conversations = _check_messages(record)
        image = _check_image(record, conversations, self.image_folder)
        encoded = self.encode(conversations)
        ids, labels = encoded["input_ids"], encoded["labels"]
        placeholders = ids.count(IMAGE_TOKEN_INDEX)
        if placeholders != (1 if image is not None else 0):
            raise BadRecord(
                "image_placeholders",
                f"renders to {placeholders} image placeholders with template {self.template.name!r}; "
                f"expected {1 if image is not None else 0} (one image per sample)",
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRecord("nothing_to_learn", "has no answer tokens left after masking (empty answers, or "
                            "a tokenization mismatch: see the template warning)")
        extra = self.image_tokens - 1 if image is not None else 0
        length = len(ids) + extra
        keep = None
        if length > self.max_length:
            if not self.truncate:
                raise BadRecord(
                    "too_long",
                    f"is {length} tokens with its image, over tokenizer_model_max_length {self.max_length} "
                    "(pass --truncate to cut it as TinyLLaVA_Factory does)",
                )
            keep = self.max_length - extra
            if image is not None and ids.index(IMAGE_TOKEN_INDEX) >= keep:
                raise BadRecord("too_long", f"has its image placeholder past tokenizer_model_max_length {self.max_length}")
            length = self.max_length
        return Sample(source, record, image, length, keep)


def load_samples(path: Path, checker: SampleChecker, skip_bad: bool) -> tuple[list[Sample], DataReport]:
    report = DataReport(file=str(path))
    samples: list[Sample] = []
    for source, record in iter_records(path, skip_bad, report):
        report.records += 1
        try:
            sample = checker.check(source, record)
        except BadRecord as bad:
            message = f"{source}: {bad}"
            if not skip_bad:
                raise DataError(message + " (pass --skip-bad to skip bad records)") from None
            _count_skip(report, bad.kind, message)
            continue
        samples.append(sample)
        report.with_image += sample.image is not None
        report.truncated += sample.keep_tokens is not None
    report.kept = len(samples)
    if not samples:
        raise DataError(f"{path} holds no usable record ({report.records} read, "
                        f"{sum(report.skipped.values())} skipped)")
    return samples, report


# -- the dataset and collator -------------------------------------------------------------------------

class SupervisedDataset(Dataset):
    """Checked samples, tokenized again and their images read when used (Factory's lazy dataset)."""

    def __init__(self, samples: Sequence[Sample], checker: SampleChecker, preprocess_config: PreprocessConfig):
        self.samples = list(samples)
        self.checker = checker
        self.preprocess_config = preprocess_config

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """Token length per sample, negative for text-only ones (Factory's sign convention)."""
        return [s.length if s.image is not None else -s.length for s in self.samples]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.samples[i]
        encoded = self.checker.encode(sample.record["conversations"])
        ids, labels = encoded["input_ids"], encoded["labels"]
        if sample.keep_tokens is not None:
            ids, labels = ids[: sample.keep_tokens], labels[: sample.keep_tokens]
        if sample.image is not None:
            try:
                # Truncated files are decoded, not refused (data/images.py): Factory's behaviour for
                # training sets, where a few damaged files should not stop a long run.
                pixels = preprocess(sample.image, self.preprocess_config, allow_truncated=True)[0]
            except TinyLlavaError as exc:
                raise DataError(f"{sample.source}: {exc}") from None
        else:
            height, width = self.preprocess_config.size
            pixels = np.zeros((3, height, width), dtype=np.float32)
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "images": torch.from_numpy(pixels)}


@dataclass(frozen=True)
class Collator:
    """Right-pads a batch: input_ids with the pad id, labels with IGNORE_INDEX; stacks images.

    The attention mask comes from the lengths, not from `input_ids != pad` as in the Factory,
    which then needed a trick for tokenizers whose pad is their eos (phi-2): same result, no trick.
    """

    pad_token_id: int

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(item["input_ids"].shape[0] for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = item["input_ids"].shape[0]
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        images = torch.stack([item["images"] for item in batch])  # (B, 3, H, W)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "images": images}


def image_token_count(config) -> int:
    """Rows one image becomes in the LLM input, from the config alone (no forward pass)."""
    from tinyllava_edge.model.vision import tower_for_config

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    tokens = side * side + (1 if tower_for_config(vision).has_cls_token else 0)
    tokens += getattr(vision, "num_register_tokens", 0) or 0
    if config.vision_feature_select_strategy == "patch":
        tokens -= 1
    return tokens


def default_image_folder(data: str | os.PathLike, image_folder: str | os.PathLike | None) -> Path:
    return Path(image_folder) if image_folder is not None else Path(data).parent
