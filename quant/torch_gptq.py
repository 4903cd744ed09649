"""GPTQ 4-bit of a checkpoint's LLM through GPTQModel, on CPU, calibrated on the model's own data.

    quantize_gptq("runs/model", "runs/model-gptq", data="runs/data")   # then tinyllava_edge.load("runs/model-gptq")

Needs `.venv-gptq` (scripts/setup-gptq.sh; GPTQModel is kept out of the default environment,
model/gptq.py says why). What it does, in three layers kept apart:

* math: GPTQ itself is GPTQModel's (per decoder layer, on that layer's inputs, weights rounded
  column by column with the inverse-Hessian error feedback of Frantar et al. 2022); here is only
  :func:`rtn_fake_quant`, the same symmetric grid without the feedback, as the baseline GPTQ must
  beat;
* calibration: :func:`calibration_samples` renders conversations of the data (instruct.json, else
  train.json, or a LLaVA JSON file) with the model's chat template and tokenizer, image included.
  GPTQModel's calibration takes token ids only (it keeps `input_ids` / `attention_mask` of each
  row, gptqmodel/utils/calibration.py), so the image rows become *virtual tokens*: the LLM handed
  to GPTQModel has its embedding table extended by one row per image row of the calibration set,
  holding exactly what the runtime splices (`encode_images` x `image_features_scale`), and each
  sample's `<image>` is replaced by the ids of its rows. Every decoder layer thus sees the
  activations it sees at inference, image positions included; the extra rows are cut off again
  before saving (embeddings and lm_head are not quantized);
* files: the checkpoint is assembled in a temporary directory beside `out_dir` and renamed into
  place when complete (a failure leaves nothing at `out_dir`); layout in model/gptq.py.

By default the result is reloaded through the real loader and measured against the fp32 LLM on
held-out samples of the same data (logits, top-1, KL), next to the plain round-to-nearest
baseline on the same grid; the figures go into quantization.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tinyllava_edge.constants import IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import DataError, TinyLlavaError
from tinyllava_edge.model.gptq import (FUSED_BITS, FUSED_GROUP_SIZES, GPTQ_LLM_DIR, QUANTIZATION_RECORD,
                                       gptq_layers, gptq_llm_dir, import_gptqmodel, load_gptq_llm, quiet)

DEFAULT_BITS = 4
DEFAULT_SAMPLES = 128  # GPTQ's usual calibration count (Frantar et al. 2022: 128 random segments)
DEFAULT_SEQ_LEN = 512
MIN_SAMPLES = 8  # fewer gives a Hessian too poor to beat RTN (as quant/onnx.py's GPTQ_MIN_CALIBRATION)
CHECK_SAMPLES = 16  # held-out samples the fidelity check runs
CALIBRATION_FILES = ("instruct.json", "train.json")  # in a data directory, the first found
SKIPPED = ("lm_head",)  # GPTQModel leaves the output projection unquantized (and so do we in bnb)


# -- math -------------------------------------------------------------------------------------------

def rtn_fake_quant(weight, bits: int = DEFAULT_BITS, group_size: int = 128):
    """(out, in) weight -> the same shape, each group of `group_size` inputs rounded to nearest on
    GPTQ's symmetric grid (IST-DASLab/gptq quant.py: scale = 2·absmax / (2^bits - 1), zero at
    2^(bits-1), so levels -2^(bits-1)..2^(bits-1)-1 times scale) and dequantized; -1: one group per row."""
    import torch

    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    w = weight.detach().float().reshape(out_features, in_features // size, size)  # (out, groups, size)
    maxq = 2 ** bits - 1
    scale = (2 * w.abs().amax(-1, keepdim=True) / maxq).clamp(min=1e-8)
    zero = (maxq + 1) // 2
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape(out_features, in_features).to(weight.dtype)


# -- what gets quantized ------------------------------------------------------------------------------

def quantizable_linears(llm) -> list[str]:
    """Names of the LLM's linears GPTQ quantizes: every nn.Linear but the output projection."""
    from torch import nn

    head = llm.get_output_embeddings()
    return [n for n, m in llm.named_modules() if type(m) is nn.Linear and m is not head]


