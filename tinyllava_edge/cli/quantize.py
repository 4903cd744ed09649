"""``tinyllava-quantize``: a 16/32-bit bundle -> a new bundle with a quantized LLM GGUF (llama.cpp's
quantizer), the mmproj at Q8_0 and optional quantized vision graphs.

A thin layer over :func:`tinyllava_edge.quant.bundle.quantize_bundle`; its defaults are the library's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import USER_ERRORS, fail, human_size

GGUF_CHOICES = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")  # quant/gguf.py GGUF_TYPES
ONNX_CHOICES = ("int8", "int4", "int4-gptq")  # quant/onnx.py ONNX_SCHEMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllava-quantize",
        description="Requantize a bundle's LLM GGUF from its F16/F32 file with llama.cpp's quantizer into a new "
                    "bundle directory (atomic; manifest updated with types, sizes, sha256 and per-tensor types).",
    )
    parser.add_argument("--bundle", required=True, type=Path, help="source bundle directory (16 or 32 bit)")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--quant", help=f"GGUF type: {', '.join(GGUF_CHOICES)} (default Q4_K_M)")
    what.add_argument("--bits", type=int, help="8 -> Q8_0, 4 -> Q4_K_M")
    parser.add_argument("--onnx", action="append", default=[], metavar="SCHEME",
                        help=f"add a quantized vision graph ({', '.join(ONNX_CHOICES[:2])}; repeatable)")
    parser.add_argument("--vision-default", help="vision graph the runtime runs by default (fp32, int8, int4, ...)")
    parser.add_argument("--keep-mmproj", action="store_true", help="copy the mmproj as it is (default: Q8_0)")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the source LLM")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous bundle at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run(args: argparse.Namespace) -> dict:
    from ..quant.bundle import quantize_bundle, resolve_quant

    return quantize_bundle(args.bundle, args.out, quant=resolve_quant(args.quant, args.bits), onnx=tuple(args.onnx),
                           vision_default=args.vision_default, mmproj=None if args.keep_mmproj else "Q8_0",
                           verify=not args.no_verify, overwrite=args.overwrite, progress=not args.quiet)


def summary_lines(result: dict) -> list[str]:
    manifest = result["manifest"]
    q = manifest["quantization"]
    lines = [f"bundle {result['path']} ({q['llm']['type']}) written in {result['seconds']:.1f} s"]
    for f in manifest["files"]:
        lines.append(f"  {f['name']:22s} {f['role']:8s} {f['quant']:7s} {human_size(f['size']):>10s}")
    lines.append(f"  LLM tensor types: {', '.join(f'{k} x{v}' for k, v in q['llm']['counts'].items())}")
    if q["llm"]["not_main_type"]:
        other = ", ".join(f"{n} {t}" for n, t in q["llm"]["not_main_type"].items())
        lines.append(f"  not {q['llm']['main_type']} (fallback or mix): {other}")
    if manifest.get("vision_default"):
        lines.append(f"  runtime vision graph by default: {manifest['vision_default']}")
    fid = q["llm"].get("fidelity")
    if fid:
        lines.append(f"fidelity against {q['llm']['from']}: greedy tokens {fid['greedy_token_agreement']:.1f} % "
                     f"({fid['answers_identical']}/{fid['prompts']} answers identical), first-token KL "
                     f"{fid['first_token_kl_mean']:.2g}, prompt logits rel diff {fid['logits_rel_diff']:.2g}")
    for scheme, v in q.get("vision", {}).items():
        lines.append(f"  vision {scheme}: mean token cosine {v['mean_token_cosine']:.4f} vs fp32")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except USER_ERRORS as err:
        return fail(err)
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
