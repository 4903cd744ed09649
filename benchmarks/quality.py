"""Accuracy vs size of every quantized variant of the tiny-shapes model (the quantization report).

    python benchmarks/quality.py --model runs/tiny-shapes/model --bundle runs/tiny-shapes/bundle \
        --data runs/tiny-shapes/data [--n 1000] [--work /tmp/quality] [--out docs] [--model-note TEXT]

Variants: torch fp32 (the reference) / bnb nf4 / bnb int8 (LLM quantized, tower fp32) / GPTQ 4-bit
(measured in .venv-gptq by benchmarks/quality_gptq.py, merged with `--gptq-json`); GGUF F16,
Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 (vision ONNX fp32); ONNX int8, int4 (RTN), int4-gptq (GGUF
F16); and the two bundles `--bits 8` / `--bits 4` produce (Q8_0 + their default vision graph,
Q4_K_M + theirs). Bundles are made with `quantize_bundle` from the 16-bit bundle.

Each variant answers the same fixed subset of the test split (`--n` questions drawn with seed 0),
greedily, max 8 new tokens, one thread, llama.cpp KV cache F32 and flash attention off. Figures:
size on disk (edge: the LLM GGUF + the vision ONNX that ran; torch: `torch.save` of the state
dict), exact match overall and per kind, greedy-token agreement with torch fp32 (share of the
reference's tokens, stop token included, reproduced at the same position), answers identical,
mean KL(fp32 || variant) of the first answer token's distribution. Writes docs/quality.md,
docs/quality.png (accuracy vs size, Pareto front marked) and docs/results/quality.json. The header
says which model was measured: `--model-note` (what the run was: which recipe, which CPU), then
the seed, steps, precision and test accuracy of the preset run's recipe_summary.json when it sits
beside the checkpoint. Exits 1 when the floor is missed: the Q8_0 bundle agrees with fp32 on >= 99 %
of greedy tokens.
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

import numpy as np

MAX_NEW_TOKENS = 8
FLOOR_Q8_AGREEMENT = 99.0
GGUF_VARIANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
ONNX_VARIANTS = ("int8", "int4", "int4-gptq")


def subset(data: Path, n: int) -> list[dict]:
    records = json.loads((data / "test.json").read_text())
    pick = np.sort(np.random.default_rng(0).choice(len(records), size=min(n, len(records)), replace=False))
    return [records[i] for i in pick]


def describe_model(model: Path, note: str | None) -> str:
    """The report header's account of the model: `note`, the facts of the preset run that made it
    (its recipe_summary.json, read only when that summary names this checkpoint), and its path."""
    from tinyllava_edge.train.preset_recipes import SUMMARY_FILE

    parts = [note] if note else []
    path = model.parent / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.is_file() else None
    if summary and Path(summary["model"]).resolve() == model.resolve():
        stages = summary["stages"].values()
        steps = " + ".join(f"{name} {s['steps_this_run']}" for name, s in summary["stages"].items())
        kinds = "/".join(sorted({f"{s['precision']} on {s['device']}" for s in stages}))
        run = f"`tinyllava-train --preset {summary['preset']}` seed {summary['seed']} ({steps} steps, {kinds})"
        ev = summary.get("eval")
        if ev:
            per_kind = ", ".join(f"{k} {v:.1f}" for k, v in sorted(ev["per_kind"].items()))
            run += (f", {ev['exact_match']:.1f} % exact match on the whole {ev['split']} split ({ev['n']} questions; "
                    f"{per_kind})")
        parts.append(f"{run}, from its {SUMMARY_FILE}")
    parts.append(f"checkpoint `{model}`")
    return "; ".join(parts)


def run_variant(vlm, questions: list[dict], data: Path) -> dict:
    """Greedy answers, tokens and first-token logits of one loaded model on the questions."""
    from tinyllava_edge.eval.metrics import exact_match_text

    backend = vlm.backend
    out = {"answers": [], "tokens": [], "first_logits": [], "correct": []}
    started = time.perf_counter()
    for start in range(0, len(questions), 32):
        chunk = questions[start:start + 32]
        rows = vlm.encode_images([str(data / q["image"]) for q in chunk])
        for q, image_rows in zip(chunk, rows):
            text = q["conversations"][0]["value"].replace("<image>", "").strip()
            segments = vlm.prompt_segments([{"from": "human", "value": f"<image>\n{text}"}], [image_rows])
            backend.reset()
            logits = backend.feed(segments)
            out["first_logits"].append(np.asarray(logits, np.float32))
            tokens, pieces = [], b""
            detok = backend.detokenizer()
            while True:
                token = int(np.argmax(logits))
                tokens.append(token)
                if token in backend.stop_ids or len(tokens) >= MAX_NEW_TOKENS:
                    break
                pieces += detok.push(token)
                logits = backend.feed([[token]])
            answer = (pieces + detok.flush()).decode("utf-8", "replace")
            for stop in vlm.template.stop:
                if stop:
                    answer = answer.split(stop, 1)[0]
            answer = answer.strip()
            out["answers"].append(answer)
            out["tokens"].append(tokens)
            out["correct"].append(exact_match_text(answer) == exact_match_text(q["conversations"][1]["value"]))
    out["seconds"] = time.perf_counter() - started
    return out


def figures(run: dict, ref: dict, questions: list[dict]) -> dict:
    from tinyllava_edge.quant.fidelity import kl, token_agreement

    kinds: dict[str, list[bool]] = {}
    for q, ok in zip(questions, run["correct"]):
        kinds.setdefault(q["kind"], []).append(ok)
    total = sum(len(t) for t in ref["tokens"])
    agree = sum(token_agreement(r, t) for r, t in zip(ref["tokens"], run["tokens"]))
    return {
        "accuracy": 100.0 * float(np.mean(run["correct"])),
        "per_kind": {k: 100.0 * float(np.mean(v)) for k, v in sorted(kinds.items())},
        "greedy_token_agreement": 100.0 * agree / total,
        "answers_identical": 100.0 * float(np.mean([r == t for r, t in zip(ref["tokens"], run["tokens"])])),
        "first_token_kl": float(np.mean([kl(r, t) for r, t in zip(ref["first_logits"], run["first_logits"])])),
        "seconds": run["seconds"],
    }


def make_bundles(bundle: Path, work: Path, data: Path) -> dict[str, Path]:
    """The GGUF variants (each with every ONNX variant) from the 16-bit bundle."""
    from tinyllava_edge.data.preprocess import PreprocessConfig, preprocess
    from tinyllava_edge.bundle import read_manifest
    from tinyllava_edge.quant.bundle import quantize_bundle

    pre = PreprocessConfig.from_dict(read_manifest(bundle)["preprocess"])
    train = json.loads((data / "train.json").read_text())
    images = sorted({r["image"] for r in train})[:64]  # GPTQ calibration: 64 training images
    pixels = preprocess([str(data / i) for i in images], pre)
    calibration = [pixels[i:i + 8] for i in range(0, len(pixels), 8)]
    out = {}
    for quant in GGUF_VARIANTS:
        out[quant] = work / f"bundle-{quant}"
        if not (out[quant] / "manifest.json").is_file():
            onnx = ONNX_VARIANTS if quant == "F16" else ()
            quantize_bundle(bundle, out[quant], quant=quant, onnx=onnx, calibration=calibration, verify=False,
                            progress=False, vision_default="fp32")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the trained tiny-shapes checkpoint")
    parser.add_argument("--bundle", type=Path, required=True, help="its 16-bit bundle")
    parser.add_argument("--data", type=Path, required=True, help="its shapes data folder (test.json, images/)")
    parser.add_argument("--n", type=int, default=1000, help="questions from the test split (%(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quality"), help="where variant bundles go")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the report goes")
    parser.add_argument("--report-only", action="store_true",
                        help="re-read docs/results/quality.json, redo the cheap extras (mmproj, tensor types), rewrite")
    parser.add_argument("--gptq-json", type=Path,
                        help="torch GPTQ rows measured by benchmarks/quality_gptq.py in .venv-gptq, merged in")
    parser.add_argument("--model-note",
                        help="what the model is, for the report's header (e.g. which recipe, trained on which CPU)")
    args = parser.parse_args()
    gptq = json.loads(args.gptq_json.read_text()) if args.gptq_json else None
    if args.report_only:
        report = json.loads((args.out / "results" / "quality.json").read_text())
        report["model_description"] = describe_model(args.model, args.model_note)
        report.update(extras(args.model, args.bundle, args.data, args.work))
        if gptq:
            merge_gptq(report, gptq)
        write_report(report, args.out)
        return 0 if report["floor"]["met"] else 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import tinyllava_edge
    from tinyllava_edge.bundle import files_by_role, read_manifest
    from tinyllava_edge.model.bnb import serialized_size
    from tinyllava_edge.quant.precisions import BIT_PRESETS
    from tinyllava_edge.quant.vision import VISION_MIN_COSINE

    torch.set_num_threads(1)
    questions = subset(args.data, args.n)
    bundles = make_bundles(args.bundle, args.work, args.data)
    edge = {"n_threads": 1, "kv_type": "f32", "flash_attn": "off", "device": "cpu"}
    variants: list[tuple[str, str, dict]] = [("torch fp32", "torch", {}), ("torch bnb nf4", "torch", {"quantization": "nf4"}),
                                            ("torch bnb int8", "torch", {"quantization": "int8"})]
    variants += [(f"GGUF {q} + ONNX fp32", q, {"vision": "fp32"}) for q in GGUF_VARIANTS]
    variants += [(f"GGUF F16 + ONNX {s}", "F16", {"vision": s}) for s in ONNX_VARIANTS]

    results, ref = [], None
    for name, where, options in variants:
        print(f"{name} ...", file=sys.stderr, flush=True)
        if where == "torch":
            vlm = tinyllava_edge.load(args.model, device="cpu", n_threads=1, **options)
            size = serialized_size(vlm.backend.model)
            files = "state dict (torch.save)"
        else:
            vlm = tinyllava_edge.load(bundles[where], **edge, **options)
            manifest = read_manifest(bundles[where])
            llm = files_by_role(manifest, "llm")[0]
            vision = next(f for f in files_by_role(manifest, "vision") if f["quant"] == options["vision"])
            size = llm["size"] + vision["size"]
            files = f"{llm['name']} + {vision['name']}"
        run = run_variant(vlm, questions, args.data)
        vlm.close()
        ref = ref or run
        results.append({"variant": name, "size_bytes": size, "files": files, **figures(run, ref, questions)})
        print(f"  {results[-1]['accuracy']:.1f} %  agreement {results[-1]['greedy_token_agreement']:.2f} %", file=sys.stderr)

    # What `--bits 8` / `--bits 4` bundles run: the accuracy rule for the default vision graph
    # (smallest within 0.5 point of fp32) checked against the cosine proxy export uses.
    by_name = {r["variant"]: r for r in results}
    fp32_acc = by_name["GGUF F16 + ONNX fp32"]["accuracy"]
    rule = {}
    for bits, candidates in ((int(k), BIT_PRESETS.get(k).vision) for k in BIT_PRESETS.keys()):
        ok = [s for s in candidates if by_name[f"GGUF F16 + ONNX {s}"]["accuracy"] >= fp32_acc - 0.5]
        sizes = {s: by_name[f"GGUF F16 + ONNX {s}"]["size_bytes"] for s in ok}
        rule[str(bits)] = min(sizes, key=sizes.get) if ok else "fp32"
    from tinyllava_edge.quant.bundle import quantize_bundle

    for bits, quant in ((int(k), BIT_PRESETS.get(k).llm) for k in reversed(BIT_PRESETS.keys())):
        combo = args.work / f"bits{bits}"
        if not (combo / "manifest.json").is_file():
            onnx = (rule[str(bits)],) if rule[str(bits)] != "fp32" else ()
            quantize_bundle(args.bundle, combo, quant=quant, onnx=onnx, verify=False, progress=False,
                            vision_default=rule[str(bits)])
        vlm = tinyllava_edge.load(combo, **edge)
        manifest = read_manifest(combo)
        llm = files_by_role(manifest, "llm")[0]
        vision = next(f for f in files_by_role(manifest, "vision") if f["quant"] == manifest["vision_default"])
        name = f"--bits {bits} bundle: {quant} + ONNX {vision['quant']}"
        print(f"{name} ...", file=sys.stderr, flush=True)
        run = run_variant(vlm, questions, args.data)
        vlm.close()
        results.append({"variant": name, "size_bytes": llm["size"] + vision["size"],
                        "files": f"{llm['name']} + {vision['name']}", **figures(run, ref, questions)})

    q8 = by_name["GGUF Q8_0 + ONNX fp32"]["greedy_token_agreement"]
    reference_digest = hashlib.sha256(json.dumps(ref["tokens"]).encode()).hexdigest()
    report = {
        "model": str(args.model), "model_description": describe_model(args.model, args.model_note),
        "bundle": str(args.bundle), "questions": len(questions),
        "subset": f"{len(questions)} of the {len(json.loads((args.data / 'test.json').read_text()))} test questions, "
                  "numpy default_rng(0).choice without replacement, in file order",
        "settings": {"max_new_tokens": MAX_NEW_TOKENS, "threads": 1, "kv_type": "f32", "flash_attn": "off"},
        "vision_default_by_accuracy": rule, "vision_proxy": f"mean token cosine >= {VISION_MIN_COSINE}",
        "floor": {"q8_0_greedy_token_agreement": q8, "required": FLOOR_Q8_AGREEMENT, "met": q8 >= FLOOR_Q8_AGREEMENT},
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
        "results": results,
        **extras(args.model, args.bundle, args.data, args.work),
    }
    if gptq:
        merge_gptq(report, gptq, reference_digest)
    write_report(report, args.out)
    return 0 if report["floor"]["met"] else 1


def merge_gptq(report: dict, gptq: dict, reference_digest: str | None = None) -> None:
    """Put the GPTQ rows after the other torch rows (replacing earlier ones of the same name), once
    their reference is checked to be this report's torch fp32 run: same questions, same accuracy
    per kind and, when this run's tokens are at hand, the same greedy tokens."""
    fp32 = next(r for r in report["results"] if r["variant"] == "torch fp32")
    ref = gptq["reference"]
    same = (gptq["questions"] == report["questions"] and abs(ref["accuracy"] - fp32["accuracy"]) < 1e-9
            and all(abs(ref["per_kind"][k] - v) < 1e-9 for k, v in fp32["per_kind"].items())
            and (reference_digest is None or ref["tokens_sha256"] == reference_digest))
    if not same:
        raise SystemExit(f"{gptq['model']}: the GPTQ rows were measured against another torch fp32 run "
                         f"({ref['accuracy']:.1f} % on {gptq['questions']} questions; this report's: "
                         f"{fp32['accuracy']:.1f} % on {report['questions']}); rerun benchmarks/quality_gptq.py "
                         "with the same --model, --data and --n")
    names = {r["variant"] for r in gptq["results"]}
    rows = [r for r in report["results"] if r["variant"] not in names]
    last_torch = max(i for i, r in enumerate(rows) if r["variant"].startswith("torch "))
    report["results"] = rows[:last_torch + 1] + gptq["results"] + rows[last_torch + 1:]
    report["gptq"] = {k: gptq[k] for k in ("model", "questions", "settings", "reference", "machine")}