def choose_group_size(llm, group_size: int | None) -> int:
    """`group_size` checked against the kernel and the LLM's input widths, or (None) the largest
    the kernel offers that divides every width; one sentence when none does."""
    widths = sorted({llm.get_submodule(n).in_features for n in quantizable_linears(llm)})
    offered = [g for g in FUSED_GROUP_SIZES if g != -1]
    if group_size is None:
        fits = [g for g in offered if all(w % g == 0 for w in widths)]
        if not fits:
            raise TinyLlavaError(f"no GPTQ group size of {', '.join(map(str, offered))} divides every input width of "
                                 f"this LLM ({', '.join(map(str, widths))}); pass group size -1 (one group per row)")
        return fits[0]
    if group_size not in FUSED_GROUP_SIZES:
        raise TinyLlavaError(f"GPTQ group size {group_size} is not offered; expected one of "
                             f"{', '.join(map(str, FUSED_GROUP_SIZES))} (GPTQModel's torch fused kernel)")
    bad = [w for w in widths if group_size != -1 and w % group_size]
    if bad:
        raise TinyLlavaError(f"GPTQ group size {group_size} does not divide the LLM's input widths "
                             f"{', '.join(map(str, bad))}; pick one that divides {', '.join(map(str, widths))}")
    return group_size


# -- calibration ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSample:
    input_ids: list[int]  # the template's tokens, IMAGE_TOKEN_INDEX where the image goes
    pixels: np.ndarray | None  # (3, H, W) preprocessed image, None for a text-only record


def calibration_file(data: str | os.PathLike) -> Path:
    """A data directory's instruct.json (else train.json), or a LLaVA JSON file itself."""
    path = Path(data)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"calibration data {path} does not exist; expected a data directory holding "
                        f"{' or '.join(CALIBRATION_FILES)}, or a LLaVA JSON file")
    for name in CALIBRATION_FILES:
        if (path / name).is_file():
            return path / name
    raise DataError(f"calibration data {path} holds neither {' nor '.join(CALIBRATION_FILES)}; expected a shapes "
                    "data directory (tinyllava-data) or a LLaVA JSON file")


def read_records(file: Path, n: int, seed: int = 0) -> list[dict]:
    """`n` records of a LLaVA JSON list drawn without replacement (numpy default_rng(seed)), in file order."""
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"calibration file {file} is not valid JSON ({exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "conversations" in r for r in records):
        raise DataError(f"calibration file {file} is not a LLaVA list of records with 'conversations'")
    if len(records) < n:
        raise DataError(f"calibration file {file} holds {len(records)} records; {n} are needed "
                        f"({MIN_SAMPLES} at least for calibration, plus the held-out check)")
    pick = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in pick]


def calibration_samples(records: list[dict], root: Path, tokenizer, template,
                        preprocess_config) -> list[CalibrationSample]:
    """Each record's whole conversation (answers and their eos included, as in training) rendered
    with `template`, its image (path relative to `root`) preprocessed. Samples are cut to the
    sequence length later, once the image rows are in."""
    from tinyllava_edge.data.preprocess import preprocess
    from tinyllava_edge.data.template import tokenizer_image_token

    samples = []
    for record in records:
        ids = tokenizer_image_token(template.render(record["conversations"]), tokenizer)
        pixels = None
        if record.get("image"):
            image = root / record["image"]
            if not image.is_file():
                raise DataError(f"calibration image {record['image']!r} of record {record.get('id', '?')!r} is not "
                                f"in {root}")
            # a training set, read as training reads it: truncated files decoded (data/images.py)
            pixels = preprocess([str(image)], preprocess_config, allow_truncated=True)[0]
            if IMAGE_TOKEN_INDEX not in ids:
                ids = [IMAGE_TOKEN_INDEX] + ids  # an image record whose text lacks <image>: image first
        elif IMAGE_TOKEN_INDEX in ids:
            raise DataError(f"calibration record {record.get('id', '?')!r} asks for an <image> but names none")
        samples.append(CalibrationSample(ids, pixels))
    return samples


