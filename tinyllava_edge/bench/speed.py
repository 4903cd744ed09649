"""`run_speed`: every contender on the same model, prompts and machine, in one run.

Rounds are interleaved (round r runs every contender once, in an order rotated by r, so drift
in the machine's speed spreads over all of them); each (round, contender) is a fresh subprocess
(load timed, one warm-up generation excluded, then the prompts), and the figures are medians
over rounds and prompts. The memory bandwidth is measured before the first and after the last
round; its median, or the highest bytes/s a contender's decode shows when that is higher
(roofline.py), divides the decode speeds (the roofline fraction).

TTFT comes in two columns: cold (nothing of an earlier prompt reused, every contender) and warm
(the system prompt of the previous prompt reused, where the contender can: our runtime and raw
llama.cpp keep the common token prefix; stock mtmd resets its context on every call, so it has
no warm figure). Cold and warm prompts use different images, so neither finds its image cached.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tinyllava_edge.bench.contenders import CONTENDERS, DEFAULT_CONTENDERS
from tinyllava_edge.bench.floors import check_floors
from tinyllava_edge.bench.models import BENCH_SCALE, bundles_for, resolve_model
from tinyllava_edge.bench.roofline import (bandwidth_ceiling, checkpoint_llm_bytes_per_token, gguf_bytes_per_token,
                                           measure_bandwidth, roofline_fraction)
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.runtime.devices import cpu_model_name

DEFAULT_ROUNDS = 3
DEFAULT_PROMPTS = 2
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_ACCURACY = 40
DEFAULT_TIMEOUT_S = 900
QUESTION = "What is in the picture?"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _shapes_items(data: Path, n: int) -> list[dict]:
    records = json.loads((data / "test.json").read_text())
    items = []
    for rec in records[:n]:
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        items.append({"image": str(data / rec["image"]), "question": question,
                      "answer": rec["conversations"][1]["value"]})
    return items


def _synthetic_images(folder: Path, size: int, count: int) -> list[str]:
    """Seeded noise PNGs at the tower's size (bench-scale has random weights: content is irrelevant)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"image-{size}-{i}.png"
        if not path.is_file():
            pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def _prompts(checkpoint: Path, data: Path | None, cache: Path, count: int) -> tuple[dict, list[dict]]:
    """(warm-up prompt, timed prompts): distinct images, so the warm-up never fills the image cache.
    `count` covers the cold and the warm prompts."""
    if data is not None:
        items = _shapes_items(data, 10**9)
        seen, picked = set(), []
        for item in reversed(items):  # from the end: the accuracy subset comes from the start
            if item["image"] not in seen:
                seen.add(item["image"])
                picked.append({"image": item["image"], "question": item["question"]})
            if len(picked) == count + 1:
                break
    else:
        size = json.loads((checkpoint / "config.json").read_text())["vision_config"]["image_size"]
        picked = [{"image": p, "question": QUESTION} for p in _synthetic_images(cache / "images", size, count + 1)]
    if len(picked) < count + 1:
        raise TinyLlavaError(f"need {count + 1} distinct images for warm-up and prompts, found {len(picked)}")
    return picked[0], picked[1:]


