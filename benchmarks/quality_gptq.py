"""The torch GPTQ rows of the quantization report, measured in .venv-gptq (GPTQModel lives only there).

    .venv-gptq/bin/python benchmarks/quality_gptq.py --model runs/tiny-shapes/model --data runs/tiny-shapes/data \
        [--n 1000] [--group-size 128 ...] [--samples 128] [--work /tmp/quality] [--json docs/results/quality_gptq.json]
    python benchmarks/quality.py ... --gptq-json docs/results/quality_gptq.json      # merges the rows

Quantizes the checkpoint's LLM with `quantize_gptq` (4-bit, each `--group-size`, calibrated on
`--samples` conversations of the data's instruct.json with their images; reused from `--work` when
already there with the same settings) and measures it exactly as benchmarks/quality.py measures its
torch rows, with its own functions: the same `--n` test questions (seed 0), greedy, at most 8 new
tokens, 1 thread; size = `torch.save` of the state dict; agreement and KL against torch fp32, which
is run here too and recorded under `reference` so quality.py can check it is its own fp32 run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import figures, run_variant, subset  # noqa: E402  (benchmarks/quality.py)


def tokens_digest(run: dict) -> str:
    """sha256 of a run's greedy tokens: the same fp32 run gives the same digest in either environment."""
    return hashlib.sha256(json.dumps(run["tokens"]).encode()).hexdigest()


def gptq_checkpoint(model: Path, data: Path, work: Path, group_size: int | None, samples: int) -> Path:
    """The GPTQ checkpoint for these settings, made (or found) under `work`."""
    from tinyllava_edge.quant.torch_gptq import quantize_gptq

    out = work / f"gptq-g{group_size or 'auto'}-n{samples}"
    record = out / "quantization.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done["source"]["path"] == str(model) and done["calibration"]["samples"] == samples:
            return out
    quantize_gptq(model, out, data=data, group_size=group_size, n_samples=samples, overwrite=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the trained tiny-shapes checkpoint (fp32)")
    parser.add_argument("--data", type=Path, required=True, help="its shapes data folder (test.json, instruct.json)")
    parser.add_argument("--n", type=int, default=1000, help="questions from the test split (%(default)s)")
    parser.add_argument("--group-size", type=int, action="append",
                        help="GPTQ group size, repeatable (default: the largest dividing every LLM width)")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (%(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quality"), help="where GPTQ checkpoints go")
    parser.add_argument("--json", type=Path, default=Path("docs/results/quality_gptq.json"), help="output")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import tinyllava_edge
    from tinyllava_edge.model.bnb import serialized_size

    torch.set_num_threads(1)
    questions = subset(args.data, args.n)
    print("torch fp32 ...", file=sys.stderr, flush=True)
    vlm = tinyllava_edge.load(args.model, device="cpu", n_threads=1)
    ref = run_variant(vlm, questions, args.data)
    vlm.close()
    reference = figures(ref, ref, questions)
    results = []
    for group in args.group_size or [None]:
        started = time.perf_counter()
        folder = gptq_checkpoint(args.model, args.data, args.work, group, args.samples)
        record = json.loads((folder / "quantization.json").read_text())
        name = f"torch GPTQ 4-bit g{record['group_size']}"
        print(f"{name} ({time.perf_counter() - started:.1f} s to make or find) ...", file=sys.stderr, flush=True)
        vlm = tinyllava_edge.load(folder, device="cpu", n_threads=1)
        size = serialized_size(vlm.backend.model)
        run = run_variant(vlm, questions, args.data)
        vlm.close()
        disk = sum((folder / f).stat().st_size for f in ("model.safetensors", "language_model/model.safetensors"))
        results.append({"variant": name, "size_bytes": size, "files": "state dict (torch.save)",
                        "safetensors_bytes": disk, **figures(run, ref, questions),
                        "gptq": {k: record[k] for k in ("bits", "group_size", "quantized_linears", "calibration",
                                                         "quantize_seconds", "seconds", "fidelity", "gptqmodel")},
                        "path": str(folder)})
        r = results[-1]
        print(f"  {r['accuracy']:.1f} %  agreement {r['greedy_token_agreement']:.2f} %", file=sys.stderr)
    out = {
        "model": str(args.model), "data": str(args.data), "questions": len(questions),
        "settings": {"max_new_tokens": 8, "threads": 1, "calibration_samples": args.samples},
        "reference": {"variant": "torch fp32", "accuracy": reference["accuracy"], "per_kind": reference["per_kind"],
                      "tokens_sha256": tokens_digest(ref), "seconds": ref["seconds"],
                      "size_bytes": serialized_size(tinyllava_edge.load(args.model, device="cpu").backend.model)},
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