def _image_rows(model, samples: list[CalibrationSample], batch: int = 32) -> list:
    """(N, hidden) rows each sample's image becomes in `inputs_embeds` (encode_images x image_features_scale)."""
    import torch

    with_image = [i for i, s in enumerate(samples) if s.pixels is not None]
    rows: list = [None] * len(samples)
    with torch.inference_mode():
        for start in range(0, len(with_image), batch):
            chunk = with_image[start:start + batch]
            pixels = torch.from_numpy(np.stack([samples[i].pixels for i in chunk]))
            out = model.encode_images(pixels) * model.image_features_scale  # (B, N, hidden)
            for i, r in zip(chunk, out.float()):
                rows[i] = r
    return rows


def _virtual_ids(samples: list[CalibrationSample], rows: list, vocab: int, seq_len: int) -> tuple[list[list[int]], int]:
    """Token ids with each image placeholder replaced by the ids of its rows (from `vocab` on), cut to
    `seq_len`; also how many virtual ids were given out."""
    out, next_id = [], vocab
    for sample, image in zip(samples, rows):
        ids = []
        for t in sample.input_ids:
            if t == IMAGE_TOKEN_INDEX:
                ids += range(next_id, next_id + image.shape[0])
                next_id += image.shape[0]
            else:
                ids.append(t)
        out.append(ids[:seq_len])
    return out, next_id - vocab


def _llm_with_virtual_rows(llm, rows: list):
    """A copy of `llm` whose input embedding has the image rows appended (after its vocab), stored so
    that the embedding module's own scale (Gemma's sqrt(hidden)) gives back exactly those rows."""
    import torch

    table = torch.cat([r for r in rows if r is not None]) if any(r is not None for r in rows) else None
    twin = copy.deepcopy(llm)
    if table is None:
        return twin
    vocab = twin.get_input_embeddings().weight.shape[0]
    twin.resize_token_embeddings(vocab + table.shape[0], mean_resizing=False)
    embed = twin.get_input_embeddings()
    scale = float(getattr(embed, "scalar_embed_scale", 1.0))
    with torch.no_grad():
        embed.weight[vocab:] = (table / scale).to(embed.weight.dtype)
    return twin


# -- fidelity ---------------------------------------------------------------------------------------

def _spliced(model, samples: list[CalibrationSample], seq_len: int) -> list:
    """(1, T, hidden) inputs_embeds per sample, built as the runtime builds them."""
    import torch

    out = []
    with torch.inference_mode():
        for s in samples:
            ids = torch.tensor([s.input_ids])
            images = None if s.pixels is None else torch.from_numpy(s.pixels[None])
            embeds, *_ = model.prepare_inputs_for_multimodal(ids, None, None, images)
            out.append(embeds[:, :seq_len])
    return out


def _rtn_llm(llm, bits: int, group_size: int):
    """A copy of `llm` with every quantizable linear's weight replaced by its RTN fake-quant."""
    import torch

    twin = copy.deepcopy(llm)
    with torch.no_grad():
        for name in quantizable_linears(twin):
            linear = twin.get_submodule(name)
            linear.weight.copy_(rtn_fake_quant(linear.weight, bits, group_size))
    return twin


def compare_logits(ref_llm, llm, inputs: list) -> dict:
    """Relative L2 difference of all positions' logits, top-1 agreement (%) and mean KL(ref || llm)."""
    import torch

    num = den = 0.0
    agree = total = 0
    kls = []
    with torch.inference_mode():
        for embeds in inputs:
            ref = ref_llm(inputs_embeds=embeds).logits[0].double()  # (T, vocab)
            got = llm(inputs_embeds=embeds.to(next(llm.parameters()).dtype)).logits[0].double()
            num += float(((got - ref) ** 2).sum())
            den += float((ref ** 2).sum())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
            p, q = ref.log_softmax(-1), got.log_softmax(-1)
            kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
    return {"logits_rel_l2": (num / den) ** 0.5, "top1_agreement": 100.0 * agree / total,
            "kl_mean": float(np.mean(kls)), "positions": total}


# -- the step ---------------------------------------------------------------------------------------

