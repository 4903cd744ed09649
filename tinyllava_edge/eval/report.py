"""The markdown report of a results dict (what ``results.md`` holds)."""

from __future__ import annotations

from typing import Any, Sequence

from tinyllava_edge.eval.benchmark import Benchmark, Table


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def headline(bench: Benchmark, metrics: dict | None) -> str:
    """``accuracy 61.20, f1 70.00`` (the benchmark's headline metrics), or why there are none."""
    if not metrics:
        return "not scored here"
    return ", ".join(f"{k} {fmt(metrics[k])}" for k in bench.headline if k in metrics)


def results_markdown(bench: Benchmark, results: dict) -> str:
    counts = results["counts"]
    metrics = results.get("metrics")
    parts = [
        f"# {bench.title}",
        "",
        f"model `{results.get('model') or '-'}`, greedy decoding; rates in percent.",
        "",
        markdown_table(
            ["answers", "scored", "skipped (bad data)", "headline"],
            [[counts["answers"], counts["scored"], results["skipped"]["count"], headline(bench, metrics)]],
        ),
    ]
    parts += ["", f"Scored as {results['scorer']}."]
    tables: list[Table] = bench.tables(metrics) if metrics else []
    for title, headers, rows in tables:
        parts += ["", f"## {title}", "", markdown_table(headers, rows)]
    if results.get("note"):
        parts += ["", results["note"]]
    if (results.get("submission") or {}).get("note"):
        parts += ["", results["submission"]["note"]]
    if results["skipped"]["records"]:
        parts += ["", "## Skipped records", ""]
        parts += [f"- {r}" for r in results["skipped"]["records"]]
    return "\n".join(parts) + "\n"
