"""Load on tinyllava-serve: C concurrent clients x N image questions, 1 and 2 workers, and the floors.

    python benchmarks/serve_load.py --model bundles/q4 --json docs/results/serve_load.json
    python benchmarks/serve_load.py --model bundles/q4 --follow-up-model runs/bench-scale/bundle-Q4_K_M
    python benchmarks/serve_load.py --model runs/tiny-shapes/bundle --clients 1 4 --requests 5

For each worker count the server runs as its own process (the real command, on a free loopback
port) and every client is a thread with its own HTTP connection, streaming each answer
(``stream: true`` with usage) so time to first token is seen as a client sees it. A request is a
new conversation: one shapes test image (from a pool of `--images`) and a question about it.
Figures per (workers, clients): errors, latency p50 / p95, TTFT p50, requests/s, generated
tokens/s, and the server's RSS (peak, after the first `clients` requests, at the end).

The floors (issue 20), each measured here and never in a timed test:

* decode: tokens/s through the server (1 client, streamed, from the first token to the last, as
  the client receives them) >= 0.95x ``VLM.generate`` in this process on the same prompts, same
  bundle and threads. Both decode `--decode-tokens` tokens whatever the model says (vLLM's
  ``ignore_eos`` through the API, the stop tokens cleared in process, as tinyllava-bench does):
  the default model answers in two or three tokens, too few to time. `--decode-rounds` rounds,
  each the same prompts here and then through the server; the median of the rounds' ratios;
* follow-up: a second question about the same image (the first answer in the history, and the
  image again, as an OpenAI client sends the conversation) has TTFT <= 0.2x the first question's
  (medians over `--follow-ups` fresh images); with the prompt positions each had to evaluate
  (the server's `prompt_tokens` less `cached_tokens`), which bound the ratio on a model whose
  question text costs more than its image (docs/serve.md);
* 16 x 20: no errors, and RSS after the run <= 1.1x RSS after the first 16 requests.

Exits 1 when a request failed or a floor is missed. Requests go to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DECODE_FLOOR, FOLLOW_UP_FLOOR, RSS_FLOOR = 0.95, 0.2, 1.10


@dataclass
class Result:
    latency_s: float
    ttft_s: float
    completion_tokens: int
    decode_s: float  # first content token to the finish chunk
    evaluated: int = 0  # prompt positions the server evaluated: prompt_tokens less the cached ones


@dataclass
class Run:
    workers: int
    clients: int
    requests: int
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    rss_after_first_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0

    def figures(self) -> dict:
        lat = [r.latency_s for r in self.results]
        tokens = sum(r.completion_tokens for r in self.results)
        pct = (lambda q: float(np.percentile(lat, q))) if lat else (lambda q: float("nan"))
        return {"workers": self.workers, "clients": self.clients, "requests": self.clients * self.requests,
                "errors": len(self.errors), "latency_p50_s": pct(50), "latency_p95_s": pct(95),
                "ttft_p50_s": statistics.median(r.ttft_s for r in self.results) if lat else float("nan"),
                "requests_per_s": len(lat) / self.wall_s, "tokens_per_s": tokens / self.wall_s,
                "rss_after_first_mb": self.rss_after_first_mb, "rss_end_mb": self.rss_end_mb,
                "rss_peak_mb": self.rss_peak_mb}


def shapes_questions(n_images: int) -> list[tuple[str, str, str]]:
    """(data URI, question, follow-up question) per image of the shapes test split."""
    from tinyllava_edge.data.shapes import generate

    by_image: dict[int, list] = {}
    for sample in generate("test", n_images * 6, seed=0):
        by_image.setdefault(sample.index, []).append(sample)
    out = []
    for samples in list(by_image.values())[:n_images]:
        buf = io.BytesIO()
        samples[0].image.save(buf, "PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        follow = samples[1].question if len(samples) > 1 else "How many objects are there?"
        out.append((uri, samples[0].question, follow))
    return out


def proc_status_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def start_server(model: Path, workers: int, threads: int | None, queue: int, log: Path) -> tuple[subprocess.Popen,
                                                                                                      str]:
    args = [sys.executable, "-m", "tinyllava_edge.cli.serve", "--model", str(model), "--device", "cpu",
            "--port", "0", "--workers", str(workers), "--queue", str(queue), "--served-model-name", "bench"]
    if threads:
        args += ["--threads", str(threads)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    import httpx

    deadline = time.monotonic() + 300
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text()
        if url is None and " on http://" in text:
            url = "http://" + text.split(" on http://", 1)[1].split()[0].rsplit("/v1", 1)[0]
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start: {log.read_text()[-1500:]}")


def stream_chat(client, url: str, messages: list, max_tokens: int, **extra) -> tuple[Result, str]:
    """One streamed request; (timings, answer text)."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    began = time.perf_counter()
    first = finish = None
    text, usage = [], None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"status {resp.status_code}: {resp.read()[:200]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
                if choice["finish_reason"]:
                    finish = time.perf_counter()
    end = time.perf_counter()
    first = first or finish
    evaluated = usage["prompt_tokens"] - (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Result(end - began, first - began, usage["completion_tokens"], finish - first, evaluated), "".join(text)


def message(uri: str | None, text: str) -> dict:
    parts = [{"type": "text", "text": text}]
    if uri:
        parts.insert(0, {"type": "image_url", "image_url": {"url": uri}})
    return {"role": "user", "content": parts}


def load_run(url: str, pid: int, workers: int, clients: int, requests: int, questions, max_tokens: int) -> Run:
    import httpx

    run = Run(workers, clients, requests)
    lock = threading.Lock()
    done = [0]
    start = threading.Barrier(clients)

    def client_thread(k: int) -> None:
        with httpx.Client(timeout=600) as client:
            start.wait()
            for i in range(requests):
                uri, question, _ = questions[(k * 7 + i) % len(questions)]
                try:
                    result, _ = stream_chat(client, url, [message(uri, question)], max_tokens)
                except Exception as err:  # noqa: BLE001 - the benchmark counts every failure
                    with lock:
                        run.errors.append(f"client {k} request {i}: {' '.join(str(err).split())[:200]}")
                    continue
                with lock:
                    run.results.append(result)
                    done[0] += 1
                    if done[0] == clients:  # the first round: the baseline of the RSS floor
                        run.rss_after_first_mb = proc_status_mb(pid, "VmRSS")

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.wall_s = time.perf_counter() - began
    run.rss_end_mb = proc_status_mb(pid, "VmRSS")
    run.rss_peak_mb = proc_status_mb(pid, "VmHWM")
    return run


def follow_up_ratio(url: str, model: Path, questions, max_tokens: int, threads: int | None) -> dict:
    """Median TTFT of first questions (fresh images) and of their follow-ups, through the API; and
    the same pairs in process (ChatSession), what the runtime itself reaches without HTTP. The
    spread is the quartiles of each pair's own ratio."""
    import httpx

    import tinyllava_edge
    from tinyllava_edge.apps.serve.images import ImagePolicy, load_request_image

    firsts, follows, evaluated = [], [], []
    with httpx.Client(timeout=600) as client:
        for uri, question, follow in questions:
            first, answer = stream_chat(client, url, [message(uri, question)], max_tokens)
            history = [message(uri, question), {"role": "assistant", "content": answer}, message(None, follow)]
            second, _ = stream_chat(client, url, history, max_tokens)
            firsts.append(first.ttft_s)
            follows.append(second.ttft_s)
            evaluated.append((first.evaluated, second.evaluated))
    local_firsts, local_follows, local_evaluated = [], [], []
    with tinyllava_edge.load(model, device="cpu", n_threads=threads) as vlm:
        vlm.generate(None, "Hello.", max_new_tokens=2)  # warm-up
        for uri, question, follow in questions:
            chat = vlm.chat(max_new_tokens=max_tokens)
            image = load_request_image(uri, ImagePolicy(2**30, 2**30), "bench").decode()
            one = chat.ask(image, question, return_stats=True)[1]
            two = chat.ask(None, follow, return_stats=True)[1]
            local_firsts.append(one.ttft_ms / 1e3)
            local_follows.append(two.ttft_ms / 1e3)
            local_evaluated.append((one.prefill_tokens, two.prefill_tokens))
    first, follow = statistics.median(firsts), statistics.median(follows)
    pairs = np.array(follows) / np.array(firsts)
    return {"images": len(questions), "first_ttft_p50_s": first, "follow_up_ttft_p50_s": follow,
            "ratio": follow / first, "pair_ratio_quartiles": [float(q) for q in np.percentile(pairs, [25, 50, 75])],
            "in_process_first_ttft_p50_s": statistics.median(local_firsts),
            "in_process_follow_up_ttft_p50_s": statistics.median(local_follows),
            "in_process_ratio": statistics.median(local_follows) / statistics.median(local_firsts),
            # what each question had to evaluate (the rest came from the KV cache): the follow-up's
            # text against the first question's image rows and text, the system prompt being cached
            # for both on a warm worker; these bound the ratio whatever the server does
            "evaluated_positions_p50": {"first": statistics.median(a for a, _ in evaluated),
                                        "follow_up": statistics.median(b for _, b in evaluated)},
            "in_process_evaluated_positions_p50": {"first": statistics.median(a for a, _ in local_evaluated),
                                                   "follow_up": statistics.median(b for _, b in local_evaluated)}}


def _histogram(client, url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram in the server's /metrics."""
    values = dict(line.rsplit(" ", 1) for line in client.get(url + "/metrics").text.splitlines()
                  if line.startswith((name + "_sum ", name + "_count ")))
    return float(values[name + "_sum"]), float(values[name + "_count"])


def decode_floor(url: str, model: Path, questions, tokens: int, threads: int | None, rounds: int = 5) -> dict:
    """Decode tokens/s through the server against ``VLM.generate`` in this process, on the same
    prompts (the server's image decoding, greedy, `tokens` tokens each: ignore_eos through the API,
    stop tokens cleared here). Both count from the first token to the last: the client from the
    first content chunk to the finish chunk, the runtime from the first token chosen to the last;
    (tokens - 1) intervals each. Each round asks every question here and then through the server
    (idle meanwhile), one after the other, so a shared machine's drift touches both alike; the
    ratio is the median of the rounds' ratios, and their spread is reported."""
    import httpx

    import tinyllava_edge
    from tinyllava_edge.apps.serve.images import ImagePolicy, load_request_image

    policy = ImagePolicy(2**30, 2**30)
    images = [load_request_image(uri, policy, "bench").decode() for uri, _, _ in questions]  # same pixels
    local, served, reported, ratios = [], [], [], []
    with tinyllava_edge.load(model, device="cpu", n_threads=threads) as vlm, httpx.Client(timeout=600) as client:
        vlm.generate(None, "Hello.", max_new_tokens=4)  # warm-up, as the server had
        stop_ids = vlm.backend.stop_ids
        for _ in range(rounds):
            here, there = [], []
            before = _histogram(client, url, "tinyllava_decode_tokens_per_second")
            for image, (uri, question, _) in zip(images, questions):
                vlm.backend.stop_ids = frozenset()
                try:
                    _, stats = vlm.generate(image, question, max_new_tokens=tokens, return_stats=True)
                finally:
                    vlm.backend.stop_ids = stop_ids
                here.append((stats.decode_tokens - 1, stats.decode_ms / 1e3))
                result = stream_chat(client, url, [message(uri, question)], tokens, ignore_eos=True)[0]
                there.append((result.completion_tokens - 1, result.decode_s))
            after = _histogram(client, url, "tinyllava_decode_tokens_per_second")
            local.append(sum(n for n, _ in here) / sum(t for _, t in here))
            served.append(sum(n for n, _ in there) / sum(t for _, t in there))
            reported.append((after[0] - before[0]) / (after[1] - before[1]))
            ratios.append(served[-1] / local[-1])
    return {"server_tokens_per_s": statistics.median(served), "in_process_tokens_per_s": statistics.median(local),
            "server_reported_tokens_per_s": statistics.median(reported), "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "rounds": {"ratio": ratios, "server": served, "in_process": local, "server_reported": reported},
            "threads": threads, "tokens": tokens, "prompts": len(questions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/tiny-shapes/bundle"), help="bundle (4-bit: the "
                        "issue's figures) or checkpoint")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=10, help="distinct images the questions are about")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer cap of the load runs (they stop at EOS)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens per answer of the decode floor")
    parser.add_argument("--decode-rounds", type=int, default=5, help="interleaved rounds of the decode floor")
    parser.add_argument("--follow-ups", type=int, default=20, help="fresh images of the follow-up floor (a first "
                        "question and a follow-up each)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: the server's)")
    parser.add_argument("--follow-up-model", type=Path, help="also measure the follow-up floor on this bundle, e.g. "
                        "a bench-scale one (tinyllava-bench's cache), where image work dominates a first question")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--log", type=Path, default=Path("/tmp/serve_load.log"), help="the server's stderr")
    args = parser.parse_args(argv)
    from tinyllava_edge.runtime.devices import cpu_model_name, default_threads, detect

    cores = default_threads(detect())
    questions = shapes_questions(args.images)
    figures: dict = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
                     "model": str(args.model), "max_tokens": args.max_tokens,
                     "machine": {"cpus": os.cpu_count(), "physical_cores": cores, "processor": cpu_model_name(),
                                 "python": platform.python_version(), "load_average_before": os.getloadavg()},
                     "runs": [], "floors": {}}
    failures = []
    for workers in args.workers:
        # in process, the threads the server's workers get: the runtime's own choice for one worker
        # (which may decode a tiny model on one thread), a share of the cores for several
        threads = args.threads or (max(1, cores // workers) if workers > 1 else None)
        proc, url = start_server(args.model, workers, args.threads, max(args.clients) * 2, args.log)
        try:
            load_run(url, proc.pid, workers, 1, 2, questions, args.max_tokens)  # warm-up, not counted
            if workers == args.workers[0]:
                # images the server has not seen
                fresh = shapes_questions(args.images + args.follow_ups)[args.images:]
                figures["floors"]["follow_up"] = follow_up_ratio(url, args.model, fresh, args.max_tokens, threads)
                figures["floors"]["decode"] = decode_floor(url, args.model, questions, args.decode_tokens, threads,
                                                           args.decode_rounds)
            for clients in args.clients:
                run = load_run(url, proc.pid, workers, clients, args.requests, questions, args.max_tokens)
                row = run.figures()
                figures["runs"].append(row)
                failures += run.errors
                print(_line(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    if args.follow_up_model:  # the same measurement where image work dominates the first question
        proc, url = start_server(args.follow_up_model, 1, args.threads, 4, args.log)
        try:
            load_run(url, proc.pid, 1, 1, 1, questions, 4)  # warm-up
            fresh = shapes_questions(args.images + 5)[args.images:]
            figures["floors"]["follow_up_larger_model"] = {
                "model": str(args.follow_up_model),
                **follow_up_ratio(url, args.follow_up_model, fresh, 8, args.threads or cores)}
        finally:
            proc.terminate()
            proc.wait(60)
    figures["machine"]["load_average_after"] = os.getloadavg()
    checks = _checks(figures)
    figures["floors"]["checks"] = checks
    for name, ok in checks.items():
        print(f"floor {name}: {'met' if ok else 'MISSED'}")
    print(json.dumps(figures["floors"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    for error in failures[:10]:
        print(f"error: {error}", file=sys.stderr)
    return 1 if failures or not all(checks.values()) else 0


def _checks(figures: dict) -> dict[str, bool]:
    floors, checks = figures["floors"], {}
    if "decode" in floors:
        checks[f"decode through the server >= {DECODE_FLOOR}x in-process"] = floors["decode"]["ratio"] >= DECODE_FLOOR
    for key, label in (("follow_up", ""), ("follow_up_larger_model", " (--follow-up-model)")):
        if key in floors:
            checks[f"follow-up TTFT <= {FOLLOW_UP_FLOOR}x the first{label}"] = floors[key]["ratio"] <= FOLLOW_UP_FLOOR
    for row in figures["runs"]:
        if row["clients"] == 16:
            checks[f"16 clients, {row['workers']} worker(s): no errors, RSS end <= {RSS_FLOOR}x after the first 16"] = (
                row["errors"] == 0 and row["rss_end_mb"] <= RSS_FLOOR * row["rss_after_first_mb"])
    return checks


def _line(row: dict) -> str:
    return (f"workers {row['workers']} clients {row['clients']:>2} x {row['requests'] // row['clients']}: "
            f"{row['errors']} errors, latency p50 {row['latency_p50_s'] * 1e3:.0f} ms p95 "
            f"{row['latency_p95_s'] * 1e3:.0f} ms, TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms, "
            f"{row['requests_per_s']:.1f} req/s, {row['tokens_per_s']:.0f} tok/s, RSS peak {row['rss_peak_mb']:.0f} "
            f"MiB (after first round {row['rss_after_first_mb']:.0f}, end {row['rss_end_mb']:.0f})")


if __name__ == "__main__":
    sys.exit(main())
