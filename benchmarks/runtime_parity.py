"""Our runtime against raw llama.cpp on the same GGUF, in one process, interleaved; then decode with a
CPU-bound process running; then resident memory against the files and the KV cache (issue 19).

    python benchmarks/runtime_parity.py                                  # bench-scale Q4_K_M (built if missing)
    python benchmarks/runtime_parity.py --bundle runs/bench-scale/bundle-Q4_K_M --rounds 5 --json out.json

* **prefill / decode parity**: `tinyllava_edge.load(bundle)` and llama-cpp-python's `Llama` on the
  bundle's LLM GGUF, same context, same threads, same batch (512), same positions: the raw prompt
  is our prompt's token ids with the 728 image rows replaced by as many random token ids. Every
  run is cold (our image and KV caches emptied, `Llama.reset()`), rounds alternate the order.
  Ours runs twice per round: threads fixed at `--threads` (what raw llama.cpp gets) and chosen from
  the free cores (the default, runtime/threads.py). Prefill: positions / time of the prompt's
  decode (ours: `GenerationStats.prefill_ms`; raw: time to its first token); decode: tokens after
  the first / time from the first to the last. Floors: prefill >= 0.95x, decode >= 0.97x (fixed).
* **contention**: one `python -c "while True: pass"` process is started, and after `SETTLE_S`
  each engine answers a follow-up (the prompt prefix reused, so mostly decode) for at most
  `--contended-tokens` tokens or `CONTENDED_CAP_S` seconds; then the process is stopped. Floor: our
  default decode >= 0.4x its idle rate.
* **memory** (a fresh process): VmRSS after load and after one answer about a new image (the
  bundle's default vision graph), against the files the runtime reads plus the KV cache it made
  (floor 1.2x); with the KV cache size per context length and type (f16 / q8_0).

Prints one JSON document (and writes it with --json), with the CPU name and the load average
before and after: on a shared machine the ratios (measured interleaved) are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETTLE_S = 1.5  # lets /proc/stat see the busy process before our runtime looks at it
CONTENDED_CAP_S = 20.0
QUESTION = "What is in the picture?"
FOLLOW_UP = "What colour is the largest shape?"
CONTEXTS = (512, 1024, 2048, 4096)


def _log(message: str) -> None:
    print(f"[parity] {message}", file=sys.stderr, flush=True)


def _cpu() -> dict:
    from tinyllava_edge.runtime.devices import cpu_model_name

    return {"cpu": cpu_model_name(), "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())}


def _vm(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _bundle(args) -> Path:
    if args.bundle is not None:
        return args.bundle
    from tinyllava_edge.bench.models import bundles_for, resolve_model

    _, checkpoint, cache = resolve_model("bench-scale", args.cache)
    return bundles_for(checkpoint, cache, verify=False)[args.quant]


def _images(bundle: Path, count: int, folder: Path) -> list[str]:
    from tinyllava_edge.bench.speed import _synthetic_images

    size = json.loads((bundle / "manifest.json").read_text())["preprocess"]["size"][0]
    return _synthetic_images(folder, int(size), count)


def _ours(vlm, image: str, question: str, n: int, cold: bool) -> dict:
    if cold:
        vlm.clear_caches()
    backend, feed = vlm.backend, vlm.backend.feed
    marks: list[float] = []

    def timed_feed(segments):  # this process's CPU time around the prompt's decode (the first feed)
        first = not marks
        if first:
            marks.append(time.process_time())
        logits = feed(segments)
        if first:
            marks.append(time.process_time())
        return logits

    backend.feed = timed_feed
    try:
        _, stats = vlm.generate(image, question, max_new_tokens=n, return_stats=True)
        end = time.process_time()
    finally:
        del backend.feed
    return {"prefill_positions": stats.prefill_tokens, "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens": stats.decode_tokens, "decode_tokens_per_s": stats.decode_tokens_per_s,
            "ttft_ms": stats.ttft_ms, "threads": vlm.backend.llm.n_threads,
            "prefill_cpu_s": marks[1] - marks[0], "decode_cpu_s": end - marks[1]}


def _raw_ids(vlm, image_rows: np.ndarray, question: str, seed: int) -> list[int]:
    """Our prompt's ids with the image rows replaced by random token ids (same positions)."""
    from tinyllava_edge.runtime.vlm import question_text

    segments = vlm.prompt_segments([{"from": "human", "value": question_text(question, True)}], [image_rows])
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for segment in segments:
        ids += rng.integers(0, vlm.backend.n_vocab, len(segment)).tolist() if isinstance(segment, np.ndarray) \
            else list(segment)
    return ids


