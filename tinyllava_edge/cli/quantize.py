"""``tinyllava-quantize``: a 16/32-bit bundle -> a new bundle with a quantized LLM GGUF (llama.cpp's
quantizer), the mmproj at Q8_0 and optional quantized vision graphs (`--bits N`: the same preset,
and so the same bundle, as `tinyllava-export --bits N`); or (``--torch gptq``) a checkpoint -> a
checkpoint whose LLM is GPTQ 4-bit (GPTQModel, CPU; needs .venv-gptq).

A thin layer over :func:`tinyllava_edge.quant.bundle.quantize_bundle` and
:func:`tinyllava_edge.quant.torch_gptq.quantize_gptq`; their defaults are the library's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyllava_edge.cli.common import REVISION_HELP, USER_ERRORS, ArgumentParser, add_model_option, fail
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.sizes import human_size

TORCH_CHOICES = ("gptq",)  # written to disk; bnb nf4/fp4/int8 apply at load time (tinyllava_edge.load)
BUNDLE_ONLY = ("quant", "onnx", "vision_default", "keep_mmproj")
TORCH_ONLY = ("checkpoint", "data", "group_size", "samples", "seq_len")


def build_parser() -> argparse.ArgumentParser:
    # The lists come from where they are defined (numpy is the heaviest import here).
    from tinyllava_edge.quant.bundle import DEFAULT_QUANT
    from tinyllava_edge.quant.gguf import GGUF_TYPES
    from tinyllava_edge.quant.onnx import ONNX_SCHEMES
    from tinyllava_edge.quant.precisions import BIT_PRESETS

    presets = "; ".join(f"{p.bits} -> {p.llm} LLM, {p.mmproj} mmproj, {' + '.join(p.vision)} vision graphs"
                        for p in map(BIT_PRESETS.get, BIT_PRESETS.keys()))
    # int4-gptq needs calibration images, which only the library call takes
    onnx_schemes = [name for name in ONNX_SCHEMES.keys() if not ONNX_SCHEMES.get(name).needs_calibration]
    parser = ArgumentParser(
        prog="tinyllava-quantize",
        description="Requantize a bundle's LLM GGUF from its F16/F32 file with llama.cpp's quantizer into a new "
                    "bundle directory (atomic; manifest updated with types, sizes, sha256 and per-tensor types); "
                    "or, with --torch gptq, write a checkpoint whose LLM is GPTQ 4-bit, calibrated on --data "
                    "(GPTQModel on CPU, in the environment scripts/setup-gptq.sh makes).",
    )
    add_model_option(parser, "source bundle directory (16 or 32 bit)", flag="--bundle", revision=False)
    parser.add_argument("--out", required=True, type=Path,
                        help="bundle (or, with --torch, checkpoint) directory to create")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--quant", choices=GGUF_TYPES.keys(), help=f"GGUF type of the LLM (default {DEFAULT_QUANT})")
    what.add_argument("--bits", type=int, help=f"bundle, what tinyllava-export --bits writes: {presets}; --torch gptq: "
                                               "4 (the default)")
    parser.add_argument("--onnx", action="append", default=[], choices=onnx_schemes,
                        help="add a quantized vision graph (repeatable; with --bits: instead of the preset's)")
    parser.add_argument("--vision-default", help="vision graph the runtime runs by default (fp32, int8, int4, ...)")
    parser.add_argument("--keep-mmproj", action="store_true", help="copy the mmproj as it is (default: Q8_0)")
    torch = parser.add_argument_group("torch checkpoints (--torch gptq)")
    torch.add_argument("--torch", choices=TORCH_CHOICES, help="quantize a checkpoint's LLM instead of a bundle")
    add_model_option(torch, "source checkpoint directory (fp32/bf16, any layout)", flag="--checkpoint", revision=False)
    torch.add_argument("--data", type=Path, help="calibration data: a data directory (instruct.json, else "
                                                 "train.json) or a LLaVA JSON file")
    torch.add_argument("--group-size", type=int, help="GPTQ group size: 128, 64, 32, 16 or -1 (default: the "
                                                      "largest dividing every LLM input width)")
    torch.add_argument("--samples", type=int, help="calibration samples (default 128)")
    torch.add_argument("--seq-len", type=int, help="tokens per calibration sample, image rows included (default 512)")
    parser.add_argument("--revision", help=f"{REVISION_HELP}, for --bundle or --checkpoint")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the source")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous bundle (checkpoint) at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _check_mode(args: argparse.Namespace) -> None:
    """One sentence when the options mix the bundle and the checkpoint modes or lack a source."""
    def given(names: tuple[str, ...]) -> list[str]:
        return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False, [])]

    if args.torch:
        if args.bundle is not None or given(BUNDLE_ONLY):
            raise TinyLlavaError(f"--torch {args.torch} quantizes a checkpoint; "
                                 f"{', '.join((['--bundle'] if args.bundle else []) + given(BUNDLE_ONLY))} "
                                 "apply to bundles")
        if args.checkpoint is None or args.data is None:
            raise TinyLlavaError(f"--torch {args.torch} needs --checkpoint (the source checkpoint) and --data "
                                 "(calibration data)")
    else:
        if given(TORCH_ONLY):
            raise TinyLlavaError(f"{', '.join(given(TORCH_ONLY))} apply with --torch gptq only")
        if args.bundle is None:
            raise TinyLlavaError("give --bundle (requantize a bundle's GGUF) or --torch gptq --checkpoint DIR "
                                 "--data DIR (GPTQ a checkpoint's LLM)")


def run(args: argparse.Namespace) -> dict:
    from tinyllava_edge.hub import resolve_model

    _check_mode(args)
    source = resolve_model(args.checkpoint if args.torch else args.bundle, args.revision)
    if args.torch:
        from tinyllava_edge.quant import torch_gptq

        options = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size),
                                     ("n_samples", args.samples), ("seq_len", args.seq_len)) if v is not None}
        return torch_gptq.quantize_gptq(source, args.out, data=args.data, verify=not args.no_verify,
                                        overwrite=args.overwrite, progress=not args.quiet, **options)
    from tinyllava_edge.quant.bundle import DEFAULT_QUANT, preset_options, quantize_bundle

    options = preset_options(args.bits) if args.bits is not None else {"quant": args.quant or DEFAULT_QUANT}
    if args.onnx:
        options["onnx"] = tuple(args.onnx)
    if args.keep_mmproj:
        options["mmproj"] = None
    return quantize_bundle(source, args.out, **options, vision_default=args.vision_default,
                           verify=not args.no_verify, overwrite=args.overwrite, progress=not args.quiet)


def gptq_summary_lines(result: dict) -> list[str]:
    record, out = result["record"], Path(result["path"])
    calib = record["calibration"]
    lines = [f"checkpoint {out} (LLM GPTQ {record['bits']}-bit, group {record['group_size']}, "
             f"{record['quantized_linears']} linears) written in {result['seconds']:.1f} s"]
    for name, what in (("language_model/model.safetensors", "GPTQ LLM (embeddings and lm_head unquantized)"),
                       ("model.safetensors", "vision tower + connector, unchanged")):
        lines.append(f"  {name:34s} {human_size((out / name).stat().st_size):>10s}  {what}")
    lines.append(f"  calibration: {calib['samples']} samples, {calib['tokens']} tokens ({calib['image_rows']} of them "
                 f"image rows) from {calib['file']}; GPTQ took {record['quantize_seconds']:.1f} s")
    fid = record.get("fidelity")
    if fid:
        g, r = fid["gptq"], fid["rtn"]
        lines.append(f"fidelity against the fp32 LLM on {fid['samples']} held-out samples: logits rel diff "
                     f"{g['logits_rel_l2']:.2%} (round-to-nearest on the same grid {r['logits_rel_l2']:.2%}), top-1 "
                     f"{g['top1_agreement']:.1f} % (RTN {r['top1_agreement']:.1f} %), KL {g['kl_mean']:.2g}")
    return lines


def summary_lines(result: dict) -> list[str]:
    if "record" in result:
        return gptq_summary_lines(result)
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
