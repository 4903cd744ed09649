"""`export_bundle`: a checkpoint -> the 16- or 32-bit edge bundle (vision ONNX, LLM GGUF, mmproj,
manifest.json).

    export_bundle("runs/model", "bundles/model")             # gguf, 16-bit, checked against torch

The bundle is written into a temporary directory beside `out_dir` and renamed into place only
when every file is written and every check passed (`tinyllava_edge.bundle`: the format and the
manifest; `tinyllava_edge.atomic`: staging and the rename), so an interrupted or failed export
leaves nothing at `out_dir` (and no temporary directory either, unless the process is killed).

Bit widths are a registry (`PRECISIONS`, exact keys): 16 and 32, what the GGUF writers produce.
Quantized bundles (8, 4 bits) are the quantization stage's: it turns a 16-bit bundle into one
(`tinyllava_edge.quant.bundle`), and `export_quantized` there runs both steps for
`tinyllava-export --bits 4`. The data flows one way: export never calls into quant.

Nothing heavy is imported at module level: `tinyllava-export --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tinyllava_edge.atomic import replace_folder, staged_folder
from tinyllava_edge.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    file_record,
    write_manifest,
)
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry
from tinyllava_edge.staging import (Steps, check_bundle_destination, disk_full_is_one_sentence, source_record,
                                    tool_versions)

FORMATS = ("gguf", "onnx")
DEFAULT_FORMAT = "gguf"
DEFAULT_BITS = 16
DEFAULT_CHECK_IMAGES = 3  # image prompts the LLM check runs
DEFAULT_CHECK_TOKENS = 8  # greedy tokens generated per prompt
# ONNX fp32 vs torch: max |diff| <= this * max(1, max |reference|) (measured ~3e-7 on the miniatures).
ONNX_FP32_TOL = 1e-4


@dataclass(frozen=True)
class Precision:
    """How one bit width is written and checked.

    `ftype` is what the GGUF writers produce for the LLM and the mmproj; `gguf_type` names the
    files (`llm-<gguf_type>.gguf`). The LLM check requires relative logit differences
    (max |diff| / max(1, max |torch logit|)) within `logits_tol`, and with `exact_greedy`
    identical greedy tokens (up to rounding ties).
    """

    bits: int
    gguf_type: str
    ftype: str
    logits_tol: float
    exact_greedy: bool


PRECISIONS: Registry[Precision] = Registry("bundle bit width")
# Measured on the miniatures with an image (1 thread, F32 KV cache): F32 <= 5e-4 relative (the
# GELU families; ggml's GELU reads an F16 table), SiLU families ~7e-7; F16 files <= 1e-3.
PRECISIONS.add("32", Precision(32, "F32", "f32", logits_tol=5e-3, exact_greedy=True))
PRECISIONS.add("16", Precision(16, "F16", "f16", logits_tol=2e-2, exact_greedy=False))
BITS = tuple(int(key) for key in PRECISIONS.keys())  # the widths export writes itself


def precision_for(bits: int) -> Precision:
    """The registered width `bits`; for any other one a sentence that says where quantized bundles come from."""
    if str(bits) not in PRECISIONS:
        raise TinyLlavaError(f"export_bundle writes bundles of {' or '.join(str(b) for b in BITS)} bits, not {bits}; "
                             "quantized bundles are made from a 16-bit one by the quant stage "
                             "(tinyllava_edge.quant.bundle.export_quantized, tinyllava-export --bits N)")
    return PRECISIONS.get(str(bits))


def export_bundle(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str = DEFAULT_FORMAT,
                  bits: int = DEFAULT_BITS, mmproj: bool = True, verify: bool = True, progress: bool = True,
                  onnx_fp16: bool = False, overwrite: bool = False, check_images: int = DEFAULT_CHECK_IMAGES,
                  check_tokens: int = DEFAULT_CHECK_TOKENS, max_memory: int | None = None,
                  plan: dict | None = None) -> dict:
    """Export a checkpoint (any layout) as a bundle directory; returns the manifest and timings.

    `fmt` "gguf": vision.onnx + llm-<TYPE>.gguf + mmproj-<TYPE>.gguf (where stock llama.cpp can
    express the tower and connector; else recorded under `skipped`) + manifest.json. `fmt`
    "onnx": vision.onnx + manifest.json (with bits 16, vision-fp16.onnx too). `onnx_fp16` adds
    vision-fp16.onnx to any bundle. `bits` 32 or 16 (8 and 4: `quant.bundle.export_quantized`).
    `verify` (default) checks every part against PyTorch and raises TinyLlavaError naming the
    check and the figure when one fails; the figures go into the manifest either way.
    `check_images` image prompts, `check_tokens` greedy tokens each. An existing non-empty
    `out_dir` is replaced only with `overwrite` and only when it holds a bundle. `max_memory`
    (bytes): refuse up front, in one sentence, when the estimated peak (export/plan.py) is larger;
    too little free disk is refused the same way, and a disk that fills up anyway is one
    sentence with nothing left at `out_dir`. `plan`: a caller's plan (export_quantized) to record.
    The manifest records the plan and each stage's wall time and peak resident memory (`stages`).
    Returns {path, manifest, seconds, llm_runs}: `llm_runs`, llama.cpp's runs of the LLM check
    (export/checks.llamacpp_runs; None without it), lets a quantized bundle's check skip decoding
    this bundle's LLM again (quant/bundle.py `source_runs`).
    """
    if fmt not in FORMATS:
        raise TinyLlavaError(f"bundle format {fmt!r} is not supported; expected one of {', '.join(FORMATS)}")
    precision = precision_for(bits)
    if verify and check_images < 1:
        raise TinyLlavaError(f"check_images must be at least 1 when verifying, got {check_images}")
    source = Path(checkpoint_dir)
    final = Path(out_dir)
    check_bundle_destination(final, overwrite)
    with_fp16 = onnx_fp16 or (fmt == "onnx" and bits == 16)
    gguf = fmt == "gguf"
    steps = Steps(3 + with_fp16 + (2 + mmproj + 2 * verify if gguf else 0) + 1, progress)
    started = time.perf_counter()

    check_source(source, gguf)  # a wrong path or an unsupported family fails before any work
    if plan is None:
        from tinyllava_edge.export.plan import check_plan, export_plan

        plan = export_plan(source, bits=bits, verify=verify and gguf, mmproj=mmproj and gguf)
        check_plan(plan, max_memory=max_memory, out_dir=final)
    steps.start(f"reading {source} (config, tokenizer, tensor index; no weights yet)")
    parts = CheckpointParts(source)
    with disk_full_is_one_sentence(final), staged_folder(final) as staging:
        manifest = _write_parts(parts, staging, steps, precision, gguf=gguf, with_fp16=with_fp16,
                                mmproj=mmproj, verify=verify, progress=progress, check_images=check_images,
                                check_tokens=check_tokens)
        llm_runs = manifest.pop("_llm_runs")
        steps.start(f"writing {MANIFEST_NAME}")
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "format": fmt,
            "bits": bits,
            "source": source_record(source, parts.layout),
            **manifest,
            "tools": tool_versions(_TOOLS),
        }
        steps.done()
        manifest["stages"] = steps.records  # what each stage cost: wall time and peak resident memory
        manifest["memory_plan"] = plan  # what export/plan.py expected, beside what was measured
        write_manifest(staging, manifest)
        replace_folder(staging, final)
    return {"path": str(final), "manifest": manifest, "seconds": time.perf_counter() - started,
            "llm_runs": llm_runs}


# -- the parts ------------------------------------------------------------------------------------

def check_source(source: Path, gguf: bool) -> None:
    """Fail before any work on a wrong path, a GPTQ checkpoint or an LLM family the format cannot take."""
    from tinyllava_edge.model.checkpoint import detect_layout, read_config_json
    from tinyllava_edge.model.gptq import gptq_llm_dir
    from tinyllava_edge.model.llm import family_for
    from tinyllava_edge.model.tokenizer import text_model_type

    raw = read_config_json(source)
    detect_layout(raw, source)
    if gptq_llm_dir(source) is not None:
        raise TinyLlavaError(f"{source} holds a GPTQ-quantized LLM (tinyllava-quantize --torch gptq); export from the "
                             "unquantized checkpoint (bundles quantize their GGUF with llama.cpp: --bits 4 or 8)")
    family = text_model_type(raw)
    if family is not None:
        family_for(family)
        if gguf:
            from tinyllava_edge.export.gguf_arch import arch_for

            arch_for(family)


class CheckpointParts:
    """One checkpoint, loaded a part at a time: only what the current stage needs is in memory.

    The vision graph and the mmproj are made from the tower and connector alone (float32, the
    LLM left on the meta device); the LLM GGUF streams from the safetensors files one tensor at a
    time; the PyTorch reference for the checks is the whole model in its stored dtype, computed in
    float32 module by module (checks.computed_in_fp32). (docs/export-and-quantization.md, "Memory".)
    """

    VISION = ("vision_tower", "connector")

    def __init__(self, source: Path):
        from tinyllava_edge.model import load_tokenizer
        from tinyllava_edge.model.checkpoint import read_checkpoint

        self.source = source
        self.checkpoint = read_checkpoint(source)  # config and tensor index; no tensor read
        self.layout = self.checkpoint.layout
        self.tokenizer = load_tokenizer(source)

    def vision(self):
        """The model with the tower and connector loaded in float32 and the LLM on the meta device."""
        from tinyllava_edge.model.checkpoint import load_checkpoint

        return load_checkpoint(self.source, parts=self.VISION)

    def shapes(self):
        """The model with every weight on the meta device: names, shapes, config; no memory."""
        from tinyllava_edge.model.checkpoint import load_checkpoint

        return load_checkpoint(self.source, parts=())

    def reference(self):
        """The whole model in its stored dtype (run it under checks.computed_in_fp32)."""
        from tinyllava_edge.model.checkpoint import load_checkpoint

        return load_checkpoint(self.source, dtype="auto", keep_buffers=True)

    def llm_weights(self):
        """The LLM's tensors, named as in `model.language_model`, read when accessed."""
        from tinyllava_edge.model.checkpoint import weights_under

        return weights_under(self.checkpoint.state_dict, "language_model.")


