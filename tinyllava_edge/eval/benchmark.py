"""What a benchmark is, as data: how to read its questions and ground truth, how to score.

Each benchmark module (``vqa``, ``yesno``, ``scienceqa``, ``mmvet``, ``shapes``) builds one
:class:`Benchmark` per benchmark and adds it to :data:`BENCHMARKS` under its exact name; the
package ``__init__`` imports those modules, so importing ``tinyllava_edge.eval`` registers all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tinyllava_edge.eval.formats import Answer, BadData, Question, Sources, key_of
from tinyllava_edge.registry import Registry

# (title, column headers, rows) of one markdown table
Table = tuple[str, Sequence[str], Sequence[Sequence[Any]]]


def _by_question_id(question_id: Any, prompt: str) -> Any:
    return key_of(question_id)


@dataclass(frozen=True)
class Truth:
    """Ground truth of a benchmark: records under the key an answer is matched by.

    ``key(question_id, prompt)`` makes that key (most benchmarks: the question id; TextVQA and
    MME also need the question text, as LLaVA's scripts match them); it returns None when the
    answer cannot be matched at all.
    """

    source: Path
    records: Mapping[Any, Any]
    key: Callable[[Any, str], Any] = _by_question_id

    def find(self, question_id: Any, prompt: str) -> Any | None:
        key = self.key(question_id, prompt)
        return None if key is None else self.records.get(key)

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark. Metrics are plain JSON-able dicts; rates are in percent.

    ``read_questions(sources, bad)`` -> questions to ask, in file order;
    ``load_truth(sources, bad)`` -> :class:`Truth`, or None when the files given cannot be
    scored here (VQAv2 test-dev without annotations, MM-Vet: graded by GPT-4);
    ``score(pairs)`` -> metrics from (answer, ground-truth record) pairs;
    ``tables(metrics)`` -> markdown tables; ``headline`` names the metrics of the summary line;
    ``scorer`` says whose scoring code the metrics reproduce (recorded in every result);
    ``write_extras(answers, out_dir, questions)`` -> (files, facts): submission files in the
    benchmark's official format, and what a reader should know about them (recorded under
    ``submission``). ``questions`` are all the questions of the questions file, or None when
    no questions file was read (scoring an answers file without ``--questions``).
    """

    name: str
    title: str
    max_new_tokens: int  # default generation length; short answers need few tokens
    read_questions: Callable[[Sources, BadData], list[Question]]
    load_truth: Callable[[Sources, BadData], Truth | None]
    score: Callable[[list[tuple[Answer, Any]]], dict] | None  # None: never scored here
    tables: Callable[[dict], list[Table]]
    headline: tuple[str, ...]
    files_help: str  # which --questions / --image-folder / --annotations it reads
    scorer: str
    write_extras: Callable[[list[Answer], Path, list[Question] | None], tuple[dict[str, Path], dict]] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered under exactly ``name`` (TinyLlavaError listing the known ones)."""
    return BENCHMARKS.get(name)


def percent_row(name: str, m: Mapping[str, Any], *keys: str) -> list[Any]:
    """A table row: ``name`` then ``m[key]`` for each key (missing keys as "-")."""
    return [name, *(m.get(k, "-") for k in keys)]
