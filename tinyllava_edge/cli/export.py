"""``tinyllava-export``: a checkpoint -> an edge bundle (vision ONNX, LLM GGUF, mmproj, manifest.json),
or with ``--format hf`` a transformers LLaVA folder for serving engines (vLLM).

A thin layer over :func:`tinyllava_edge.export.export_bundle` (16 and 32 bits),
:func:`tinyllava_edge.quant.bundle.export_quantized` (8 and 4 bits: the 16-bit bundle, then
quantized) and :func:`tinyllava_edge.export.hf_llava.export_hf`; their defaults are the library's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyllava_edge.bundle import MANIFEST_NAME
from tinyllava_edge.cli.common import USER_ERRORS, ArgumentParser, add_model_option, fail
from tinyllava_edge.sizes import human_size


def build_parser() -> argparse.ArgumentParser:
    # export.bundle and quant.precisions import nothing heavy at module level: --help stays fast.
    from tinyllava_edge.export.bundle import (
        BITS,
        DEFAULT_BITS,
        DEFAULT_CHECK_IMAGES,
        DEFAULT_CHECK_TOKENS,
        DEFAULT_FORMAT,
        FORMATS,
    )
    from tinyllava_edge.export.hf_llava import HF_FORMAT
    from tinyllava_edge.quant.precisions import BITS as QUANT_BITS

    parser = ArgumentParser(
        prog="tinyllava-export",
        description="Export a TinyLLaVA checkpoint (Factory, legacy TinyLLaVABench or HF LLaVA layout) as an edge "
                    "bundle: vision.onnx, llm-<TYPE>.gguf, mmproj-<TYPE>.gguf (stock llama.cpp) and manifest.json; "
                    "or, with --format hf, as a transformers LlavaForConditionalGeneration folder that vLLM serves. "
                    "Every part is checked against PyTorch unless --no-verify.",
    )
    add_model_option(parser, "checkpoint directory", required=True)
    parser.add_argument("--out", required=True, type=Path, help="bundle (or HF folder) directory to create")
    parser.add_argument("--format", choices=(*FORMATS, HF_FORMAT), default=DEFAULT_FORMAT,
                        help="gguf: vision ONNX + LLM GGUF + mmproj; onnx: the vision ONNX alone; hf: an fp32 "
                             "LlavaForConditionalGeneration folder for transformers and vLLM (%(default)s)")
    # None: not given (the bundle default; an HF folder is always fp32, engines cast on load)
    parser.add_argument("--bits", type=int, choices=sorted(BITS + QUANT_BITS), default=None,
                        help="16: F16 GGUF files; 32: F32; 8: Q8_0 LLM + Q8_0 mmproj + int8 vision graph; 4: Q4_K_M "
                             "LLM + Q8_0 mmproj + int8/int4 vision graphs (8 and 4: the 16-bit bundle, then "
                             f"quantized as tinyllava-quantize --bits does) ({DEFAULT_BITS})")
    parser.add_argument("--no-verify", action="store_true", help="skip the checks against PyTorch")
    parser.add_argument("--no-mmproj", action="store_true", help="do not write the stock-llama.cpp mmproj")
    parser.add_argument("--onnx-fp16", action="store_true", help="also write vision-fp16.onnx")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous bundle at --out")
    parser.add_argument("--check-images", type=int, default=DEFAULT_CHECK_IMAGES,
                        help="image prompts the LLM check runs (%(default)s)")
    parser.add_argument("--check-tokens", type=int, default=DEFAULT_CHECK_TOKENS,
                        help="greedy tokens per check prompt (%(default)s)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="refuse up front, saying how much it needs, when the export's estimated peak resident "
                             "memory is larger than SIZE (e.g. 8GB; GB = 10^9 bytes, GiB = 2^30)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run(args: argparse.Namespace) -> dict:
    from tinyllava_edge.errors import TinyLlavaError
    from tinyllava_edge.export.bundle import DEFAULT_BITS, PRECISIONS
    from tinyllava_edge.export.hf_llava import HF_FORMAT, export_hf
    from tinyllava_edge.hub import resolve_model

    model = resolve_model(args.model, args.revision)
    if args.format == HF_FORMAT:
        unused = [flag for flag, given in (("--bits", args.bits not in (None, 32)), ("--no-mmproj", args.no_mmproj),
                                           ("--onnx-fp16", args.onnx_fp16), ("--max-memory", args.max_memory))
                  if given]
        if unused:
            raise TinyLlavaError(f"{', '.join(unused)} apply to edge bundles; --format hf writes fp32 weights "
                                 "(engines cast them on load, e.g. vllm serve --dtype bfloat16)")
        return export_hf(model, args.out, verify=not args.no_verify, progress=not args.quiet,
                         overwrite=args.overwrite, check_images=args.check_images, check_tokens=args.check_tokens)
    from tinyllava_edge.memory import parse_size

    bits = DEFAULT_BITS if args.bits is None else args.bits
    options = dict(fmt=args.format, mmproj=not args.no_mmproj, verify=not args.no_verify, progress=not args.quiet,
                   onnx_fp16=args.onnx_fp16, overwrite=args.overwrite, check_images=args.check_images,
                   check_tokens=args.check_tokens,
                   max_memory=parse_size(args.max_memory) if args.max_memory is not None else None)
    if str(bits) in PRECISIONS:
        from tinyllava_edge.export import export_bundle

        return export_bundle(model, args.out, bits=bits, **options)
    from tinyllava_edge.quant.bundle import export_quantized

    return export_quantized(model, args.out, bits, **options)


def hf_summary_lines(result: dict) -> list[str]:
    """What the HF LLaVA folder holds, with sizes, then the fidelity against transformers' LLaVA."""
    record = result["record"]
    lines = [f"HF LLaVA folder {result['path']} written in {result['seconds']:.1f} s "
             f"({record['model']['llm_family']} + {record['model']['vision_tower']}, "
             f"{record['model']['image_tokens']} image tokens)"]
    lines += [f"  {f['name']:28s} {human_size(f['size']):>10s}" for f in record["files"]]
    v = record["validation"]
    if not v.get("enabled"):
        lines.append("fidelity: not measured (--no-verify)")
        return lines
    t = v["transformers_llava"]
    lines.append(f"fidelity against PyTorch (transformers' LlavaForConditionalGeneration + AutoProcessor from the "
                 f"folder): logits max abs diff {t['logits_max_abs_diff']:.2g} (fp32); greedy tokens identical on "
                 f"{t['greedy_identical']}/{t['prompts']} image prompts x {t['new_tokens']} tokens; token ids "
                 f"identical on {t['ids_identical']}/{t['prompts']}")
    return lines