def extras(model_dir: Path, bundle: Path, data: Path, work: Path) -> dict:
    """Per-tensor GGUF types of every variant, and stock mtmd with the F16 vs the Q8_0 mmproj."""
    from tinyllava_edge.export.validate import measure_mmproj
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration
    from tinyllava_edge.quant.gguf import tensor_types, type_summary

    import gguf

    types = {}
    for quant in GGUF_VARIANTS:
        path = work / f"bundle-{quant}" / f"llm-{quant}.gguf"
        types[quant] = type_summary(tensor_types(path), quant)
    # a tensor's row (shape[0], ggml order) is what K-quants need whole in blocks of 256
    matrices = [t for t in gguf.GGUFReader(str(bundle / "llm-F16.gguf")).tensors if len(t.shape) == 2]
    widths = sorted({int(t.shape[0]) for t in matrices})
    model = TinyLlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    records = json.loads((data / "test.json").read_text())
    images = [str(data / r["image"]) for r in records[:40:5]]  # 8 test images
    mmproj = {}
    for name, path in (("F16", bundle / "mmproj-F16.gguf"), ("Q8_0", work / "bundle-Q8_0" / "mmproj-Q8_0.gguf")):
        runs = [measure_mmproj(path, bundle / "llm-F16.gguf", model, image) for image in images]
        mmproj[name] = {"size_bytes": path.stat().st_size, "images": len(images),
                        "min_cosine": min(r["min_cosine"] for r in runs),
                        "mean_cosine": float(np.mean([r["mean_cosine"] for r in runs])),
                        "max_rel_diff": max(r["max_rel_diff"] for r in runs)}
    return {"gguf_tensor_types": types, "gguf_row_widths": widths, "mmproj": mmproj}