def _raw(llm, ids: list[int], n: int, cold: bool, cap_s: float | None = None) -> dict:
    if cold:
        llm.reset()
    started, cpu = time.perf_counter(), time.process_time()
    first = last = started
    first_cpu = last_cpu = cpu
    count = 0
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        llm.detokenize([token])
        last, last_cpu = time.perf_counter(), time.process_time()
        count += 1
        if count == 1:
            first, first_cpu = last, last_cpu
        if count >= n or (cap_s is not None and last - started > cap_s):
            break
    return {"prefill_positions": len(ids), "prefill_tokens_per_s": len(ids) / (first - started),
            "decode_tokens": count, "ttft_ms": (first - started) * 1e3,
            "decode_tokens_per_s": (count - 1) / (last - first) if count > 1 and last > first else None,
            "threads": llm.context_params.n_threads, "prefill_cpu_s": first_cpu - cpu,
            "decode_cpu_s": last_cpu - first_cpu}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def parity(bundle: Path, args) -> dict:
    import tinyllava_edge
    from llama_cpp import Llama

    from tinyllava_edge.bench.worker import _no_extra_bufts
    from tinyllava_edge.bundle import files_by_role

    manifest = json.loads((bundle / "manifest.json").read_text())
    gguf = bundle / files_by_role(manifest, "llm")[0]["name"]
    threads = args.threads
    vlm = tinyllava_edge.load(bundle, device="cpu", vision=args.vision)  # threads: from the free cores
    vlm.backend.stop_ids = frozenset()  # decode max_new_tokens whatever the model says, as the bench does
    adaptive = vlm.backend.free_cores
    if adaptive is None:
        raise SystemExit("error: the runtime did not choose its threads itself (n_threads fixed?)")
    adaptive.limit = threads
    _no_extra_bufts()
    raw = Llama(model_path=str(gguf), n_ctx=vlm.n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                n_ubatch=512, verbose=False)
    images = _images(bundle, 3 * args.rounds + 2, args.cache / "parity-images")
    n = args.max_new_tokens

    def ours(image: str, fixed: bool, cold: bool = True, question: str = QUESTION, cap: int | None = None) -> dict:
        backend = vlm.backend
        backend.free_cores = None if fixed else adaptive
        if fixed:
            backend.llm.set_threads(threads)
        try:
            return _ours(vlm, image, question, cap or n, cold)
        finally:
            backend.free_cores = adaptive

    if not args.no_parity:  # warm-up: both engines once (page cache, OpenMP threads, ORT arena)
        ours(images[-1], fixed=True)
        rows = vlm.encode_images([images[-1]])[0]
        _raw(raw, _raw_ids(vlm, rows, QUESTION, 10**6), n, cold=True)
    runs: dict[str, list[dict]] = {"ours fixed": [], "ours auto": [], "raw": []}
    for r in range(0 if args.no_parity else args.rounds):
        order = ["ours fixed", "raw", "ours auto"]
        order = order[r % 3:] + order[:r % 3]
        for name in order:
            image = images[3 * r + order.index(name)]
            if name == "raw":
                rows = vlm.encode_images([image])[0]
                result = _raw(raw, _raw_ids(vlm, rows, QUESTION, r), n, cold=True)
            else:
                result = ours(image, fixed=name == "ours fixed")
            runs[name].append(result)
            _log(f"round {r + 1}/{args.rounds} {name}: prefill {result['prefill_positions']} positions "
                 f"{result['prefill_tokens_per_s']:.1f} tok/s ({result['prefill_cpu_s']:.2f} CPU s), decode "
                 f"{result['decode_tokens_per_s'] or 0:.1f} tok/s ({result['decode_cpu_s']:.2f} CPU s, "
                 f"{result['threads']} threads)")
    for rs in runs.values():  # per CPU-second of this process: what a loaded machine distorts least at 1 thread
        for run in rs:
            run["prefill_per_cpu_s"] = run["prefill_positions"] / run["prefill_cpu_s"] if run["prefill_cpu_s"] else None
            run["decode_per_cpu_s"] = ((run["decode_tokens"] - 1) / run["decode_cpu_s"]
                                       if run["decode_cpu_s"] and run["decode_tokens"] > 1 else None)
    summary = {name: {"prefill_tokens_per_s": _median(rs, "prefill_tokens_per_s"),
                      "decode_tokens_per_s": _median(rs, "decode_tokens_per_s"),
                      "prefill_per_cpu_s": _median(rs, "prefill_per_cpu_s"),
                      "decode_per_cpu_s": _median(rs, "decode_per_cpu_s"),
                      "prefill_positions": _median(rs, "prefill_positions")} for name, rs in runs.items()}
    out = {"threads": threads, "gguf": str(gguf), "n_ctx": vlm.n_ctx, "runs": runs, "summary": summary,
           "prefill_ratio": _ratio(summary["ours fixed"]["prefill_tokens_per_s"], summary["raw"]["prefill_tokens_per_s"]),
           "decode_ratio": _ratio(summary["ours fixed"]["decode_tokens_per_s"], summary["raw"]["decode_tokens_per_s"]),
           "decode_ratio_auto": _ratio(summary["ours auto"]["decode_tokens_per_s"],
                                       summary["raw"]["decode_tokens_per_s"]),
           "prefill_ratio_cpu": _ratio(summary["ours fixed"]["prefill_per_cpu_s"], summary["raw"]["prefill_per_cpu_s"]),
           "decode_ratio_cpu": _ratio(summary["ours fixed"]["decode_per_cpu_s"], summary["raw"]["decode_per_cpu_s"])}
    if not args.no_contention:
        out["contention"] = contention(vlm, raw, ours, images, args)
    vlm.close()
    raw.close()
    return out


