"""One contender, one process: load, warm up, time the prompts, answer the accuracy subset.

    python -m tinyllava_edge.bench.worker SPEC.json RESULT.json

Run by :mod:`.speed` in a fresh subprocess per contender and round, so the peak RSS it reports
is that contender's alone and nothing stays warm between rounds except the OS page cache.
`SPEC` says which runner (`vlm`: tinyllava_edge.load, either backend; `raw`: llama-cpp-python's
high-level `Llama` on the same prompt with random token ids where the image rows go; `mtmd`:
`Llava15ChatHandler` with the bundle's mmproj), the model files, the prompts and the generation
length.

Timed prompts come in three kinds: `prompts` run cold (every cache emptied first: image
embeddings, KV cache, prefix states), `warm_prompts` run after the previous prompt with nothing
emptied (new images, so only the system prompt can be reused), and each warm prompt's image is
asked again with another question (the "cached" runs).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

from tinyllava_edge.runtime.stats import peak_rss_bytes

# The second question asked of each image (the "TTFT cached" runs).
FOLLOW_UP = "What colour is the largest shape?"


def _timed_vlm(spec: dict) -> dict:
    from tinyllava_edge import load
    from tinyllava_edge.eval.metrics import exact_match_text

    t = time.perf_counter()
    vlm = load(spec["model"], device="cpu", **spec.get("options", {}))
    load_s = time.perf_counter() - t
    n = spec["max_new_tokens"]
    # Timed runs decode max_new_tokens whatever the model says (llama-bench's convention too): a
    # trained model stops after two or three tokens, too few to time. Accuracy runs stop at EOS.
    stop_ids, vlm.backend.stop_ids = vlm.backend.stop_ids, frozenset()
    vlm.generate(spec["warmup"]["image"], spec["warmup"]["question"], max_new_tokens=n)
    runs, warm, cached = [], [], []
    for prompt in spec["prompts"]:
        vlm.clear_caches()
        _, stats = vlm.generate(prompt["image"], prompt["question"], max_new_tokens=n, return_stats=True)
        runs.append(stats.as_dict())
    for prompt in spec.get("warm_prompts", []):
        _, stats = vlm.generate(prompt["image"], prompt["question"], max_new_tokens=n, return_stats=True)
        warm.append(stats.as_dict())
    # Each warm image again, with another question, after the other images: its embedding comes
    # from the VLM's image cache and (edge backend) the KV state of its system prompt + image rows
    # from the prefix store, since the KV cache itself holds the last image's prompt by then.
    for prompt in spec.get("warm_prompts", []):
        _, stats = vlm.generate(prompt["image"], FOLLOW_UP, max_new_tokens=n, return_stats=True)
        cached.append(stats.as_dict())
    vlm.backend.stop_ids = stop_ids
    correct = []
    for item in spec.get("accuracy", []):
        text = vlm.generate(item["image"], item["question"], max_new_tokens=8)
        correct.append(exact_match_text(text) == exact_match_text(item["answer"]))
    vlm.close()
    return {"load_s": load_s, "runs": runs, "warm": warm, "cached": cached, "correct": correct}


def _no_extra_bufts():
    """llama-cpp-python's `Llama` with ggml's extra CPU buffer types off where our runtime turns
    them off (AMX CPUs segfault on quantized files otherwise, tinyllava_edge/llamacpp.py): the
    same weights layout for both, so the comparison measures the wrappers only."""
    import llama_cpp.llama_cpp as lib

    from tinyllava_edge.llamacpp import _extra_bufts_safe

    if _extra_bufts_safe():
        return
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def _timed_raw(spec: dict) -> dict:
    _no_extra_bufts()
    import zlib

    import numpy as np
    from llama_cpp import Llama

    from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
    from tinyllava_edge.data.template import Template

    t = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"],
                n_threads_batch=spec["n_threads"], n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    n = spec["max_new_tokens"]

    template = Template.from_dict(spec["template"])

    def prompt_tokens(prompt: dict) -> list[int]:
        # our prompt's text around the image, and random ids (seeded by the image) for its rows:
        # the same positions, and a common prefix with another prompt only as long as the text's
        before, after = template.render_prompt(f"{DEFAULT_IMAGE_TOKEN}\n{prompt['question']}").split(
            DEFAULT_IMAGE_TOKEN, 1)
        rows = np.random.default_rng(zlib.crc32(prompt["image"].encode())).integers(0, llm.n_vocab(),
                                                                                   spec["image_tokens"])
        return (llm.tokenize(before.encode(), add_bos=True, special=True) + rows.tolist()
                + llm.tokenize(after.encode(), add_bos=False, special=True))

    def run(prompt: dict, cold: bool = True) -> dict:
        ids = prompt_tokens(prompt)
        if cold:
            llm.reset()  # else Llama.generate keeps the prefix its cache shares with `ids`
        held = llm.input_ids[:llm.n_tokens].tolist()  # what the cache holds before this prompt
        started = time.perf_counter()
        first = last = started
        count = 0
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            llm.detokenize([token])
            last = time.perf_counter()
            count += 1
            if count == 1:
                first = last
            if count >= n:
                break
        reused = _common_prefix(ids, held)
        return {"ttft_ms": (first - started) * 1e3, "prefill_tokens": len(ids) - reused, "prefix_reused": reused,
                "prefill_tokens_per_s": (len(ids) - reused) / (first - started), "decode_tokens": count,
                "decode_tokens_per_s": (count - 1) / (last - first) if count > 1 and last > first else None,
                "image_encode_ms": None}

    run(spec["warmup"])
    runs = [run(p) for p in spec["prompts"]]
    warm = [run(p, cold=False) for p in spec.get("warm_prompts", [])]
    llm.close()
    return {"load_s": load_s, "runs": runs, "warm": warm, "cached": [], "correct": []}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _timed_mtmd(spec: dict) -> dict:
    _no_extra_bufts()
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
    from tinyllava_edge.data.template import Template
    from tinyllava_edge.eval.metrics import exact_match_text

    t = time.perf_counter()
    handler = Llava15ChatHandler(clip_model_path=spec["mmproj"], verbose=False)
    llm = Llama(model_path=spec["gguf"], chat_handler=handler, n_ctx=spec["n_ctx"], n_threads=spec["n_threads"],
                n_threads_batch=spec["n_threads"], n_batch=512,
                # verbose=False nests a second stdout/stderr redirection inside the handler's and
                # fails ("I/O operation on closed file"); the log goes to the captured stderr
                verbose=True)
    load_s = time.perf_counter() - t  # mtmd loads the mmproj lazily: on the first image (in warm-up)
    n = spec["max_new_tokens"]

    template = Template.from_dict(spec["template"])
    eos_bias = {str(llm.token_eos()): -1e9}

    def run(image: str, question: str, max_tokens: int, timed: bool = True) -> tuple[str, dict]:
        # The handler's own template is LLaVA-1.5's; the model was trained on the bundle's. Its
        # jinja CHAT_FORMAT becomes our exact prompt with the image URL where <image> goes (the
        # handler swaps the URL for mtmd's media marker).
        before, after = template.render_prompt(f"{DEFAULT_IMAGE_TOKEN}\n{question}").split(DEFAULT_IMAGE_TOKEN, 1)
        handler.CHAT_FORMAT = ("{% raw %}" + before + "{% endraw %}{{ messages[-1].content[0].image_url.url }}"
                               "{% raw %}" + after + "{% endraw %}")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
                                                 {"type": "text", "text": question}]}]
        started = time.perf_counter()
        first = last = started
        count, text = 0, []
        # timed runs decode max_tokens whatever the model says, as the other contenders do
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                top_k=1, repeat_penalty=1.0, stream=True,
                                                logit_bias=eos_bias if timed else None):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece is None:
                continue
            last = time.perf_counter()
            count += 1
            text.append(piece)
            if count == 1:
                first = last
        positions = llm.n_tokens - max(count - 1, 0)  # the prompt (image rows included) and the first token
        return "".join(text), {
            "ttft_ms": (first - started) * 1e3, "prefill_tokens": positions,
            "prefill_tokens_per_s": None, "decode_tokens": count,
            "decode_tokens_per_s": (count - 1) / (last - first) if count > 1 and last > first else None,
            "image_encode_ms": None}

    run(spec["warmup"]["image"], spec["warmup"]["question"], n)
    # Llava15ChatHandler empties the context on every call: every run is cold, none warm
    runs = [run(p["image"], p["question"], n)[1] for p in spec["prompts"]]
    correct = [exact_match_text(run(item["image"], item["question"], 8, timed=False)[0]) == exact_match_text(item["answer"])
               for item in spec.get("accuracy", [])]
    llm.close()
    return {"load_s": load_s, "runs": runs, "cached": [], "correct": correct}


RUNNERS = {"vlm": _timed_vlm, "raw": _timed_raw, "mtmd": _timed_mtmd}


def main(argv: list[str] | None = None) -> int:
    spec_path, result_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = RUNNERS[spec["runner"]](spec)
    except Exception as err:  # reported as the contender's error; the run goes on with the others
        Path(result_path).write_text(json.dumps({"error": f"{type(err).__name__}: {err}"[:300]}))
        raise
    result["peak_rss_mb"] = peak_rss_bytes() / 2**20
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