def _check_destination(source: Path, final: Path, overwrite: bool) -> None:
    if final.exists() and not final.is_dir():
        raise TinyLlavaError(f"output path {final} is a file; expected a directory for the GPTQ checkpoint")
    if final.resolve() == source.resolve():
        raise TinyLlavaError(f"the output {final} is the source checkpoint; write the GPTQ checkpoint elsewhere")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise TinyLlavaError(f"output directory {final} is not empty; pass overwrite=True (--overwrite) to replace "
                                 "a previous checkpoint")
        if not (final / "config.json").is_file():
            raise TinyLlavaError(f"output directory {final} is not empty and holds no checkpoint config.json; "
                                 "refusing to replace it")


def quantize_gptq(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, data: str | os.PathLike,
                  bits: int = DEFAULT_BITS, group_size: int | None = None, n_samples: int = DEFAULT_SAMPLES,
                  seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, verify: bool = True, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Write at `out_dir` a copy of the checkpoint whose LLM is GPTQ-quantized (layout: model/gptq.py).

    `data`: a data directory (its instruct.json, else train.json) or a LLaVA JSON file; `n_samples`
    records calibrate (drawn with `seed`), CHECK_SAMPLES more check (`verify`). `group_size` None:
    the largest of 128/64/32/16 that divides every LLM input width. `seq_len`: tokens per sample,
    image rows included. Returns {path, record, seconds}; the record is also quantization.json.
    """
    from tinyllava_edge.atomic import replace_folder, staged_folder
    from tinyllava_edge.staging import Steps, source_record

    source, final = Path(checkpoint_dir), Path(out_dir)
    if bits not in FUSED_BITS:
        raise TinyLlavaError(f"GPTQ bits {bits} is not offered; the CPU kernel (GPTQModel's torch fused) runs "
                             f"{', '.join(map(str, FUSED_BITS))}-bit weights")
    if group_size is not None and group_size not in FUSED_GROUP_SIZES:
        raise TinyLlavaError(f"GPTQ group size {group_size} is not offered; expected one of "
                             f"{', '.join(map(str, FUSED_GROUP_SIZES))} (GPTQModel's torch fused kernel)")
    if n_samples < MIN_SAMPLES:
        raise TinyLlavaError(f"GPTQ needs at least {MIN_SAMPLES} calibration samples; {n_samples} were asked for")
    if seq_len < 16:
        raise TinyLlavaError(f"calibration sequence length {seq_len} is too short; expected at least 16 tokens")
    if gptq_llm_dir(source) is not None:
        raise TinyLlavaError(f"{source} already holds a GPTQ-quantized LLM; quantize from the fp32 checkpoint")
    file = calibration_file(data)
    _check_destination(source, final, overwrite)
    gptqmodel = import_gptqmodel()  # before the long steps: the one-sentence error when missing
    import torch

    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.data.template import default_template_for_family, get_template
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer, save_checkpoint, save_tokenizer

    steps = Steps(4 + verify, progress)
    started = time.perf_counter()
    steps.start(f"reading {source}")
    model = TinyLlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32, device="cpu").eval()
    llm = model.language_model
    group = choose_group_size(llm, group_size)
    linears = quantizable_linears(llm)
    tokenizer = load_tokenizer(source)
    config = model.config
    template = get_template(default_template_for_family(config.llm_family))
    vision = config.vision_config
    pre = PreprocessConfig.for_tower(vision.model_type, vision.image_size, config.image_aspect_ratio)
    seq_len = min(seq_len, int(config.tokenizer_model_max_length or seq_len))

    steps.start(f"calibration: {n_samples} samples from {file}")
    records = read_records(file, n_samples + (CHECK_SAMPLES if verify else 0), seed)
    samples = calibration_samples(records, file.parent, tokenizer, template, pre)
    calib, check = samples[:n_samples], samples[n_samples:]
    rows = _image_rows(model, calib)
    vocab = llm.get_input_embeddings().weight.shape[0]
    ids, n_virtual = _virtual_ids(calib, rows, vocab, seq_len)
    calibration = [{"input_ids": i, "attention_mask": [1] * len(i)} for i in ids]

    with staged_folder(final) as staging:
        steps.start(f"GPTQ {bits}-bit, group {group}: {len(linears)} linears (GPTQModel {gptqmodel.__version__}, CPU)")
        fp32_dir = staging / ".fp32-llm"
        with quiet():
            _llm_with_virtual_rows(llm, rows).save_pretrained(fp32_dir)
        tokenizer.save_pretrained(fp32_dir)  # GPTQModel.load reads a tokenizer (pad id for batching)
        # offload_to_disk=False: GPTQModel otherwise parks finished layers (and the embedding) on the meta
        # device, and the embedding could not be cut back to the vocabulary below
        qconfig = gptqmodel.QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True, device="cpu",
                                           offload_to_disk=False)
        t_quant = time.perf_counter()
        with quiet():
            qmodel = gptqmodel.GPTQModel.load(str(fp32_dir), qconfig, dtype=torch.float32)
        # GPTQModel's own per-layer progress is shown with `progress`
        with contextlib.nullcontext() if progress else quiet():
            qmodel.quantize(calibration, batch_size=1)  # one sample per batch: no padding rows
        t_quant = time.perf_counter() - t_quant
        found = gptq_layers(qmodel.model)
        if sum(found.values()) != len(linears):
            raise TinyLlavaError(f"GPTQModel quantized {sum(found.values())} linear layers but the LLM has "
                                 f"{len(linears)} besides lm_head")
        if n_virtual:
            qmodel.model.resize_token_embeddings(vocab, mean_resizing=False)  # drop the image rows again

        steps.start(f"writing {final}")
        with quiet():
            qmodel.save(str(staging / GPTQ_LLM_DIR))
        del qmodel
        shutil.rmtree(fp32_dir)
        tokenizer.save_pretrained(staging / GPTQ_LLM_DIR)
        llm.generation_config.save_pretrained(staging / GPTQ_LLM_DIR)  # GPTQModel wrote do_sample=True there
        parts = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
        save_checkpoint(model, staging, state_dict=parts)
        save_tokenizer(tokenizer, staging)
        record = {
            "method": "gptq", "bits": bits, "group_size": group, "sym": True, "desc_act": False,
            "quantized_linears": len(linears), "kept": list(SKIPPED) + ["vision_tower", "connector", "embeddings"],
            "calibration": {"file": str(file), "samples": len(calib), "seed": seed, "seq_len": seq_len,
                            "tokens": sum(len(i) for i in ids), "image_rows": n_virtual,
                            "images": "as virtual tokens: rows appended to the embedding table for the run"},
            "template": template.name, "quantize_seconds": round(t_quant, 2),
            "gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
            "source": source_record(source, getattr(model, "checkpoint_layout", "factory")),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if verify:
            steps.start(f"checking against fp32 on {len(check)} held-out samples")
            record["fidelity"] = _fidelity(model, staging / GPTQ_LLM_DIR, check, seq_len, bits, group, len(linears))
        record["seconds"] = round(time.perf_counter() - started, 2)
        _write_record(staging, record)
        replace_folder(staging, final)
        steps.done()
    return {"path": str(final), "record": record, "seconds": record["seconds"]}


def _write_record(folder: Path, record: dict) -> None:
    (folder / QUANTIZATION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _fidelity(model, llm_dir: Path, check: list[CalibrationSample], seq_len: int, bits: int, group: int,
              expected: int) -> dict:
    """The saved LLM reloaded through the loader, and RTN on the same grid, against the fp32 LLM."""
    inputs = _spliced(model, check, seq_len)
    gptq = load_gptq_llm(llm_dir, dtype="float32", device="cpu")
    layers = gptq_layers(gptq)
    if sum(layers.values()) != expected:
        raise TinyLlavaError(f"the saved GPTQ LLM reloads with {sum(layers.values())} quantized linears; "
                             f"{expected} were written")
    return {"samples": len(check), "layers": layers,
            "gptq": compare_logits(model.language_model, gptq, inputs),
            "rtn": compare_logits(model.language_model, _rtn_llm(model.language_model, bits, group), inputs)}
