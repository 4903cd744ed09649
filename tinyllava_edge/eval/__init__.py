"""Evaluation: benchmark files in their published formats, scoring, and a runner.

Benchmarks (exact names in :data:`BENCHMARKS`): ``shapes`` (the built-in synthetic set),
``vqav2``, ``gqa``, ``textvqa``, ``scienceqa`` (ScienceQA-IMG), ``pope``, ``mme``, ``mmvet``.

    from tinyllava_edge.eval import Sources, TorchPredictor, run_benchmark

    predictor = TorchPredictor("runs/tiny-shapes/model", batch_size=8, max_new_tokens=8)
    results = run_benchmark("shapes", predictor, Sources(questions=Path("data/test.json"),
                            image_folder=Path("data")), "runs/eval/shapes")

Nothing here imports torch at import time; :class:`TorchPredictor` imports it when made, and
any object with ``model_id``, ``batch_size`` and ``predict(requests) -> list[str]``
(:class:`Predictor`) can answer instead.
"""

# Each benchmark module registers its benchmarks in BENCHMARKS when imported: explicitly here.
from tinyllava_edge.eval import mmvet, scienceqa, shapes, vqa, yesno  # noqa: F401
from tinyllava_edge.eval.benchmark import BENCHMARKS, Benchmark, Truth, get_benchmark
from tinyllava_edge.eval.formats import Answer, BadData, BadRecordError, Question, Sources, read_answers
from tinyllava_edge.eval.normalize import normalize_answer
from tinyllava_edge.eval.predictor import Predictor, Request, RuntimePredictor, TorchPredictor
from tinyllava_edge.eval.runner import ANSWERS_FILE, MARKDOWN_FILE, RESULTS_FILE, run_benchmark, score_answers

__all__ = [
    "ANSWERS_FILE",
    "BENCHMARKS",
    "MARKDOWN_FILE",
    "RESULTS_FILE",
    "Answer",
    "BadData",
    "BadRecordError",
    "Benchmark",
    "Predictor",
    "Question",
    "Request",
    "RuntimePredictor",
    "Sources",
    "TorchPredictor",
    "Truth",
    "get_benchmark",
    "normalize_answer",
    "read_answers",
    "run_benchmark",
    "score_answers",
]