def load_checkpoint_for_export(source: Path):
    """(model, tokenizer, layout) of a checkpoint directory of any layout."""
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer

    model = TinyLlavaForConditionalGeneration.from_pretrained(source)
    return model, load_tokenizer(source), getattr(model, "checkpoint_layout", "factory")


def _write_parts(parts: CheckpointParts, folder: Path, steps: Steps, precision: Precision, *, gguf: bool,
                 with_fp16: bool, mmproj: bool, verify: bool, progress: bool, check_images: int,
                 check_tokens: int) -> dict:
    from tinyllava_edge.data.template import default_template_for_family, get_template
    from tinyllava_edge.export.onnx_vision import preprocess_config
    from tinyllava_edge.export.vision_stage import run_vision_stage
    from tinyllava_edge.model.vision import tower_for_config

    tokenizer = parts.tokenizer
    config = parts.checkpoint.config
    template = get_template(default_template_for_family(config.text_config.model_type))
    validation: dict[str, Any] = {"enabled": verify}
    llm_runs = None  # llama.cpp's runs of the checks, for a quantized bundle's check (not in the manifest)
    # In a child process: what torch.onnx and onnxruntime keep after a graph of 1.7 GB is made
    # (about that much again, held from C++) goes back to the system when it exits.
    vision_out = run_vision_stage(parts.source, folder, steps, precision.gguf_type, precision.ftype, gguf=gguf,
                                  mmproj=mmproj, with_fp16=with_fp16, verify=verify, progress=progress)
    files: list[dict] = vision_out["files"]
    skipped: list[dict] = vision_out["skipped"]
    mmproj_record = vision_out["mmproj_record"]
    validation.update(vision_out["validation"])
    model = parts.shapes()  # every weight on the meta device: the LLM stages read names and shapes

    if gguf:
        from tinyllava_edge.export.gguf_llm import write_llm_gguf

        steps.start(f"LLM + tokenizer -> llm-{precision.gguf_type}.gguf (streamed from the checkpoint)")
        llm_path = folder / f"llm-{precision.gguf_type}.gguf"
        weights = parts.llm_weights()
        llm = write_llm_gguf(model, tokenizer, llm_path, ftype=precision.ftype, template=template.name,
                             progress=progress, weights=weights)
        # How llama.cpp takes input embeddings is a property of the architecture, measured once here
        # on the 16/32-bit file and recorded; quantized bundles inherit the figure.
        steps.start("probing llama.cpp's input-embedding path")
        probe = _probe(llm_path, model, weights, tokenizer, template)
        image_features_scale = model.image_features_scale
        files.append(file_record(
            llm_path, "llm", "gguf", precision.gguf_type, architecture=llm["architecture"],
            n_embd=config.hidden_size, n_vocab=llm["n_vocab"], context_length=llm["context_length"],
            tokenizer_model=llm["tokenizer_model"], tokenizer_pre=llm["tokenizer_pre"], add_bos=llm["add_bos"],
            chat_template=llm["template"], embd_input_scale=probe["embd_input_scale"],
            embd_input_rule=probe["rule"], image_features_scale=image_features_scale,
        ))
        if mmproj_record is not None:
            files.append(mmproj_record)
        if verify:
            del model  # the reference loads the whole model; the vision-only copy goes first
            checked = _verify_llm(parts, template, folder, llm_path, files, precision, probe,
                                  image_features_scale, check_images, check_tokens, steps)
            llm_runs = checked.pop("runs")
            validation.update(checked)
    vision_file = next(f for f in files if f["role"] == "vision" and f["quant"] == "fp32")
    return {
        "model": {
            "llm_family": config.text_config.model_type,
            "llm_architecture": next((f["architecture"] for f in files if f["role"] == "llm"), None),
            "vision_tower": tower_for_config(config.vision_config).key,
            "vision_model_type": config.vision_config.model_type,
            "connector": config.connector_type,
            "hidden_size": config.hidden_size,
            "image_tokens": vision_file["n_tokens"],
            "image_token_index": config.image_token_index,
            "vocab_size": config.text_config.vocab_size,
            "tokenizer_size": len(tokenizer),
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "image_aspect_ratio": config.image_aspect_ratio,
            "max_length": config.tokenizer_model_max_length,
        },
        "preprocess": preprocess_config(parts.checkpoint).to_dict(),
        "template": template.to_dict(),
        "tokenizer": {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token_id": tokenizer.pad_token_id},
        "files": files,
        "skipped": skipped,
        "validation": validation,
        "_llm_runs": llm_runs,
    }


@contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Hide torch.onnx's notes that do not concern this graph ("torchvision is not installed",
    deprecations inside the exporter) while it runs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def write_vision_parts(model, folder: Path, steps: Steps, gguf_type: str, ftype: str, *, gguf: bool, mmproj: bool,
                       with_fp16: bool, verify: bool, progress: bool) -> dict:
    """The parts made from the float32 tower + connector (`model`, the LLM on the meta device):
    mmproj, vision-fp16.onnx, vision.onnx, in that order; vision.onnx comes last and frees the
    weights before onnxruntime checks it, so one copy of the vision weights is in memory at a time.
    Run by export/vision_stage.py in a child process."""
    from tinyllava_edge.export.onnx_vision import export_vision_onnx

    precision = Precision(0, gguf_type, ftype, 0.0, False)
    skipped: list[dict] = []
    validation: dict[str, Any] = {}
    mmproj_record = None
    if gguf and mmproj:
        steps.start(f"vision tower + connector -> mmproj-{gguf_type}.gguf")
        mmproj_record, reason = _write_mmproj(model, folder, precision)
        if mmproj_record is None:
            skipped.append({"role": "mmproj", "reason": reason})
    elif gguf:
        skipped.append({"role": "mmproj", "reason": "not asked for (mmproj=False)"})
    half_records = []
    if with_fp16:
        steps.start("vision tower + connector -> vision-fp16.onnx")
        with _quiet_onnx_exporter():
            half = export_vision_onnx(model, folder / "vision-fp16.onnx", dtype="fp16", validate=verify,
                                      progress=progress)
        half_records = _onnx_records(half, "fp16")
        if verify:
            validation["vision_onnx_fp16"] = half["validation"]
    steps.start("vision tower + connector -> vision.onnx (fp32)")
    with _quiet_onnx_exporter():
        vision = export_vision_onnx(model, folder / "vision.onnx", dtype="fp32", validate=verify, progress=progress,
                                    release_weights=True)
    if verify:
        validation["vision_onnx"] = _check_onnx(vision["validation"])
    return {"files": _onnx_records(vision, "fp32") + half_records, "skipped": skipped,
            "mmproj_record": mmproj_record, "validation": validation}


