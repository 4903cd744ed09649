"""Greedy answers through a vLLM server against our runtime on held-out shapes questions, and speed.

    python benchmarks/vllm_agreement.py --model runs/tiny-shapes/model --data runs/tiny-shapes/data \\
        --base-url http://127.0.0.1:8011/v1 --served-model tiny-shapes --n 200 --json out.json

The server serves the checkpoint's `tinyllava-export --format hf` folder (scripts/test-vllm.sh
starts it). `--n` questions are drawn (seeded) from the data's test split, whose colour x shape
pairs training never saw. Each is asked through the OpenAI chat API (image as a data URL,
temperature 0) and through `tinyllava_edge.load(--model)` (fp32 torch, greedy); the answers are
compared as strings with surrounding whitespace stripped (the runtime strips the leading space the
model generates after "ASSISTANT:", vLLM returns it), and each against the truth. Every difference
is listed with both answers and whether the tokens differ; with `--hf`, vLLM's prompt ids are
compared with the runtime's too.
Speed, same machine, on `--decode-prompts` of those questions: every answer decoded to
`--decode-tokens` tokens whatever the model says (EOS ignored, llama-bench's convention, as
tinyllava-bench does: the model's answers are two or three tokens, too few to time). Decode tokens
per second, one request at a time: our runtime on the checkpoint (torch fp32) and on `--bundle`
(llama.cpp), first token to last, and vLLM over the API (see :func:`decode_vllm`); then vLLM's aggregate with
`--concurrency` requests in flight (its continuous batching). Exits 1 when agreement is under
`--floor` percent.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_N = 200
DEFAULT_FLOOR = 95.0
DEFAULT_MAX_TOKENS = 16


def held_out_questions(data: Path, n: int, seed: int = 0) -> list[dict]:
    """`n` records of the test split (seeded sample, file order kept): image path, question, truth, kind."""
    from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN

    records = json.loads((data / "test.json").read_text(encoding="utf-8"))
    picked = sorted(random.Random(seed).sample(range(len(records)), min(n, len(records))))
    out = []
    for i in picked:
        rec = records[i]
        question = rec["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        out.append({"id": rec["id"], "image": str(data / rec["image"]), "question": question,
                    "truth": rec["conversations"][1]["value"], "kind": rec.get("kind", "")})
    return out


def ask_vllm(client, model: str, item: dict, max_tokens: int) -> dict:
    """One greedy chat request with the image as a data URL: answer and token ids (prompt and answer)."""
    url = "data:image/png;base64," + base64.b64encode(Path(item["image"]).read_bytes()).decode()
    reply = client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": item["question"]}]}])
    choice = reply.choices[0]
    return {"text": choice.message.content or "", "token_ids": getattr(choice, "token_ids", None),
            "prompt_ids": getattr(reply, "prompt_token_ids", None)}


def answers_ours(path: Path, items: list[dict], max_tokens: int) -> list[str]:
    """Our runtime's greedy answers to `items` (stopping at EOS)."""
    import tinyllava_edge

    vlm = tinyllava_edge.load(path, device="cpu")
    return [vlm.generate(item["image"], item["question"], max_new_tokens=max_tokens) for item in items]


def decode_ours(path: Path, items: list[dict], n_tokens: int) -> float:
    """Our runtime's decode tokens per second, first token to last, `n_tokens` per answer, EOS ignored."""
    import tinyllava_edge

    vlm = tinyllava_edge.load(path, device="cpu")
    vlm.backend.stop_ids = frozenset()  # as tinyllava_edge/bench/worker.py times it
    vlm.generate(items[0]["image"], items[0]["question"], max_new_tokens=n_tokens)  # warm-up
    tokens = seconds = 0.0
    for item in items:
        _, stats = vlm.generate(item["image"], item["question"], max_new_tokens=n_tokens, return_stats=True)
        tokens += stats.decode_tokens - 1  # the first token ends the prefill
        seconds += stats.decode_ms / 1e3
    return tokens / seconds


def decode_vllm(client, model: str, items: list[dict], n_tokens: int, concurrency: int) -> tuple[float, float]:
    """vLLM's decode tokens per second one request at a time, and its generated tokens per second with
    `concurrency` requests in flight (wall time), EOS ignored. One at a time, each prompt is sent for
    1 token and for `n_tokens` (after a first request that puts it in the prefix cache, so both
    prefill alike): the difference is `n_tokens` - 1 decode steps."""
    def request(item: dict, max_tokens: int) -> float:
        url = "data:image/png;base64," + base64.b64encode(Path(item["image"]).read_bytes()).decode()
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": item["question"]}]}])
        if reply.usage.completion_tokens != max_tokens:
            raise RuntimeError(f"vLLM generated {reply.usage.completion_tokens} tokens, not {max_tokens}")
        return time.perf_counter() - started

    seconds = 0.0
    for item in items:
        request(item, 1)
        seconds += request(item, n_tokens) - request(item, 1)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda it: request(it, n_tokens), items))
    concurrent = n_tokens * len(items) / (time.perf_counter() - started)
    return (n_tokens - 1) * len(items) / seconds, concurrent


