"""`quantize_bundle`: a 16/32-bit bundle -> a new bundle with its LLM GGUF (and optionally mmproj,
vision graphs) quantized. What `tinyllava-quantize` runs; `quantize_to_bits` applies one of the
`--bits` presets (quant/precisions.py), and `export_quantized` composes export and quantization
for `tinyllava-export --bits 4|8`: the checkpoint's 16-bit bundle into a scratch folder, then
that bundle quantized to the destination. Data flows one way, export -> quant.

    quantize_bundle("bundles/tiny", "bundles/tiny-q4", quant="Q4_K_M", onnx=("int8", "int4"))
    quantize_to_bits("bundles/tiny", "bundles/tiny-q4", 4)              # the --bits 4 preset
    export_quantized("runs/model", "bundles/model-q4", 4)                # checkpoint -> 4-bit bundle

The source bundle is read with `read_manifest` (hashes checked) and left untouched. The new one is
assembled in a temporary directory beside `out_dir` (the other parts copied, the LLM requantized
from the F16/F32 file by llama.cpp) and renamed into place only when complete, so a failure
leaves nothing at `out_dir`. The manifest keeps every fact of the source and records, per new
file, its quant type, size and sha256; the LLM record also lists the per-tensor types actually
written (`tensor_types`) and which tensors are not in the main type (`not_main_type`: K-quant
fallbacks and the mix's wider tensors). `quantization` in the manifest says what was done and
the measured fidelity against the source bundle.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tinyllava_edge.atomic import replace_folder, staged_folder
from tinyllava_edge.bundle import MANIFEST_NAME, file_record, files_by_role, read_manifest, write_manifest
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.quant.gguf import gguf_type, quantize_gguf
from tinyllava_edge.quant.onnx import ONNX_SCHEMES
from tinyllava_edge.quant.precisions import preset_for
from tinyllava_edge.staging import Steps, check_bundle_destination, disk_full_is_one_sentence

DEFAULT_QUANT = "Q4_K_M"
CHECK_PROMPTS = 4  # synthetic image prompts the fidelity check decodes
CHECK_TOKENS = 8


def quantize_bundle(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quant: str = DEFAULT_QUANT,
                    onnx: Sequence[str] = (), vision_default: str | None = None, mmproj: str | None = "Q8_0",
                    calibration: Sequence[np.ndarray] | None = None, verify: bool = True,
                    logits_tol: float | None = None, overwrite: bool = False, progress: bool = True,
                    keep_source_path: bool = True, source_runs: list[dict] | None = None,
                    take_files: bool = False) -> dict:
    """Write a copy of `bundle_dir` at `out_dir` with `llm-<quant>.gguf` instead of its F16/F32 LLM.

    `onnx`: vision graph schemes to add (int8, int4, int4-gptq; the last needs `calibration`,
    batches of preprocessed images). `vision_default`: the graph the runtime runs by default
    (None: the smallest added graph that passes quant/vision.py's proxy, else fp32; the source's
    when no graph is added).
    `mmproj` "Q8_0" requantizes an F16/F32 mmproj (None copies it). `verify` decodes
    CHECK_PROMPTS synthetic image prompts with both LLM files and records the agreement; with
    `logits_tol` it also fails when the prompt logits differ by more than that, relative to the
    largest source logit. `keep_source_path` False leaves the source bundle's path out of the
    record (a scratch bundle that will not exist). `source_runs`: llama.cpp's runs of the source
    LLM from the export that just wrote it (export_bundle's `llm_runs`), which the check then
    reuses instead of decoding the source file again. `take_files`: move the parts kept as they
    are out of the source instead of copying them (a scratch source, deleted afterwards; copied
    across file systems). Not hard links: onnx refuses external data with more than one link.
    Returns {path, manifest, seconds}.
    """
    gguf_type(quant)
    for scheme in onnx:
        ONNX_SCHEMES.get(scheme)
    source, final = Path(bundle_dir), Path(out_dir)
    if not source.is_dir() or not (source / MANIFEST_NAME).is_file():
        raise TinyLlavaError(f"{source} is not a bundle (no {MANIFEST_NAME}); expected a directory written by "
                             "tinyllava-export")
    manifest = read_manifest(source)
    llms = files_by_role(manifest, "llm")
    if not llms:
        raise TinyLlavaError(f"bundle {source} has no LLM GGUF (an onnx-format bundle); quantize a gguf bundle")
    llm = llms[0]
    if llm["quant"] not in ("F16", "F32"):
        raise TinyLlavaError(f"bundle {source} holds a {llm['quant']} LLM; quantize from a 16- or 32-bit bundle "
                             "(requantizing compounds the rounding)")
    if source.resolve() == final.resolve():
        raise TinyLlavaError(f"the output {final} is the source bundle; write the quantized bundle elsewhere")
    check_bundle_destination(final, overwrite)
    mm = files_by_role(manifest, "mmproj")
    redo_mmproj = mmproj is not None and bool(mm) and mm[0]["quant"] in ("F16", "F32")
    steps = Steps(2 + redo_mmproj + bool(onnx) + verify + 1, progress)
    started = time.perf_counter()
    with disk_full_is_one_sentence(final), staged_folder(final) as staging:
        steps.start(f"{'moving' if take_files else 'copying'} the parts of {source.name} kept as they are")
        replaced = {llm["name"]} | ({mm[0]["name"]} if redo_mmproj else set())
        files = []
        for record in manifest["files"]:
            if record["name"] in replaced:
                continue
            _copy(source / record["name"], staging / record["name"], take_files)
            files.append(dict(record))
        steps.start(f"{llm['name']} -> llm-{quant}.gguf (llama.cpp quantizer)")
        llm_path = staging / f"llm-{quant}.gguf"
        report = quantize_gguf(source / llm["name"], llm_path, quant)
        llm_record = {**{k: v for k, v in llm.items() if k not in ("name", "quant", "size", "sha256")},
                      **file_record(llm_path, "llm", "gguf", quant), "source_file": llm["name"],
                      "tensor_types": report["summary"]["counts"], "main_type": report["summary"]["main_type"],
                      "not_main_type": report["summary"]["not_main_type"]}
        files.insert(_index(manifest["files"], llm["name"]), llm_record)
        record_of = {"llm": {"type": quant, "from": llm["name"], **report["summary"]}}
        if redo_mmproj:
            from tinyllava_edge.quant.mmproj import quantize_mmproj

            steps.start(f"{mm[0]['name']} -> mmproj-{mmproj}.gguf")
            path = staging / f"mmproj-{mmproj}.gguf"
            quantize_mmproj(source / mm[0]["name"], path, mmproj)
            facts = {k: v for k, v in mm[0].items() if k not in ("name", "quant", "size", "sha256")}
            files.insert(_index(manifest["files"], mm[0]["name"]),
                         {**file_record(path, "mmproj", "gguf", mmproj), **facts})
            record_of["mmproj"] = {"type": mmproj, "from": mm[0]["name"]}
        new_manifest = copy.deepcopy(manifest)
        if onnx:
            from tinyllava_edge.data.preprocess import PreprocessConfig
            from tinyllava_edge.quant.vision import vision_variants

            steps.start(f"vision graphs: {', '.join(onnx)}")
            fp32 = next(f for f in files if f["role"] == "vision" and f["quant"] == "fp32")
            variants = vision_variants(staging, fp32, PreprocessConfig.from_dict(manifest["preprocess"]), onnx,
                                       calibration=calibration)
            files = [f for f in files if not (f["role"] == "vision" and f["quant"] in onnx)] + variants["files"]
            record_of["vision"] = variants["validation"]
            new_manifest["vision_default"] = vision_default or variants["vision_default"]
        elif vision_default:
            new_manifest["vision_default"] = vision_default
        if new_manifest.get("vision_default") and not any(
                f["role"] == "vision" and f["quant"] == new_manifest["vision_default"] for f in files):
            raise TinyLlavaError(f"vision_default {new_manifest['vision_default']!r} names no vision graph of the "
                                 "bundle")
        if verify:
            n_check = len(source_runs) if source_runs else CHECK_PROMPTS
            reused = " (its runs reused from the export's check)" if source_runs else ""
            steps.start(f"checking llm-{quant}.gguf against {llm['name']}{reused} on {n_check} image prompts")
            from tinyllava_edge.quant.fidelity import compare_llm_files

            # the vision graph, when the prompts are made here, from the new bundle (a taken source lacks it)
            fidelity = compare_llm_files(manifest, staging, source / llm["name"], llm_path, CHECK_PROMPTS,
                                         CHECK_TOKENS, source_runs=source_runs or None)
            record_of["llm"]["fidelity"] = fidelity
            if logits_tol is not None and fidelity["logits_rel_diff"] > logits_tol:
                raise TinyLlavaError(
                    f"check 'quantized LLM vs {llm['name']}' failed: prompt logits differ by "
                    f"{fidelity['logits_rel_diff']:.3g} of the largest logit; expected <= {logits_tol:g}")
        steps.start(f"writing {MANIFEST_NAME}")
        steps.done()
        # a scratch source (export_quantized) was made by this same run: its stages are this bundle's too
        made_before = [] if keep_source_path else [{**r, "stage": f"export: {r['stage']}"}
                                                   for r in manifest.get("stages", [])]
        new_manifest.update({
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bits": int(gguf_type(quant).bits),  # nominal: Q8_0 -> 8, Q6_K -> 6, Q4_K_M -> 4
            "files": files,
            "quantization": {"source_bundle": str(source.resolve()) if keep_source_path else None,
                             "source_created": manifest.get("created"), **record_of},
            "stages": made_before + steps.records,  # wall time and peak resident memory per stage
        })
        write_manifest(staging, new_manifest)
        read_manifest(staging)  # the new bundle is whole and self-consistent
        replace_folder(staging, final)
        steps.done()
    return {"path": str(final), "manifest": new_manifest, "seconds": time.perf_counter() - started}


def _copy(source: Path, target: Path, move: bool) -> None:
    if move:
        try:
            os.replace(source, target)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copyfile(source, target)


def _index(records: list[dict], name: str) -> int:
    return next(i for i, r in enumerate(records) if r["name"] == name)


def preset_options(bits: int) -> dict:
    """The `quantize_bundle` options of the `--bits` preset: LLM and mmproj types, vision graphs,
    the logit tolerance."""
    preset = preset_for(bits)
    return {"quant": preset.llm, "mmproj": preset.mmproj, "onnx": preset.vision, "logits_tol": preset.logits_tol}


def quantize_to_bits(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, bits: int, **options) -> dict:
    """`quantize_bundle` with the preset of `bits` (quant/precisions.py); `options` are the rest of
    quantize_bundle's (verify, overwrite, progress, ...)."""
    return quantize_bundle(bundle_dir, out_dir, **preset_options(bits), **options)


def export_quantized(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, bits: int, *,
                     fmt: str = "gguf", verify: bool = True, overwrite: bool = False, progress: bool = True,
                     max_memory: int | None = None, **export_options) -> dict:
    """A checkpoint -> its `bits`-bit bundle at `out_dir`: `export_bundle` writes the 16-bit bundle
    (checked against PyTorch with `verify`) into a scratch folder beside `out_dir`, and
    `quantize_to_bits` turns it into the destination (checked against that 16-bit bundle with
    `verify`); the scratch folder is removed either way. `max_memory` (bytes): refuse up front when
    the whole run's estimated peak is larger (export/plan.py); disk likewise. `export_options` are
    export_bundle's (mmproj, onnx_fp16, check_images, check_tokens). Returns quantize_bundle's result plus
    `export`, the 16-bit export's {path, manifest, seconds}.
    """
    from tinyllava_edge.export.bundle import export_bundle

    started = time.perf_counter()
    preset_for(bits)
    if fmt != "gguf":
        raise TinyLlavaError(f"{bits}-bit bundles quantize the LLM GGUF, which a {fmt!r} bundle does not hold; "
                             "export the ONNX bundle with --bits 32 or 16")
    final = Path(out_dir)
    check_bundle_destination(final, overwrite)  # before the long export
    from tinyllava_edge.export.bundle import check_source
    from tinyllava_edge.export.plan import check_plan, export_plan

    check_source(Path(checkpoint_dir), True)
    plan = export_plan(checkpoint_dir, bits=bits, verify=verify, mmproj=export_options.get("mmproj", True))
    check_plan(plan, max_memory=max_memory, out_dir=final)
    # a scratch folder beside the destination, never moved into place: removed when the block ends
    with disk_full_is_one_sentence(final), staged_folder(final) as scratch:
        exported = export_bundle(checkpoint_dir, scratch / "bundle", fmt=fmt, bits=16, verify=verify,
                                 progress=progress, plan=plan, **export_options)
        if progress:  # the export's steps came first; the quantization's are numbered anew
            print(f"the 16-bit bundle -> {bits} bits:", file=sys.stderr, flush=True)
        # the scratch bundle goes when this block ends: its kept parts are moved, not copied, and
        # its LLM's check runs stand in for decoding it again
        result = quantize_to_bits(exported["path"], final, bits, verify=verify, overwrite=overwrite,
                                  progress=progress, keep_source_path=False, source_runs=exported["llm_runs"],
                                  take_files=True)
    return {**result, "seconds": time.perf_counter() - started, "export": exported}


__all__ = ["quantize_bundle", "quantize_to_bits", "export_quantized", "preset_options", "DEFAULT_QUANT"]
