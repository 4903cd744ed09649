"""The default model's floors: train `tiny-shapes` from nothing at each seed and score it on the test split.

    python benchmarks/tiny_shapes.py [--seeds 0 1 2] [--out runs/bench-tiny-shapes] [--json docs/results/tiny_shapes.json]

Each seed runs the command users run, as they run it: `tinyllava-train --preset tiny-shapes
--seed N` in a child process with the command's own defaults (the benchmark sets no OpenMP or
precision variables and removes an inherited OMP_WAIT_POLICY or GOMP_SPINCOUNT). The recipe's wall time is the
recipe's own figure (data, tokenizer and both training stages; the evaluation after it is not
counted), read from the run's recipe_summary.json; the command's whole wall time is printed beside it.

Floors (the robustness issue): every run >= 93 % exact match on the test split and every
question kind >= 85 %, the mean over the seeds >= 95 %, every run <= 10 minutes. Prints each run,
the mean and the worst case, and exits 1 when a floor is missed. Run it on an otherwise idle
machine: the times are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR_RUN, FLOOR_MEAN, FLOOR_KIND, FLOOR_SECONDS = 93.0, 95.0, 85.0, 600.0


def train_seed(seed: int, out: Path) -> dict:
    """Run `tinyllava-train --preset tiny-shapes` at `seed` into `out`; its summary plus the command's wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [str(Path(sys.executable).with_name("tinyllava-train")), "--preset", "tiny-shapes",
               "--output", str(out), "--seed", str(seed), "--overwrite", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: tinyllava-train exited {done.returncode}:\n{done.stdout[-2000:]}")
    summary = json.loads((out / "recipe_summary.json").read_text())
    return {"seed": seed, "train_wall_seconds": summary["train_wall_seconds"], "command_seconds": round(seconds, 1),
            "steps": summary["steps"], "precision": {k: s["precision"] for k, s in summary["stages"].items()},
            "threads": summary["threads"], "exact_match": summary["eval"]["exact_match"],
            "per_kind": summary["eval"]["per_kind"], "test_questions": summary["eval"]["n"],
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def floors(runs: list[dict]) -> dict[str, bool]:
    mean = statistics.fmean(r["exact_match"] for r in runs)
    return {
        f"every run >= {FLOOR_RUN:g} %": all(r["exact_match"] >= FLOOR_RUN for r in runs),
        f"every kind of every run >= {FLOOR_KIND:g} %": all(min(r["per_kind"].values()) >= FLOOR_KIND for r in runs),
        f"mean >= {FLOOR_MEAN:g} % (it is {mean:.2f})": mean >= FLOOR_MEAN,
        f"every run's training <= {FLOOR_SECONDS:.0f} s": all(r["train_wall_seconds"] <= FLOOR_SECONDS for r in runs),
    }


def table(runs: list[dict]) -> str:
    kinds = sorted({k for r in runs for k in r["per_kind"]})
    lines = ["| seed | test acc | " + " | ".join(kinds) + " | recipe wall | command wall |",
             "|---|---|" + "---|" * len(kinds) + "---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['exact_match']:.1f} | "
                     + " | ".join(f"{r['per_kind'][k]:.1f}" for k in kinds)
                     + f" | {r['train_wall_seconds']:.0f} s | {r['command_seconds']:.0f} s |")
    accs = [r["exact_match"] for r in runs]
    worst_kind = {k: min(r["per_kind"][k] for r in runs) for k in kinds}
    lines.append(f"| mean | {statistics.fmean(accs):.1f} | "
                 + " | ".join(f"{statistics.fmean(r['per_kind'][k] for r in runs):.1f}" for k in kinds) + " | | |")
    lines.append(f"| worst | {min(accs):.1f} | " + " | ".join(f"{worst_kind[k]:.1f}" for k in kinds)
                 + f" | {max(r['train_wall_seconds'] for r in runs):.0f} s | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the seeds to train (default: 0)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go, one folder per seed "
                        "(default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for seed in args.seeds:
            print(f"seed {seed}: tinyllava-train --preset tiny-shapes ...", file=sys.stderr, flush=True)
            runs.append(train_seed(seed, root / f"seed{seed}"))
            r = runs[-1]
            print(f"seed {seed}: {r['exact_match']:.2f} % in {r['train_wall_seconds']:.0f} s", file=sys.stderr,
                  flush=True)
    from tinyllava_edge.runtime.devices import cpu_model_name
    from tinyllava_edge.train.preset_recipes import recipe_description

    checks = floors(runs)
    accs = [r["exact_match"] for r in runs]
    figures = {
        "command": "python benchmarks/tiny_shapes.py --seeds " + " ".join(map(str, args.seeds)),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model_name()},
        "recipe": recipe_description("tiny-shapes"),
        "runs": runs, "mean": round(statistics.fmean(accs), 2), "worst": round(min(accs), 2),
        "floors": checks,
    }
    print(table(runs))
    print(json.dumps({"mean": figures["mean"], "worst": figures["worst"], "floors": checks}, indent=2))
    if args.json:
        from tinyllava_edge.atomic import write_text

        write_text(args.json, json.dumps(figures, indent=2) + "\n")
    missed = [name for name, ok in checks.items() if not ok]
    if missed:
        print("floor missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