def prompt_ids_of(model: Path):
    """question -> Factory's ids of the prompt our runtime builds (-200 where the image goes)."""
    from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
    from tinyllava_edge.data.template import default_template_for_family, get_template, tokenizer_image_token
    from tinyllava_edge.model import load_tokenizer
    from tinyllava_edge.model.checkpoint import read_config_json
    from tinyllava_edge.model.tokenizer import text_model_type

    tokenizer = load_tokenizer(model)
    template = get_template(default_template_for_family(text_model_type(read_config_json(model))))
    return lambda question: tokenizer_image_token(template.render_prompt(f"{DEFAULT_IMAGE_TOKEN}\n{question}"),
                                                  tokenizer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint the served folder was exported from")
    parser.add_argument("--data", type=Path, required=True, help="the shapes data directory (test.json, images/)")
    parser.add_argument("--hf", type=Path, default=None, help="the served folder: its image token id lets the "
                        "prompt ids vLLM tokenized be compared with the runtime's")
    parser.add_argument("--bundle", type=Path, default=None, help="also time (and compare) our edge bundle")
    parser.add_argument("--base-url", required=True, help="the vLLM server, e.g. http://127.0.0.1:8011/v1")
    parser.add_argument("--served-model", required=True, help="the model name the server serves")
    parser.add_argument("--api-key", default=os.environ.get("TINYLLAVA_API_KEY", "none"))
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="questions (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="per answer (default: %(default)s)")
    parser.add_argument("--decode-prompts", type=int, default=16, help="questions timed (default: %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens per timed answer (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight for vLLM's batched figure")
    parser.add_argument("--floor", type=float, default=DEFAULT_FLOOR, help="agreement percent required")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from openai import OpenAI

    from tinyllava_edge.eval.metrics import exact_match_text
    from tinyllava_edge.export.hf_check import collapse_image_tokens
    from tinyllava_edge.model import load_tokenizer

    items = held_out_questions(args.data, args.n)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    ours = answers_ours(args.model, items, args.max_tokens)
    edge = answers_ours(args.bundle, items, args.max_tokens) if args.bundle is not None else None
    theirs = [ask_vllm(client, args.served_model, item, args.max_tokens) for item in items]
    timed = items[:args.decode_prompts]
    speed = {"ours_checkpoint": decode_ours(args.model, timed, args.decode_tokens),
             "ours_bundle": decode_ours(args.bundle, timed, args.decode_tokens) if args.bundle else None}
    speed["vllm"], speed["vllm_concurrent"] = decode_vllm(client, args.served_model, timed, args.decode_tokens,
                                                          args.concurrency)

    tokenizer = load_tokenizer(args.model)
    image_id = json.loads((args.hf / "config.json").read_text())["image_token_index"] if args.hf else None
    our_prompt_ids = prompt_ids_of(args.model)
    differences, prompt_mismatch = [], 0
    for item, a, b in zip(items, ours, theirs):
        if image_id is not None:
            prompt_mismatch += (b["prompt_ids"] is None or collapse_image_tokens(b["prompt_ids"], image_id)
                                != our_prompt_ids(item["question"]))
        if a.strip() == b["text"].strip():
            continue
        same_tokens = b["token_ids"] is not None and tokenizer.decode(b["token_ids"], skip_special_tokens=True) == a
        differences.append({"id": item["id"], "kind": item["kind"], "question": item["question"],
                            "truth": item["truth"], "ours": a, "vllm": b["text"], "vllm_token_ids": b["token_ids"],
                            "cause": "same tokens, detokenized differently (vLLM holds back an incomplete UTF-8 "
                                     "sequence at the end)" if same_tokens else "different tokens"})
    n = len(items)
    figures = {
        "questions": n,
        "agreement_percent": 100.0 * (n - len(differences)) / n,
        # the runtime strips the answer's leading whitespace (as Factory's eval does); vLLM returns the
        # space the model generates after "ASSISTANT:" (" cross"), so raw strings rarely match
        "raw_strings_equal": sum(a == b["text"] for a, b in zip(ours, theirs)),
        "token_agreement_percent": 100.0 * (n - sum(d["cause"] == "different tokens" for d in differences)) / n,
        "prompt_ids_differ": prompt_mismatch if image_id is not None else None,
        "accuracy_ours_percent": 100.0 * sum(exact_match_text(a) == exact_match_text(it["truth"])
                                             for a, it in zip(ours, items)) / n,
        "accuracy_vllm_percent": 100.0 * sum(exact_match_text(b["text"]) == exact_match_text(it["truth"])
                                             for b, it in zip(theirs, items)) / n,
        "edge_bundle_agreement_percent": 100.0 * sum(e.strip() == b["text"].strip() for e, b in zip(edge, theirs)) / n
        if edge else None,
        "decode_tokens_per_s": speed,
        "decode_tokens": args.decode_tokens,
        "decode_prompts": len(timed),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "differences": differences,
    }
    print(f"agreement: {figures['agreement_percent']:.1f} % of {n} held-out questions "
          f"({len(differences)} differ); accuracy ours {figures['accuracy_ours_percent']:.1f} %, "
          f"vLLM {figures['accuracy_vllm_percent']:.1f} %")
    for d in differences:
        print(f"  {d['id']}: {d['question']!r} truth {d['truth']!r}: ours {d['ours']!r}, vLLM {d['vllm']!r} "
              f"({d['cause']})")
    if figures["prompt_ids_differ"]:
        print(f"  vLLM's prompt ids differ from the runtime's on {figures['prompt_ids_differ']} questions")
    edge_rate = f", edge bundle {speed['ours_bundle']:.1f}" if edge else ""
    print(f"decode tok/s ({args.decode_tokens} tokens x {len(timed)} prompts, one at a time): runtime on the "
          f"checkpoint {speed['ours_checkpoint']:.1f}{edge_rate}, vLLM {speed['vllm']:.1f}; vLLM with "
          f"{args.concurrency} in flight {speed['vllm_concurrent']:.1f} (aggregate)")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0 if figures["agreement_percent"] >= args.floor else 1


if __name__ == "__main__":
    sys.exit(main())
