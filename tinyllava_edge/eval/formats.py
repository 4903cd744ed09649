"""Records and file I/O shared by the benchmarks: questions, answers, bad-data policy.

Answers files are LLaVA's (``model_vqa_loader.py`` and siblings): JSON lines of
``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``, so LLaVA's and
TinyLLaVA_Factory's own scoring scripts read ours and we read theirs.

Every record keeps *where* it came from (``file, line N`` for JSON lines, ``file, <place>``
for one JSON document), so that a bad record is reported by file and line, or skipped and
counted when the caller asked for that (:class:`BadData`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from tinyllava_edge.errors import DataError

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # LLaVA docs/Evaluation.md
MAX_REPORTED_SKIPS = 50  # skips listed one by one in the results; all are counted


class BadRecordError(DataError):
    """One record of a benchmark file cannot be used; the message names file and line."""


class RecordError(Exception):
    """Raised while parsing one record; :meth:`BadData.records` turns it into a report."""


@dataclass(frozen=True)
class Question:
    """One question to ask. ``prompt`` is the question text given to the model (no ``<image>``)."""

    question_id: Any
    prompt: str
    image: Path | None
    where: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # The "prompt" written to the answers file when it should differ from `prompt` (ScienceQA's
    # scorer looks for "<image>" in it).
    answer_prompt: str | None = None


@dataclass(frozen=True)
class Answer:
    """One line of an answers file."""

    question_id: Any
    prompt: str
    text: str
    where: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sources:
    """The files a benchmark reads; which ones it needs depends on the benchmark."""

    questions: Path | None = None
    image_folder: Path | None = None
    annotations: Path | None = None
    split: str = "test"  # the split of a benchmark that names its splits (ScienceQA pid_splits)

    def require(self, name: str, what: str, option: str | None = None) -> Path:
        """The path ``name`` (questions / image_folder / annotations), which must exist."""
        path = getattr(self, name)
        flag = option or "--" + name.replace("_", "-")
        if path is None:
            raise DataError(f"this benchmark needs {flag}: {what}")
        if not Path(path).exists():
            raise DataError(f"{flag} {path} does not exist; expected {what}")
        return Path(path)


class BadData:
    """What to do with a bad record: raise :class:`BadRecordError` (default) or skip and count it."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.count = 0
        self.reports: list[str] = []
        self._seen: set[str] = set()

    def report(self, where: str, problem: str) -> None:
        message = f"{where}: {problem}"
        if not self.skip:
            raise BadRecordError(message)
        if message in self._seen:  # a file read twice (questions that are also the ground truth)
            return
        self._seen.add(message)
        self.count += 1
        if len(self.reports) < MAX_REPORTED_SKIPS:
            self.reports.append(message)

    def records(self, items, parse) -> Iterator[Any]:
        """``parse(where, record)`` for each (where, record); a :class:`RecordError` is reported."""
        for where, record in items:
            try:
                yield parse(where, record)
            except RecordError as err:
                self.report(where, str(err))

    def to_dict(self) -> dict:
        return {"count": self.count, "records": list(self.reports)}


# ---- reading -------------------------------------------------------------------------------

def iter_jsonl(path: Path, bad: BadData) -> Iterator[tuple[str, dict]]:
    """(``"file, line N"``, object) for each non-blank line; broken lines go to ``bad``."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    with handle:
        n = 0
        try:
            for n, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    bad.report(where, f"is not valid JSON ({err.msg} at column {err.colno})")
                    continue
                if not isinstance(obj, dict):
                    bad.report(where, f"is a JSON {type(obj).__name__}; expected an object {{...}}")
                    continue
                yield where, obj
        except UnicodeDecodeError as err:
            raise DataError(f"{path}, line {n + 1}: not UTF-8 text ({err.reason}); expected JSON lines") from None


def read_json(path: Path) -> Any:
    """One JSON document; a syntax error names the file and line (a document cannot be skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason}); expected JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None


def is_json_lines(path: Path) -> bool:
    """True for JSON lines: a ``.jsonl`` name, or content that is more than one JSON value
    (POPE's ``coco_pope_*.json`` are JSON lines under a ``.json`` name)."""
    if Path(path).suffix == ".jsonl":
        return True
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except json.JSONDecodeError as err:
        return err.msg == "Extra data"
    except UnicodeDecodeError:
        return False  # read_json names the problem
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return False


def get(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record[key]``, which must exist and be of ``kind`` (else :class:`RecordError`)."""
    if not isinstance(record, Mapping):
        raise RecordError(f"is a {type(record).__name__}; expected a JSON object")
    if key not in record:
        raise RecordError(f"has no {key!r} field (fields: {', '.join(sorted(map(str, record))) or 'none'})")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise RecordError(f"field {key!r} is {value!r}; expected {names}")
    return value


def question_id(record: Mapping[str, Any], key: str = "question_id") -> int | str:
    return get(record, key, (int, str))


def image_path(folder: Path | None, name: str) -> Path:
    return (Path(folder) / name) if folder is not None else Path(name)


def llava_questions(path: Path, folder: Path | None, bad: BadData, keep: tuple[str, ...] = ("category",)) -> list[Question]:
    """LLaVA's question files (``llava_*.jsonl``): ``{"question_id", "image", "text", ...}``.

    ``text`` is the prompt as given (LLaVA's files already end with the answer-format line);
    the fields named in ``keep`` go into the question's metadata.
    """

    def parse(where: str, rec: dict) -> Question:
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            raise RecordError(f"field 'image' is {image!r}; expected a file name")
        return Question(
            question_id=question_id(rec),
            prompt=get(rec, "text"),
            image=image_path(folder, image) if image else None,
            where=where,
            metadata={k: rec[k] for k in keep if k in rec},
        )

    return list(bad.records(iter_jsonl(path, bad), parse))


def key_of(question_id: Any) -> str:
    """Ids compare as strings: LLaVA writes ints where the annotations may hold strings."""
    return str(question_id)


# ---- answers files -------------------------------------------------------------------------

def answer_record(question: Question, text: str, model_id: str) -> dict:
    """One LLaVA answers line (``answer_id`` is random, as LLaVA's shortuuid is)."""
    return {
        "question_id": question.question_id,
        "prompt": question.answer_prompt if question.answer_prompt is not None else question.prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": dict(question.metadata),
    }


def write_answer(handle: IO[str], record: Mapping[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")


def read_answers(path: Path, bad: BadData) -> list[Answer]:
    """The answers of a LLaVA answers file (ours or LLaVA's / TinyLLaVA_Factory's)."""

    def parse(where: str, rec: dict) -> Answer:
        meta = rec.get("metadata")
        return Answer(
            question_id=question_id(rec),
            prompt=rec.get("prompt") if isinstance(rec.get("prompt"), str) else "",
            text=get(rec, "text"),
            where=where,
            metadata=meta if isinstance(meta, dict) else {},
        )

    return list(bad.records(iter_jsonl(Path(path), bad), parse))
