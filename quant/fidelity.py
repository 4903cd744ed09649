"""How close a quantized LLM GGUF stays to its source file, measured with image prompts.

Both files decode the same prompts (synthetic images through the bundle's fp32 vision graph, the
bundle's template, llama.cpp's tokenizer) with an F32 KV cache and flash attention off, so what
differs is the weights. Figures: greedy-token agreement (position by position against the
source's tokens), answers identical, mean KL(source || quantized) of the first answer token's
distribution, and the largest prompt-logit difference relative to the largest source logit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """KL(p_ref || p) in nats of two next-token logit vectors."""
    p, q = log_softmax(ref_logits), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(-1))


def token_agreement(ref: list[int], got: list[int]) -> int:
    """How many of `ref`'s tokens `got` has at the same position."""
    return sum(a == b for a, b in zip(ref, got))


def compare_llm_files(manifest: dict, bundle_dir: Path, ref_path: Path, cand_path: Path, n_prompts: int,
                      n_tokens: int, source_runs: list[dict] | None = None) -> dict:
    """Greedy tokens and first-token logits of `cand_path` against `ref_path` on `n_prompts`
    synthetic image prompts of `n_tokens` tokens. `source_runs`: the source file's runs on the
    same settings, made by the export that wrote it moments ago (export/checks.llamacpp_runs:
    ids, image rows, stop ids, tokens, first logits); the candidate then decodes those prompts
    and the source file is not decoded again (phi2-scale: about 70 s of four 850-position
    prompts through the F16 file, and the vision graph's four images)."""
    from tinyllava_edge.llamacpp import LlamaCppModel, LlamaCppTokenizer, split_segments
    from tinyllava_edge.memory import release_freed_memory
    from tinyllava_edge.runtime.devices import default_threads

    threads = default_threads()
    prompts = source_runs if source_runs is not None else _prompts(manifest, bundle_dir, n_prompts)
    if source_runs is not None:
        n_prompts = len(source_runs)
        n_tokens = source_runs[0]["new_tokens"]
    vision = next(f for f in manifest["files"] if f["role"] == "vision" and f["quant"] == "fp32")
    eos = manifest.get("tokenizer", {}).get("eos_token_id")
    runs = []
    paths = (cand_path,) if source_runs is not None else (ref_path, cand_path)
    for path in paths:
        # every core: one thread made this check 245 s of a phi2-scale export (4 prompts of 850
        # positions through the F16 file, then the 4-bit one); llama.cpp splits a product's
        # output among its threads, each dot product whole in one, so the count leaves the figures
        with LlamaCppModel(path, n_ctx=vision["n_tokens"] + n_tokens + 256, n_threads=threads, kv_type="f32",
                           flash_attn="off") as llm:
            tokenizer = LlamaCppTokenizer(llm)
            out = []
            for prompt in prompts:
                ids = prompt["ids"] if "ids" in prompt else prompt["encode"](tokenizer)
                stops = prompt["stop"] if "stop" in prompt else [eos if eos is not None else llm.eos_id]
                tokens, first = llm.generate(split_segments(ids, [prompt["rows"]], -200), n_tokens, stop_ids=stops,
                                             return_logits=True)
                out.append((first, list(tokens)))
            runs.append(out)
        release_freed_memory()
    if source_runs is not None:
        runs.insert(0, [(r["first_logits"], list(r["tokens"])) for r in source_runs])
    ref, cand = runs
    total = sum(len(t) for _, t in ref)
    agree = sum(token_agreement(r[1], c[1]) for r, c in zip(ref, cand))
    return {
        "prompts": n_prompts,
        "new_tokens": n_tokens,
        "source_runs": "the export's check (reused)" if source_runs is not None else "decoded here",
        "greedy_token_agreement": 100.0 * agree / max(1, total),
        "answers_identical": sum(r[1] == c[1] for r, c in zip(ref, cand)),
        "first_token_kl_mean": float(np.mean([kl(r[0], c[0]) for r, c in zip(ref, cand)])),
        "logits_rel_diff": float(max(np.abs(r[0] - c[0]).max() / max(1.0, np.abs(r[0]).max())
                                     for r, c in zip(ref, cand))),
    }


def _prompts(manifest: dict, bundle_dir: Path, n_prompts: int) -> list[dict]:
    """`n_prompts` synthetic image prompts: the bundle's fp32 vision graph's rows (scaled as the
    runtime scales them) and a function that encodes the question with a tokenizer."""
    import onnxruntime as ort

    from tinyllava_edge.bundle import files_by_role
    from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
    from tinyllava_edge.data.template import Template
    from tinyllava_edge.export.checks import image_prompt, synthetic_images
    from tinyllava_edge.memory import release_freed_memory
    from tinyllava_edge.runtime.devices import default_threads

    llm_record = files_by_role(manifest, "llm")[0]
    scale = float(llm_record.get("image_features_scale", 1.0)) * float(llm_record.get("embd_input_scale", 1.0))
    vision = next(f for f in files_by_role(manifest, "vision") if f["quant"] == "fp32")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = default_threads()
    # a few images, once: no pre-packed second copy of every matrix (phi2-scale: 1.6 GB more)
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(bundle_dir / vision["name"]), options, providers=["CPUExecutionProvider"])
    template = Template.from_dict(manifest["template"])
    pixels = preprocess(synthetic_images(n_prompts, seed=3), PreprocessConfig.from_dict(manifest["preprocess"]))
    rows = np.concatenate([session.run(["image_embeds"], {"pixel_values": pixels[i:i + 1]})[0]
                           for i in range(n_prompts)]) * np.float32(scale)
    del session  # not in memory beside the GGUF files, which are mapped one after the other
    release_freed_memory()  # what the graph's run left in the C heap (phi2-scale: the check peaked at 8.35 GiB)
    return [{"rows": rows[i],
             "encode": lambda tok, i=i: template.encode(image_prompt(i), tok, mode="eval")["input_ids"]}
            for i in range(n_prompts)]