def summary_lines(result: dict) -> list[str]:
    """What was written where, with sizes, then the measured fidelity (for a quantized bundle: the
    quantization's summary, then the 16-bit bundle's checks against PyTorch)."""
    if "export" in result:
        from tinyllava_edge.cli.quantize import summary_lines as quantize_lines

        return quantize_lines(result) + stage_lines(result["manifest"]) + fidelity_lines(
            result["export"]["manifest"]["validation"], "the 16-bit bundle it was quantized from")
    manifest = result["manifest"]
    out = Path(result["path"])
    lines = [f"bundle {out} ({manifest['format']}, {manifest['bits']}-bit) written in {result['seconds']:.1f} s"]
    for f in manifest["files"]:
        lines.append(f"  {f['name']:22s} {f['role']:8s} {f['quant']:5s} {human_size(f['size']):>10s}")
    lines.append(f"  {MANIFEST_NAME:22s} {'':8s} {'':5s} {human_size((out / MANIFEST_NAME).stat().st_size):>10s}")
    for s in manifest["skipped"]:
        lines.append(f"  skipped {s['role']}: {s['reason']}")
    return lines + stage_lines(manifest) + fidelity_lines(manifest["validation"])


def stage_lines(manifest: dict) -> list[str]:
    """The costliest stage by memory, against the checkpoint's size (the per-stage figures are in
    the manifest's `stages` and were printed as the export ran)."""
    stages = manifest.get("stages") or []
    if not stages:
        return []
    top = max(stages, key=lambda r: r["peak_rss_bytes"])
    plan = manifest.get("memory_plan") or {}
    ratio = f" ({top['peak_rss_bytes'] / plan['checkpoint_bytes']:.2f}x the checkpoint's " \
            f"{human_size(plan['checkpoint_bytes'])})" if plan.get("checkpoint_bytes") else ""
    return [f"peak resident memory {human_size(top['peak_rss_bytes'])}{ratio} in stage '{top['stage']}'; "
            f"{len(stages)} stages, {sum(r['seconds'] for r in stages):.1f} s"]


def fidelity_lines(v: dict, what: str = "") -> list[str]:
    """The checks against PyTorch recorded at export (`validation`), of `what` when given."""
    if not v.get("enabled"):
        return ["fidelity: not measured (--no-verify)"]
    lines = [f"fidelity against PyTorch{' (' + what + ')' if what else ''}:"]
    if "vision_onnx" in v:
        lines.append(f"  vision ONNX fp32  max abs diff {v['vision_onnx']['max_abs_diff']:.2g}")
    if "vision_onnx_fp16" in v:
        half = v["vision_onnx_fp16"]
        lines.append(f"  vision ONNX fp16  max abs diff {half['max_abs_diff']:.2g}, min token cosine "
                     f"{half['min_token_cosine']:.5f}")
    if "llm" in v:
        llm = v["llm"]
        ties = f", {llm['greedy_ties']} rounding ties" if llm["greedy_ties"] else ""
        lines.append(f"  LLM with image    prompt logits max abs diff {llm['logits_max_abs_diff']:.2g} "
                     f"(relative {llm['logits_rel_diff']:.2g}); greedy tokens identical on "
                     f"{llm['greedy_identical']}/{llm['prompts']} prompts x {llm['new_tokens']} tokens{ties}")
    if "tokenizer" in v:
        tok = v["tokenizer"]
        known = f" ({len(tok['known_deviation'])} texts with the documented leading-'▁' difference left out)" \
            if tok["known_deviation"] else ""
        lines.append(f"  tokenizer         {tok['percent']:.1f} % of {tok['compared']} texts identical{known}")
    if "mmproj" in v:
        mm = v["mmproj"]
        lines.append(f"  mmproj (stock)    min token cosine {mm['min_cosine']:.4f}, {mm['n_tokens_stock']} tokens vs "
                     f"{mm['n_tokens_torch']}; {len(mm['known_deviations'])} known deviations (see {MANIFEST_NAME})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except USER_ERRORS as err:
        return fail(err)
    print("\n".join(hf_summary_lines(result) if "record" in result else summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
