"""``tinyllava-bench memory``: what each stage of the edge path costs in peak resident memory and
wall time, per model scale: export (--bits 16, --bits 4), quantize (--bits 4 from the 16-bit
bundle), load and one answer; each against the checkpoint's bytes on disk.

Every stage runs in its own process (the commands users type, `tinyllava-export` and
`tinyllava-quantize`, and `python -m tinyllava_edge.bench.memory BUNDLE RESULT.json` for load and
answer), and its peak is that process's maximum resident set size as the kernel reports it to
the parent (`os.wait4`), so nothing the driver holds is counted. Exports also record a peak per
stage of their own (manifest `stages`), copied into the results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tinyllava_edge.errors import TinyLlavaError

ANSWER_TOKENS = 16
_CLI = Path(sys.executable).parent


def checkpoint_bytes(checkpoint: Path) -> int:
    """Bytes of the checkpoint's weights files on disk."""
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


def run_measured(argv: list[str], log: Path) -> dict:
    """Run `argv` to the end; its wall time, exit status and peak resident memory (os.wait4)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise TinyLlavaError(f"{Path(argv[0]).name} {' '.join(argv[1:3])} failed (exit {process.returncode}): "
                             + " | ".join(tail))
    return {"seconds": round(seconds, 1), "peak_rss_bytes": peak}


def run_memory(model: str, cache_root: Path, *, answer_tokens: int = ANSWER_TOKENS, keep: bool = False) -> dict:
    """Measure every stage for `model` (a scale name or a checkpoint); returns the results dict.
    Bundles go to `<cache>/<scale>/memory/` and are removed afterwards unless `keep`."""
    from tinyllava_edge.bench.models import SCALES, resolve_model

    work = cache_root / model / "memory" if model in SCALES else cache_root / "memory" / Path(model).name
    work.mkdir(parents=True, exist_ok=True)
    stages: list[dict] = []
    if model in SCALES and not (cache_root / model / "checkpoint" / ".bench-ready").is_file():
        build = run_measured([sys.executable, "-c", "import sys; from pathlib import Path; "
                              "from tinyllava_edge.bench.models import SCALES; "
                              "SCALES.get(sys.argv[1]).build(Path(sys.argv[2]))", model,
                              str(cache_root / model / "checkpoint")], work / "build.log")
        stages.append({"stage": f"build {model}", **build})
    scale, checkpoint, _ = resolve_model(model, cache_root)
    size = checkpoint_bytes(checkpoint)
    export = str(_CLI / "tinyllava-export")
    plan = [
        ("export --bits 16", [export, "--model", str(checkpoint), "--out", str(work / "bundle-F16"), "--bits", "16",
                              "--overwrite"], work / "bundle-F16"),
        ("export --bits 4", [export, "--model", str(checkpoint), "--out", str(work / "bundle-Q4"), "--bits", "4",
                             "--overwrite"], work / "bundle-Q4"),
        ("quantize --bits 4", [str(_CLI / "tinyllava-quantize"), "--bundle", str(work / "bundle-F16"), "--out",
                               str(work / "bundle-Q4q"), "--bits", "4", "--overwrite"], work / "bundle-Q4q"),
    ]
    for name, argv, bundle in plan:
        figures = run_measured(argv, work / f"{name.replace(' ', '_')}.log")
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        stages.append({"stage": name, **figures, "bundle_bytes": _folder_bytes(bundle),
                       "per_stage": manifest.get("stages", []), "plan": manifest.get("memory_plan")})
    result_file = work / "answer.json"
    figures = run_measured([sys.executable, "-m", "tinyllava_edge.bench.memory", str(work / "bundle-Q4"),
                            str(result_file), str(answer_tokens)], work / "answer.log")
    answer = json.loads(result_file.read_text(encoding="utf-8"))
    stages.append({"stage": "load + one answer (4-bit bundle)", **figures, **answer})
    for s in stages:
        s["ratio_to_checkpoint"] = round(s["peak_rss_bytes"] / size, 2)
    if not keep:
        for _, _, bundle in plan:
            shutil.rmtree(bundle, ignore_errors=True)
    return {"scale": scale, "checkpoint": str(checkpoint), "checkpoint_bytes": size, "stages": stages,
            "machine": _machine()}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load}


def markdown_table(result: dict) -> str:
    """One row per stage: wall time, peak RSS, ratio to the checkpoint, and the costliest inner stage."""
    gib = 2**30
    rows = [f"{result['scale']}: checkpoint {result['checkpoint_bytes'] / gib:.2f} GiB on disk",
            "", "| stage | wall s | peak RSS GiB | x checkpoint | costliest inner stage (peak GiB, s) |",
            "|---|---|---|---|---|"]
    for s in result["stages"]:
        inner = max(s.get("per_stage") or [{}], key=lambda r: r.get("peak_rss_bytes", 0))
        detail = (f"{inner['stage']} ({inner['peak_rss_bytes'] / gib:.2f}, {inner['seconds']:.0f})"
                  if inner else (f"load {s['load_s']:.1f} s, RSS after load {s['rss_after_load'] / gib:.2f} GiB, "
                                 f"answer {s['answer_s']:.1f} s" if "load_s" in s else ""))
        rows.append(f"| {s['stage']} | {s['seconds']:.0f} | {s['peak_rss_bytes'] / gib:.2f} | "
                    f"{s['ratio_to_checkpoint']:.2f} | {detail} |")
    return "\n".join(rows)


def _answer(bundle: str, out: str, tokens: int) -> None:
    """Load `bundle`, answer one question about a 384 px image; write the figures to `out`: load
    and answer times, resident memory after each, and what it may be held against: the bytes of
    the files the runtime uses (its vision graph, external data included, and the LLM GGUF) plus
    the KV cache it allocated and the prefix states it stored."""
    import numpy as np

    from tinyllava_edge import load
    from tinyllava_edge.memory import peak_rss_bytes, rss_bytes

    image = np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8)
    started = time.perf_counter()
    vlm = load(bundle, device="cpu")
    load_s, after_load = time.perf_counter() - started, rss_bytes() or peak_rss_bytes()
    started = time.perf_counter()
    vlm.generate(image, "What is in the picture?", max_new_tokens=tokens)
    answer_s = time.perf_counter() - started
    after_answer = rss_bytes() or peak_rss_bytes()
    info = vlm.info()
    folder = Path(bundle)
    record = next(f for f in json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"]
                  if f["name"] == info["vision"])
    used = [folder / info["vision"], *[folder / e for e in record.get("external_data") or []], folder / info["llm"]]
    files = sum(p.stat().st_size for p in used)
    kv = int(info["kv_cache_mb"] * 2**20)
    store = vlm.backend.llm.prefix_store.bytes
    allowed = files + kv + store
    Path(out).write_text(json.dumps({
        "load_s": round(load_s, 2), "rss_after_load": after_load, "answer_s": round(answer_s, 2),
        "answer_tokens": tokens, "rss_after_answer": after_answer, "peak_in_process": peak_rss_bytes(),
        "files_used": [p.name for p in used], "files_bytes": files, "kv_cache_bytes": kv, "kv_type": info["kv_type"],
        "n_ctx": info["n_ctx"], "prefix_store_bytes": store, "image_tokens": info["image_tokens"],
        "ratio_after_load": round(after_load / allowed, 3), "ratio_after_answer": round(after_answer / allowed, 3),
    }), encoding="utf-8")


if __name__ == "__main__":
    _answer(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else ANSWER_TOKENS)
