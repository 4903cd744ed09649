"""Sizes for people: what every summary, model card and report prints."""

from __future__ import annotations


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, bytes shown whole)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