def pareto(results: list[dict]) -> set[str]:
    """Variants no other variant beats on both size (smaller) and accuracy (higher or equal)."""
    front = set()
    for r in results:
        if not any(o["size_bytes"] <= r["size_bytes"] and o["accuracy"] >= r["accuracy"]
                   and (o["size_bytes"], o["accuracy"]) != (r["size_bytes"], r["accuracy"]) for o in results):
            front.add(r["variant"])
    return front


def _accuracy(results: list[dict], variant: str) -> float:
    return next(r["accuracy"] for r in results if r["variant"] == variant)


def _drop(results: list[dict], variant: str) -> float:
    return _accuracy(results, "torch fp32") - _accuracy(results, variant)


def _gptq_note(results: list[dict]) -> str:
    rows = [r for r in results if "gptq" in r]
    if not rows:
        return ("* torch GPTQ is measured in its own environment (GPTQModel pulls a CUDA torch into this one): run "
                "`benchmarks/quality_gptq.py` in .venv-gptq (scripts/setup-gptq.sh) and pass its JSON as --gptq-json.")
    g = rows[0]["gptq"]
    calib = g["calibration"]
    fid = "; ".join(f"g{q['group_size']}: quantized in {q['quantize_seconds']:.0f} s, logits rel diff "
                    f"{q['fidelity']['gptq']['logits_rel_l2']:.2%} vs fp32 on {q['fidelity']['samples']} held-out "
                    f"samples (round-to-nearest on the same grid {q['fidelity']['rtn']['logits_rel_l2']:.2%})"
                    for q in (r["gptq"] for r in rows) if q.get("fidelity"))
    return (f"* torch GPTQ: GPTQModel {g['gptqmodel']} on CPU in .venv-gptq (`tinyllava-quantize --torch gptq`, "
            f"measured by `benchmarks/quality_gptq.py`), {g['quantized_linears']} LLM linears at {g['bits']} bits, "
            f"symmetric, calibrated on {calib['samples']} instruct.json conversations with their images "
            f"({calib['tokens']} tokens, {calib['image_rows']} of them image rows); embeddings, lm_head, tower and "
            f"connector stay fp32. {fid}. Run with GPTQModel's torch fused kernel: torch's int4 CPU matmul "
            "(`_weight_int4pack_mm_for_cpu`) with bf16 activations.")