def _onnx_records(report: dict, quant: str) -> list[dict]:
    graph = Path(report["path"])
    records = [file_record(graph, "vision", "onnx", quant, inputs=report["inputs"], outputs=report["outputs"],
                           io_dtype=report["io_dtype"], opset=report["opset"], image_size=report["image_size"],
                           n_tokens=report["n_tokens"], hidden=report["hidden"],
                           external_data=[Path(p).name for p in report["external_data"]])]
    records += [file_record(Path(p), "vision_weights", "onnx-data", quant, graph=graph.name)
                for p in report["external_data"]]
    return records


def _check_onnx(validation: dict) -> dict:
    scale = validation["max_abs_diff"] / validation["max_rel_diff"] if validation["max_rel_diff"] else 1.0
    limit = ONNX_FP32_TOL * max(1.0, scale)
    rule = f"max_abs_diff <= {ONNX_FP32_TOL:g} * max(1, max |reference|) = {limit:.3g}"
    out = {**validation, "bundle_tolerance": rule}
    if validation["max_abs_diff"] > limit:
        raise TinyLlavaError(f"check 'vision ONNX vs PyTorch' failed: max abs diff {validation['max_abs_diff']:.3g} "
                             f"> {limit:.3g}")
    return out


def _probe(llm_path: Path, model, weights, tokenizer, template) -> dict:
    from tinyllava_edge.export.checks import probe_embd_scale
    from tinyllava_edge.llamacpp import LlamaCppModel

    ids = list(tokenizer(template.render_prompt("What is in the picture?"))["input_ids"])
    lm = model.language_model  # on the meta device: only the embedding's name and scale are read
    module = lm.get_input_embeddings()
    embedding = next(n for n, p in lm.named_parameters() if p is module.weight)
    # this one matrix, read from the checkpoint; Gemma's embedding multiplies by its scale in forward
    rows = weights[embedding][ids].float().numpy() * float(getattr(module, "scalar_embed_scale", 1.0))
    with LlamaCppModel(llm_path, n_ctx=max(64, len(ids) + 8), n_threads=_threads(), kv_type="f32",
                       flash_attn="off") as llm:
        return probe_embd_scale(llm, rows, ids)