def contention(vlm, raw, ours, images: list[str], args) -> dict:
    """Decode of a follow-up (its image prefilled before) idle, then while one CPU-bound process runs."""
    image = images[-2]
    cap = args.contended_tokens
    ours(image, fixed=False)  # prefills this image; the follow-ups below reuse it
    rows = vlm.encode_images([image])[0]
    raw_ids = _raw_ids(vlm, rows, FOLLOW_UP, 7)
    _raw(raw, raw_ids[:-8], 2, cold=True)
    idle = {"ours auto": ours(image, fixed=False, cold=False, question=FOLLOW_UP, cap=cap),
            "raw": _raw(raw, raw_ids, cap, cold=False)}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(SETTLE_S)
        result = {"ours auto": ours(image, fixed=False, cold=False, question=FOLLOW_UP, cap=cap), "raw": None}
        result["ours auto"]["threads_chosen"] = vlm.backend.free_cores.current
        result["others_busy_cores"] = vlm.backend.free_cores.others_busy
        if not args.skip_contended_fixed:
            result["raw"] = _raw(raw, raw_ids, cap, cold=False, cap_s=CONTENDED_CAP_S)
    finally:
        busy.kill()
        busy.wait()
    result["idle"] = idle
    for name in ("ours auto", "raw"):
        if result.get(name):
            result[name]["of_idle"] = _ratio(result[name]["decode_tokens_per_s"], idle[name]["decode_tokens_per_s"])
            _log(f"contended {name}: decode {result[name]['decode_tokens_per_s'] or 0:.2f} tok/s "
                 f"({result[name]['threads']} threads) against {idle[name]['decode_tokens_per_s'] or 0:.2f} idle "
                 f"({idle[name]['threads']} threads): {result[name]['of_idle'] or 0:.2f}x")
    return result