def _widths_note(widths: list[int]) -> str:
    """Whether this model's matrices leave any K-quant a fallback (rows must be multiples of 256)."""
    listed = " or ".join(map(str, widths))
    narrow = [w for w in widths if w % 256]
    if not narrow:
        return (f"Every 2-D tensor of this model has rows {listed} wide, so no K-quant falls back here (K-quants "
                "need rows that are a multiple of 256); the Q6_K tensors in Q4_K_M / Q5_K_M / Q4_0 are llama.cpp's "
                "mix choices (output, attn_v, ffn_down of later layers).")
    return (f"The 2-D tensors of this model have rows {listed} wide; those {', '.join(map(str, narrow))} wide are "
            "not a multiple of 256, so K-quants fall back to another type there (listed above, beside the mix's "
            "own wider choices for output, attn_v, ffn_down).")


def _onnx_note(results: list[dict]) -> str:
    gptq, rtn = _accuracy(results, "GGUF F16 + ONNX int4-gptq"), _accuracy(results, "GGUF F16 + ONNX int4")
    compared = "worse than" if gptq < rtn else "as good as" if gptq == rtn else "better than"
    drop = _drop(results, "GGUF F16 + ONNX int8")
    cost = f"costs this small tower {drop:.1f} points" if drop > 0 else f"costs nothing here ({-drop:+.1f} points)"
    size = {r["variant"]: r["size_bytes"] for r in results}
    larger = ""
    if size["GGUF F16 + ONNX int4"] >= size["GGUF F16 + ONNX int8"]:
        larger = (" int4 (MatMulNBits) rewrites the MatMuls only, so the patch-embedding Conv stays fp32 and this "
                  "graph is larger in int4 than in int8 (`quantize_dynamic` makes the Conv a ConvInteger too).")
    return ("* ONNX int4-gptq is onnxruntime's vendored neural-compressor GPTQ (runs on CPU; 64 training images, "
            f"block 128, per-channel): {compared} RTN here ({gptq:.1f} % against {rtn:.1f} %). int8 is "
            f"`quantize_dynamic` (activations quantized at run time), which {cost}.{larger}")