def _write_mmproj(model, folder: Path, precision: Precision) -> tuple[dict | None, str | None]:
    from tinyllava_edge.export.mmproj import plan_mmproj, write_mmproj_gguf

    try:
        plan_mmproj(model)
    except TinyLlavaError as err:  # a tower/connector stock llama.cpp cannot express: skipped, said why
        return None, str(err)
    path = folder / f"mmproj-{precision.gguf_type}.gguf"
    report = write_mmproj_gguf(model, path, ftype=precision.ftype)
    return file_record(path, "mmproj", "gguf", precision.gguf_type, projector_type="mlp",
                       tower=report["tower"], n_tokens=report["n_tokens_stock"],
                       n_tokens_model=report["n_tokens_model"],
                       hidden=report["hidden"], feature_layer=report["feature_layer"],
                       exact=False, deviations=report["deviations"]), None


def _verify_llm(parts: CheckpointParts, template, folder: Path, llm_path: Path, files: list[dict],
                precision: Precision, probe: dict, image_features_scale: float, check_images: int,
                check_tokens: int, steps: Steps) -> dict:
    """llama.cpp first (the vision graph's rows, then the GGUF mapped: tokenizer parity and greedy
    answers), then PyTorch (the whole model in its stored dtype, computed in float32, teacher-forced
    on llama.cpp's answers): the two never share memory. Returns the figures for the manifest and,
    under "runs", llama.cpp's runs (checks.llamacpp_runs), which a quantized bundle's check reuses."""
    import gc

    import onnxruntime as ort
    import torch

    from tinyllava_edge.export.checks import (
        check_prompts,
        compare_with_images,
        computed_in_fp32,
        llamacpp_runs,
        mmproj_figures,
        mmproj_image,
        synthetic_images,
        tokenizer_parity,
        torch_teacher_forced,
    )
    from tinyllava_edge.export.onnx_vision import preprocess_config
    from tinyllava_edge.llamacpp import LlamaCppModel

    tokenizer = parts.tokenizer
    mmproj_file = next((f for f in files if f["role"] == "mmproj"), None)
    prompts = check_prompts(tokenizer, template, synthetic_images(check_images), preprocess_config(parts.checkpoint))
    steps.start(f"checking {llm_path.name} with llama.cpp: {check_images} image prompts x {check_tokens} greedy "
                "tokens (image rows from vision.onnx), tokenizer parity")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = _threads()
    # run a few images once: no pre-packed second copy of every matrix (bench-scale: 1.6 GB more)
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(folder / "vision.onnx"), options, providers=["CPUExecutionProvider"])
    rows = [session.run(["image_embeds"], {"pixel_values": p["pixels"]})[0][0] for p in prompts]
    del session  # the graph's weights go before llama.cpp maps the GGUF
    n_tokens = next(f["n_tokens"] for f in files if f["role"] == "vision")
    out: dict[str, Any] = {}
    # F32 KV cache, no flash attention: what is measured is the file, not llama.cpp's rounding.
    with LlamaCppModel(llm_path, n_ctx=n_tokens + check_tokens + 512, n_threads=_threads(), kv_type="f32",
                       flash_attn="off") as llm:
        parity = tokenizer_parity(tokenizer, llm, template)
        out["tokenizer"] = parity
        if parity["percent"] < 100.0:
            raise TinyLlavaError(
                f"check 'tokenizer parity' failed: llama.cpp and transformers agree on {parity['percent']:.1f} % of "
                f"{parity['compared']} texts (first difference: {parity['mismatched'][0]!r}); 100 % is required"
            )
        runs = llamacpp_runs(prompts, tokenizer, template, llm, rows, new_tokens=check_tokens,
                             embd_scale=probe["embd_input_scale"] * image_features_scale)
    del rows
    gc.collect()

    steps.start(f"PyTorch reference: {check_images} image prompts, one forward each over the prompt and "
                "llama.cpp's answer")
    model = parts.reference()
    with computed_in_fp32(model):
        torch_logits = torch_teacher_forced(model, prompts, runs)
        mmproj_torch = None
        if mmproj_file is not None:
            from tinyllava_edge.data.preprocess import preprocess

            pixels = torch.from_numpy(preprocess(mmproj_image(model), preprocess_config(model)))
            with torch.no_grad():
                mmproj_torch = model.encode_images(pixels)[0].float().numpy()
    config_holder = parts.checkpoint  # what mmproj_figures reads after the model is gone: the config
    del model
    gc.collect()

    figures = compare_with_images(prompts, runs, torch_logits, new_tokens=check_tokens,
                                  logits_tol=precision.logits_tol)
    figures["llamacpp_settings"] = {"kv_type": "f32", "flash_attn": "off", "image_rows": "vision.onnx",
                                    "embd_input_scale": probe["embd_input_scale"],
                                    "image_features_scale": image_features_scale}
    figures["embd_scale_probe"] = probe
    figures["logits_tolerance"] = precision.logits_tol
    figures["reference"] = REFERENCE_NOTE
    out["llm"] = figures
    if figures["logits_rel_diff"] > precision.logits_tol:
        raise TinyLlavaError(
            "check 'LLM with image, llama.cpp vs PyTorch' failed: prompt logits differ by "
            f"{figures['logits_rel_diff']:.3g} of the largest logit (max abs {figures['logits_max_abs_diff']:.3g}); "
            f"expected <= {precision.logits_tol:g}"
        )
    failed = figures["prompts"] - figures["greedy_identical"] - figures["greedy_ties"]
    if precision.exact_greedy and failed:
        raise TinyLlavaError(
            f"check 'greedy tokens, llama.cpp vs PyTorch' failed: {failed} of {figures['prompts']} image prompts "
            f"decode differently (beyond rounding ties) from the {precision.gguf_type} file"
        )
    if mmproj_file is not None:
        figures_mm = mmproj_figures(folder / mmproj_file["name"], llm_path, config_holder, torch_embeds=mmproj_torch)
        out["mmproj"] = {**figures_mm, "known_deviations": mmproj_file["deviations"],
                         "note": "stock llama.cpp mtmd vs PyTorch on one square image; recorded, not failed"}
    out["runs"] = runs
    return out


# What the LLM check compares, and what it would catch (recorded in the manifest).
REFERENCE_NOTE = ("PyTorch holds the checkpoint's weights in their stored dtype and computes in float32, one "
                  "module's weights widened at a time (identical to a float32 copy), one forward per prompt over "
                  "the prompt and llama.cpp's answer (its greedy choice at every step compared with llama.cpp's "
                  "token); every LLM tensor enters every prompt's forward, so a wrong, transposed, mis-permuted or "
                  "mis-scaled tensor moves the prompt logits far past the tolerance (random-init miniatures: > 0.3 "
                  "of the largest logit)")


def _threads() -> int:
    """llama.cpp and onnxruntime use as many threads as torch was given (OMP_NUM_THREADS)."""
    import torch

    return max(1, torch.get_num_threads())


# -- records ----------------------------------------------------------------------------------------

_TOOLS = ("tinyllava-edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "gguf", "llama_cpp_python",
          "numpy")