def _run_worker(spec: dict, timeout_s: float, n_threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tinyllava-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(n_threads), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run([sys.executable, "-m", "tinyllava_edge.bench.worker", str(spec_path),
                                   str(result_path)], env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            if proc.returncode == 0 or "error" in result:
                return result
        if proc.returncode != 0 or not result_path.is_file():
            lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
            return {"error": (lines[-1] if lines else f"exit code {proc.returncode}")[:300]}
        return json.loads(result_path.read_text())


def _summarise(name: str, rounds: list[dict], files: list[Path], bytes_per_token: int | None,
               bandwidth: float) -> dict:
    ok = [r for r in rounds if "error" not in r]
    contender = CONTENDERS.get(name)
    row = {"name": name, "family": contender.family, "gguf": contender.gguf, "describe": contender.describe,
           "rounds": len(ok), "errors": [r["error"] for r in rounds if "error" in r],
           "files": [str(f) for f in files], "disk_bytes": sum(f.stat().st_size for f in files if f.is_file()),
           "bytes_per_token": bytes_per_token}
    runs = [run for r in ok for run in r["runs"]]
    warm = [run for r in ok for run in r.get("warm", [])]
    cached = [run for r in ok for run in r["cached"]]
    row.update({
        "load_s": _median(r["load_s"] for r in ok),
        "image_encode_ms": _median(run.get("image_encode_ms") for run in runs),
        "ttft_ms": _median(run["ttft_ms"] for run in runs),
        "ttft_warm_ms": _median(run["ttft_ms"] for run in warm),
        "warm_reused": _median(run.get("prefix_reused") for run in warm),
        "ttft_cached_ms": _median(run["ttft_ms"] for run in cached),
        "prefill_tokens": _median(run["prefill_tokens"] for run in runs),
        "prefill_tokens_per_s": _median(run.get("prefill_tokens_per_s") for run in runs),
        "decode_tokens": _median(run["decode_tokens"] for run in runs),
        "decode_tokens_per_s": _median(run.get("decode_tokens_per_s") for run in runs),
        "peak_rss_mb": _median(r["peak_rss_mb"] for r in ok),
    })
    correct = [c for r in ok[:1] for c in r["correct"]]
    row["accuracy"] = 100.0 * sum(correct) / len(correct) if correct else None
    row["accuracy_n"] = len(correct)
    row["roofline_fraction"] = roofline_fraction(row["decode_tokens_per_s"], bytes_per_token, bandwidth)
    return row


def run_speed(model: str, *, data: str | os.PathLike | None = None, cache_root: str | os.PathLike = "runs",
              contenders: Sequence[str] = DEFAULT_CONTENDERS, rounds: int = DEFAULT_ROUNDS,
              prompts: int = DEFAULT_PROMPTS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
              accuracy: int = DEFAULT_ACCURACY, n_threads: int | None = None, bandwidth_gib: float = 1.0,
              verify: bool | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Benchmark every contender on `model` (a checkpoint dir or "bench-scale"); returns the results
    (see report.py for the table). `data`: a shapes dataset dir for the accuracy subset (its first
    `accuracy` test questions) and real images."""
    for name in contenders:
        CONTENDERS.get(name)  # an unknown name raises before any work, listing the known ones
    if rounds < 1 or prompts < 1 or max_new_tokens < 2:
        raise TinyLlavaError(f"rounds and prompts must be >= 1 and max_new_tokens >= 2, got {rounds}, {prompts}, "
                             f"{max_new_tokens}")
    data_dir = Path(data) if data is not None else None
    if data_dir is not None and not (data_dir / "test.json").is_file():
        raise TinyLlavaError(f"--data {data_dir} has no test.json; expected a dataset written by tinyllava-data")
    n_threads = n_threads or os.cpu_count() or 1
    scale, checkpoint, cache = resolve_model(model, Path(cache_root))
    bundles = bundles_for(checkpoint, cache, verify=scale != BENCH_SCALE if verify is None else verify)
    warmup, timed = _prompts(checkpoint, data_dir, cache, 2 * prompts)
    cold, warm = timed[:prompts], timed[prompts:]
    items = _shapes_items(data_dir, accuracy) if data_dir is not None and accuracy > 0 else []
    manifest = json.loads((bundles["F16"] / "manifest.json").read_text())
    image_tokens = next(f["n_tokens"] for f in manifest["files"] if f.get("role") == "vision")
    n_ctx = int(manifest["model"].get("max_length") or 2048)

    bandwidth = [measure_bandwidth(bandwidth_gib, threads=n_threads)]
    _log(f"memory bandwidth {bandwidth[0]['bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth[0]['probe']}, "
         f"{bandwidth_gib:g} GiB, {n_threads} threads)")
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    started = time.perf_counter()
    for r in range(rounds):
        order = list(contenders)[r % len(contenders):] + list(contenders)[:r % len(contenders)]
        for name in order:
            contender = CONTENDERS.get(name)
            spec = {"runner": contender.runner, **contender.spec(checkpoint, bundles), "prompts": cold,
                    "warm_prompts": warm, "warmup": warmup, "max_new_tokens": max_new_tokens, "n_threads": n_threads, "n_ctx": n_ctx,
                    "image_tokens": image_tokens, "template": manifest["template"],
                    "accuracy": items if r == 0 and contender.runner != "raw" else []}
            if contender.runner == "vlm":
                spec["options"] = {**spec.get("options", {}), "n_threads": n_threads}
            t = time.perf_counter()
            result = _run_worker(spec, timeout_s, n_threads)
            results[name].append(result)
            what = result.get("error") or " ".join(
                f"{k} {v:.1f}" for k, v in (("ttft_ms", _median(x["ttft_ms"] for x in result["runs"])),
                                            ("decode tok/s", _median(x.get("decode_tokens_per_s")
                                                                     for x in result["runs"])))
                if v is not None)
            _log(f"round {r + 1}/{rounds} {name}: {what} ({time.perf_counter() - t:.0f} s)")
    bandwidth.append(measure_bandwidth(bandwidth_gib, threads=n_threads))
    measured = statistics.median(b["bytes_per_s"] for b in bandwidth)

    rows = []
    for name in contenders:
        contender = CONTENDERS.get(name)
        files = contender.files(checkpoint, bundles)
        if contender.gguf is not None:
            per_token = gguf_bytes_per_token(files[0])
        elif name == "torch fp32":
            per_token = checkpoint_llm_bytes_per_token(checkpoint)
        else:
            per_token = None  # nf4 packs 4-bit blocks + absmax; bitsandbytes' CPU path dequantizes per call
        rows.append(_summarise(name, results[name], files, per_token, measured))
    bytes_per_s, source = bandwidth_ceiling(measured, [(r["decode_tokens_per_s"], r["bytes_per_token"]) for r in rows])
    for row in rows:
        row["roofline_fraction"] = roofline_fraction(row["decode_tokens_per_s"], row["bytes_per_token"], bytes_per_s)
    out = {
        "scale": scale, "model": str(checkpoint), "data": str(data_dir) if data_dir else None,
        "bundles": {k: str(v) for k, v in bundles.items()},
        "settings": {"rounds": rounds, "prompts": prompts, "max_new_tokens": max_new_tokens, "n_threads": n_threads,
                     "accuracy_questions": len(items), "image_tokens": image_tokens},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "processor": cpu_model_name()},
        "bandwidth": {"bytes_per_s": bytes_per_s, "measured_bytes_per_s": measured, "source": source,
                      "measurements": bandwidth, "gib": bandwidth_gib},
        "seconds": time.perf_counter() - started,
        "contenders": rows,
        "raw": results,
    }
    out["floors"] = check_floors(rows)
    return out