def write_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    front = pareto(results)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    kinds = sorted(results[0]["per_kind"])
    head = ["variant", "size (MiB)", "exact match %", *kinds, "greedy agree %", "answers same %", "KL 1st tok",
            "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["variant"], f"{r['size_bytes'] / 2**20:.2f}", f"{r['accuracy']:.1f}",
                 *(f"{r['per_kind'][k]:.1f}" for k in kinds), f"{r['greedy_token_agreement']:.2f}",
                 f"{r['answers_identical']:.1f}", f"{r['first_token_kl']:.2e}", "yes" if r["variant"] in front else ""]
        lines.append("| " + " | ".join(cells) + " |")
    floor = report["floor"]
    text = [
        "# Quantization: accuracy vs size (tiny-shapes)", "",
        f"Model: {report.get('model_description') or report['model']}; its 16-bit bundle `{report['bundle']}`. "
        f"Questions: {report['subset']}. Greedy, "
        f"at most {MAX_NEW_TOKENS} new tokens, 1 thread, llama.cpp KV cache F32, flash attention off. Reference for "
        "agreement and KL: torch fp32. Size: LLM GGUF + the vision ONNX that ran (edge: the graph stops at the "
        "model's vision feature layer), `torch.save` of the state dict (torch: every tower layer; the bnb variants "
        "keep lm_head and the vision tower in fp32). Made by "
        "`benchmarks/quality.py`; figures in `docs/results/quality.json`.", "",
        *lines, "",
        f"Floor: Q8_0 greedy-token agreement with fp32 {floor['q8_0_greedy_token_agreement']:.2f} % "
        f"(required >= {floor['required']:.0f} %): {'met' if floor['met'] else 'NOT met'}.", "",
        f"Default vision graph by the accuracy rule (smallest within 0.5 point of fp32): "
        f"8-bit {report['vision_default_by_accuracy']['8']}, 4-bit {report['vision_default_by_accuracy']['4']}; the "
        f"export flow uses the proxy {report['vision_proxy']} on drawn shapes scenes (quant/vision.py).", "",
        "![accuracy vs size](quality.png)", "",
        "## GGUF tensor types actually written (read back with gguf.GGUFReader)", "",
        "| type | tensors per ggml type | not in the main type (K-quant fallback or the mix's wider tensors) |",
        "|---|---|---|",
        *(f"| {q} | {', '.join(f'{k} x{v}' for k, v in t['counts'].items())} | "
          f"{', '.join(f'{n} {ty}' for n, ty in t['not_main_type'].items()) or '-'} |"
          for q, t in report.get("gguf_tensor_types", {}).items()), "",
        *([_widths_note(report["gguf_row_widths"])] if "gguf_row_widths" in report else []),
        "On narrower models llama.cpp writes fallbacks (e.g. token_embd in Q5_0/Q8_0 at hidden 64: "
        "tests/test_quant.py) and `tinyllava-quantize` lists them.", "",
        "## mmproj (stock llama.cpp mtmd vs PyTorch `encode_images`)", "",
        "| mmproj | size (MiB) | min token cosine | mean token cosine | max rel diff |", "|---|---|---|---|---|",
        *(f"| {k} | {v['size_bytes'] / 2**20:.2f} | {v['min_cosine']:.5f} | {v['mean_cosine']:.6f} | "
          f"{v['max_rel_diff']:.2g} |" for k, v in report.get("mmproj", {}).items()), "",
        "Stock llama.cpp accepts the Q8_0 mmproj (gguf-py's numpy Q8_0 on the attention/FFN/projector "
        "matrices; patch and position embeddings kept F16), so 4- and 8-bit bundles carry mmproj-Q8_0.gguf.", "",
        "## Notes", "",
        _gptq_note(results), "* bnb fp4 is offered too (not in the table).", _onnx_note(results),
        f"* The fp32 checkpoint scores {_accuracy(results, 'torch fp32'):.1f} % on this subset; the figures compare "
        "variants of that model, not the preset's training floor.", "",
    ]
    (out / "quality.md").write_text("\n".join(text) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        on = r["variant"] in front
        ax.scatter(r["size_bytes"] / 2**20, r["accuracy"], color="tab:red" if on else "tab:blue", zorder=3)
        ax.annotate(r["variant"], (r["size_bytes"] / 2**20, r["accuracy"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    pts = sorted((r["size_bytes"] / 2**20, r["accuracy"]) for r in results if r["variant"] in front)
    ax.plot(*zip(*pts), color="tab:red", linestyle="--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MiB, log)")
    ax.set_ylabel(f"shapes exact match (%), {report['questions']} test questions")
    ax.set_title("tiny-shapes: accuracy vs size per quantized variant")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=130)


if __name__ == "__main__":
    sys.exit(main())
