"""What a run leaves beside its checkpoint: `loss.png` and `train_summary.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tinyllava_edge.atomic import atomic_file, write_text

LOSS_PNG = "loss.png"
SUMMARY_JSON = "train_summary.json"


def loss_history(log_history: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(optimizer step, training loss) from the Trainer's log history."""
    return [(int(entry["step"]), float(entry["loss"])) for entry in log_history
            if "loss" in entry and "step" in entry]


def plot_loss(points: list[tuple[int, float]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker processes and CI
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 50 else None, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def write_summary(summary: dict[str, Any], out: Path) -> Path:
    return write_text(out, json.dumps(summary, indent=2) + "\n")