def memory(bundle: Path, args) -> dict:
    """Run in a fresh process (--_memory): RSS after load and after one answer, and the KV table."""
    import tinyllava_edge
    from tinyllava_edge.bundle import files_by_role
    from tinyllava_edge.llamacpp import KV_TYPES, LlamaCppModel

    vlm = tinyllava_edge.load(bundle, device="cpu", vision=args.vision)
    info = vlm.info()
    manifest = vlm.backend.manifest
    files = {r["name"]: r["size"] for r in files_by_role(manifest, "llm") + files_by_role(manifest, "vision")
             if r["name"] in (info["llm"], info["vision"])}
    kv = vlm.backend.llm.kv_bytes
    after_load = _vm("VmRSS")
    parts_after_load = {"anon": _vm("RssAnon"), "file": _vm("RssFile")}
    image = _images(bundle, 1, args.cache / "parity-images")[0]
    _, stats = vlm.generate(image, QUESTION, max_new_tokens=args.max_new_tokens, return_stats=True)
    after_answer, peak = _vm("VmRSS"), _vm("VmHWM")
    parts_after_answer = {"anon": _vm("RssAnon"), "file": _vm("RssFile")}
    base = sum(files.values()) + kv
    with LlamaCppModel(bundle / info["llm"], vocab_only=True) as shapes:
        table = {t: {str(c): shapes.kv_bytes_per_token(t) * c for c in CONTEXTS} for t in KV_TYPES}
    vlm.close()
    return {"files": files, "kv_cache_bytes": kv, "n_ctx": info["n_ctx"], "kv_type": info["kv_type"],
            "image_positions": stats.prefill_tokens, "rss_after_load": after_load, "rss_after_answer": after_answer,
            "peak_rss": peak, "files_plus_kv": base, "rss_parts_after_load": parts_after_load,
            "rss_parts_after_answer": parts_after_answer, "prefix_store_bytes": vlm.backend.llm.prefix_store.bytes, "ratio_after_load": after_load / base,
            "ratio_after_answer": after_answer / base, "ratio_peak": peak / base, "kv_cache_table": table,
            "mem_available": info.get("memory_bound")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a GGUF bundle (default: bench-scale's, built under --cache)")
    parser.add_argument("--quant", default="Q4_K_M", choices=("F16", "Q8_0", "Q4_K_M"),
                        help="bench-scale bundle to use without --bundle (%(default)s)")
    parser.add_argument("--cache", type=Path, default=Path("runs"), help="bench-scale cache (%(default)s)")
    parser.add_argument("--vision", help="vision graph of the bundle (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (%(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens decoded per run (%(default)s)")
    parser.add_argument("--contended-tokens", type=int, default=16, help="tokens per contended run (%(default)s)")
    parser.add_argument("--skip-contended-fixed", action="store_true",
                        help="do not time raw llama.cpp at fixed threads under contention (slow: seconds per token)")
    parser.add_argument("--no-parity", action="store_true", help="skip the interleaved rounds")
    parser.add_argument("--no-contention", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundle = _bundle(args)
    if args._memory:
        print(json.dumps(memory(bundle, args)))
        return 0
    out = {"machine": {**_cpu(), "platform": platform.platform()}, "bundle": str(bundle)}
    if not args.no_memory:
        _log("memory (fresh process)")
        cmd = [sys.executable, __file__, "--_memory", "--bundle", str(bundle), "--cache", str(args.cache),
               "--max-new-tokens", str(args.max_new_tokens)] + (["--vision", args.vision] if args.vision else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        out["memory"] = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    if not (args.no_parity and args.no_contention):
        out["parity"] = parity(bundle, args)
    out["machine"]["loadavg_after"] = list(os.getloadavg())
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    p, m = out.get("parity", {"prefill_ratio": None}), out.get("memory", {})
    print(text)
    print(f"\nCPU {out['machine']['cpu']}, load {out['machine']['loadavg'][0]:.2f} -> "
          f"{out['machine']['loadavg_after'][0]:.2f}")
    if p["prefill_ratio"] is not None:
        print(f"prefill ours/raw {p['prefill_ratio']:.3f} (floor 0.95), decode ours/raw {p['decode_ratio']:.3f} "
              f"(floor 0.97; with threads from the free cores {p['decode_ratio_auto']:.3f}); per CPU-second: "
              f"prefill {p['prefill_ratio_cpu']:.3f}, decode {p['decode_ratio_cpu']:.3f}")
    contended = p.get("contention", {}).get("ours auto")
    if contended:
        print(f"contended decode: ours {contended['of_idle']:.2f}x idle (floor 0.4)")
    if "ratio_after_answer" in m:
        print(f"RSS after load {m['ratio_after_load']:.2f}x, after the answer {m['ratio_after_answer']:.2f}x, "
              f"peak {m['ratio_peak']:.2f}x files + KV ({m['files_plus_kv'] / 2**20:.0f} MiB; floor 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
