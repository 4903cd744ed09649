"""`train(TrainConfig) -> TrainResult`: one stage of one recipe, from a checkpoint or a preset.

The order is TinyLLaVA_Factory's tinyllava/train/train.py: build or load the model, apply the
recipe (adapters, then which parts train), build the lazy dataset, run the Trainer, save. The
output directory is a Factory checkpoint (config.json with the tune types recorded,
model.safetensors, tokenizer files), plus `adapter_*` files for an unmerged LoRA run,
`checkpoint-N/` folders to resume from, `loss.png`, `train_summary.json` and the
`train_config.json` this run was given. A later stage starts from it with `model=<output>`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from tinyllava_edge.atomic import write_text
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.train.config import TrainConfig
from tinyllava_edge.train.data import (Collator, SampleChecker, SupervisedDataset, default_image_folder,
                                       image_token_count, load_samples)
from tinyllava_edge.train.recipes import PARTS, STAGES, TuneSpec
from tinyllava_edge.train.report import LOSS_PNG, SUMMARY_JSON, loss_history, plot_loss, write_summary

# peft imports bitsandbytes whenever it is installed; on a CPU its 0.50 warns on import that an
# optional kernel package ("kernels") is missing, in every run, QLoRA or not. QLoRA on CPU works
# without it (tests/test_train_run.py), so the line is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

CONFIG_JSON = "train_config.json"
SHIPPED_DEEPSPEED = {"zero2": "zero2.json", "zero3": "zero3.json"}
SHIPPED_FSDP = "fsdp.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # transformers.trainer_utils PREFIX_CHECKPOINT_DIR


@dataclass
class TrainResult:
    output: Path
    summary: dict[str, Any]
    # The trained model in its saved form (merged if LoRA was merged, else the base), on the
    # process that wrote the output; None on the others and under DeepSpeed ZeRO-3.
    model: torch.nn.Module | None = None


def shipped_config(name: str) -> Path:
    """A config file shipped in `tinyllava_edge/train/configs/`."""
    return Path(str(resources.files(__package__).joinpath("configs", name)))


# -- before anything is built --------------------------------------------------------------------------

def _check_output(config: TrainConfig) -> Path:
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise TinyLlavaError(f"output {out} is a file; expected a directory")
    if config.resume:
        last = last_complete_checkpoint(out) if out.is_dir() else None
        if last is None:
            raise TinyLlavaError(f"nothing to resume: {out} holds no checkpoint-N folder")
        saved = out / CONFIG_JSON
        if saved.is_file():
            before = TrainConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
            changed = config.differences(before)
            if changed:
                raise TinyLlavaError(
                    f"resume must repeat the interrupted run's options; these differ from {saved}: "
                    + ", ".join(f"{k} ({getattr(before, k)!r} -> {getattr(config, k)!r})" for k in changed)
                )
    elif out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise TinyLlavaError(
            f"output {out} is not empty; pass resume to continue its run or overwrite to start again"
        )
    return out


def _deepspeed_path(value: str | None) -> str | None:
    if value is None:
        return None
    path = shipped_config(SHIPPED_DEEPSPEED[value]) if value in SHIPPED_DEEPSPEED else Path(value)
    if not path.is_file():
        raise TinyLlavaError(f"DeepSpeed config {value!r} is neither a file nor one of {', '.join(SHIPPED_DEEPSPEED)}")
    return str(path)


def _fsdp_config(config: TrainConfig, model) -> dict | None:
    if not config.fsdp:
        return None
    path = Path(config.fsdp_config) if config.fsdp_config else shipped_config(SHIPPED_FSDP)
    try:
        fsdp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TinyLlavaError(f"FSDP config {path} cannot be read as JSON ({exc})") from None
    if not fsdp.get("transformer_layer_cls_to_wrap"):
        # Wrap each decoder layer of the LLM and each encoder layer of the tower: the classes
        # depend on the family, so they come from the model, not the file.
        layers = [type(model.get_decoder().layers[0]).__name__, type(model.vision_tower.encoder_layers[0]).__name__]
        fsdp["transformer_layer_cls_to_wrap"] = sorted(set(layers))
    return fsdp


# CPU flags of a native bf16 dot product (AVX512-BF16 on AMD Zen 4 and Intel Cooper Lake on, AMX
# on Sapphire Rapids on). There autocast to bf16 is measured faster than fp32 (the tiny-shapes
# finetune step: 0.28 vs 0.46 s on an AMD EPYC, 2 threads; docs/training.md); elsewhere bf16 is
# emulated and slower, so fp32 stays.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 dot products natively (False where /proc/cpuinfo is missing)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def _precision(requested: str) -> str:
    if requested == "fp16" and not torch.cuda.is_available():
        raise TinyLlavaError("fp16 mixed precision needs a CUDA GPU; use fp32 or bf16 on CPU")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


# -- the start model ----------------------------------------------------------------------------------

def load_start(config: TrainConfig):
    """(model, tokenizer, description) of what this run starts from."""
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer
    from tinyllava_edge.model.presets import get_preset
    from tinyllava_edge.train.lora import has_adapter, load_merged

    if config.model is not None:
        model = load_merged(config.model)
        tokenizer = load_tokenizer(config.model)
        source = f"{config.model}" + (" (its LoRA adapter merged)" if has_adapter(config.model) else "")
    else:
        preset = get_preset(config.preset)
        family = preset.text["model_type"]
        tokenizer = load_tokenizer(config.tokenizer, model_type=family, pad_token=preset.extra.get("pad_token"))
        model_config = preset.config(vocab_size=len(tokenizer), pad_token=tokenizer.pad_token,
                                     pad_token_id=tokenizer.pad_token_id)
        model = TinyLlavaForConditionalGeneration(model_config)
        preset.init_weights(model)
        source = f"preset {config.preset!r} (random init, seed {config.seed}) + tokenizer {config.tokenizer}"
    if tokenizer.pad_token_id is None:
        raise TinyLlavaError(f"the tokenizer of {config.model or config.tokenizer} has no pad token; batches need one")
    # Factory's load_llm: the tokenizer's limit is the config's.
    tokenizer.model_max_length = model.config.tokenizer_model_max_length
    model.config.use_cache = False
    return model, tokenizer, source


def _template_name(config: TrainConfig, model) -> str:
    from tinyllava_edge.data.template import default_template_for_family, get_template

    name = config.template or STAGES.get(config.stage).template or default_template_for_family(model.config.llm_family)
    get_template(name)
    return name


# -- the run -----------------------------------------------------------------------------------------------

def train(config: TrainConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Run one training stage as `config` says; returns where it wrote what."""
    from transformers import TrainingArguments, set_seed

    from tinyllava_edge.data.preprocess import PreprocessConfig
    from tinyllava_edge.data.template import get_template
    from tinyllava_edge.train.trainer import TinyLlavaTrainer
    from tinyllava_edge.train.tune import LoraSettings, apply_tuning, count_parameters, resolve_vision_layer

    started = time.perf_counter()
    out = _check_output(config)
    image_folder = default_image_folder(config.data, config.image_folder)
    if not image_folder.is_dir():
        raise TinyLlavaError(f"image folder {image_folder} is not a directory")
    deepspeed = _deepspeed_path(config.deepspeed)
    if config.fsdp and not torch.cuda.is_available():
        # accelerate turns FSDP on for multi-GPU (and other accelerator) runs only; on CPU it
        # would silently run DDP instead.
        raise TinyLlavaError("FSDP needs CUDA GPUs (accelerate enables it for multi-GPU runs only); "
                             "on CPU use torchrun (DDP) or --deepspeed")
    precision = _precision(config.precision)

    set_seed(config.seed)
    model, tokenizer, source = load_start(config)
    spec = resolve_vision_layer(config.tune_spec(), model)
    template_name = _template_name(config, model)
    checker = SampleChecker(get_template(template_name), tokenizer, image_folder, image_token_count(model.config),
                            model.config.tokenizer_model_max_length, config.truncate)
    samples, data_report = load_samples(Path(config.data), checker, config.skip_bad)
    vision = model.config.vision_config
    pre = PreprocessConfig.for_tower(vision.model_type, vision.image_size, model.config.image_aspect_ratio)
    dataset = SupervisedDataset(samples, checker, pre)

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",  # Factory's TrainingArguments default
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        **_checkpointing_args(TrainingArguments, config.gradient_checkpointing),
        remove_unused_columns=False,
        dataloader_num_workers=config.num_workers,
        report_to="none",
        disable_tqdm=config.quiet,
        deepspeed=deepspeed,
        fsdp=True if config.fsdp else None,
        fsdp_config=_fsdp_config(config, model),
        # With feature layer -2 the tower's last layer and head get no gradient, nor does the
        # tower in a batch of dummy images: DDP must be told.
        ddp_find_unused_parameters=spec.vision_tower != "frozen" or data_report.with_image < data_report.kept,
    )
    # Every rank has looked at the output directory (_check_output) before rank 0 writes to it.
    args.distributed_state.wait_for_everyone()
    with args.main_process_first(local=False, desc="preparing the output directory"):
        if args.process_index == 0:
            _prepare_output(out, config)

    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    trained = apply_tuning(model, spec, LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout),
                           args.device, compute_dtype)
    trainable, total = count_parameters(trained)

    trainer = TinyLlavaTrainer(
        model=trained, args=args, train_dataset=dataset, data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=list(callbacks), grouped=config.grouped,
        lengths=dataset.modality_lengths, sample_seed=config.seed, quiet=config.quiet,
        part_lrs=config.part_learning_rates,
    )
    if config.fsdp and not trainer.is_fsdp_enabled:
        raise TinyLlavaError("FSDP was asked for but accelerate did not enable it: launch with torchrun "
                             "on two or more GPUs")
    first_step = _checkpoint_step(out) if config.resume else 0
    t0 = time.perf_counter()
    resume_from = str(last_complete_checkpoint(out)) if config.resume else None
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - t0

    with _gathered(trainer, trained):
        final = _save_final(trainer, trained, tokenizer, out, config) if trainer.is_world_process_zero() else None
    if _zero3(trainer):
        final = None  # its parameters went back to being shards when the block ended
    summary = None
    if trainer.is_world_process_zero():
        summary = _summary(config, spec, source, template_name, precision, args, trainer, output.metrics,
                           data_report, trainable, total, first_step, train_seconds, started, out)
        write_summary(summary, out / SUMMARY_JSON)
        plot_loss(loss_history(trainer.state.log_history), out / LOSS_PNG,
                  f"{config.stage} / {config.recipe}: training loss")
        summary["files"] = _files(out)
        write_summary(summary, out / SUMMARY_JSON)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, summary or {}, final)


def _checkpointing_args(arguments_class, enabled: bool) -> dict[str, Any]:
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old
    # names warn). Non-reentrant: gradients reach the connector even when the LLM's inputs come
    # from frozen embeddings (the Factory called enable_input_require_grads for the same reason).
    from dataclasses import fields

    name = "activation_checkpointing" if "activation_checkpointing" in {f.name for f in fields(arguments_class)} \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def _prepare_output(out: Path, config: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        for old in out.glob("checkpoint-*"):
            if old.is_dir():
                shutil.rmtree(old)
    write_text(out / CONFIG_JSON, json.dumps(config.to_dict(), indent=2) + "\n")


def last_complete_checkpoint(out: Path) -> Path | None:
    """The highest `checkpoint-N` that was written to the end, or None.

    transformers writes `trainer_state.json` last in a checkpoint (Trainer._save_checkpoint: model,
    optimizer, scheduler, RNG, then state), so a run killed while saving leaves a folder without it,
    or with only part of it (it is written in place); its own `get_last_checkpoint` would pick that
    half-written folder and the resume would fail.
    """
    done = [(int(m.group(1)), path) for path in out.glob("checkpoint-*")
            if (m := _CHECKPOINT.fullmatch(path.name)) and _whole_json(path / "trainer_state.json")]
    return max(done)[1] if done else None


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or cut short by a kill
        return False
    return True


def _checkpoint_step(out: Path) -> int:
    last = last_complete_checkpoint(out)
    return int(last.name.split("-")[-1]) if last else 0


def _zero3(trainer) -> bool:
    return trainer.is_deepspeed_enabled and trainer.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3


def _gathered(trainer, model):
    """Every rank holds the whole model inside this block (ZeRO-3 shards it; the rest is a no-op)."""
    if _zero3(trainer):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _save_final(trainer, trained, tokenizer, out: Path, config: TrainConfig):
    """Write the Factory layout to `out`; returns the model as written."""
    from tinyllava_edge.model import save_tokenizer
    from tinyllava_edge.train.lora import merge_lora, save_adapter, unload_lora
    from tinyllava_edge.train.trainer import _is_peft

    model = trainer.accelerator.unwrap_model(trained)
    if _is_peft(model):
        if config.merge_lora:
            model = merge_lora(model)
        else:
            save_adapter(model, out)
            model = unload_lora(model)
    model.config.use_cache = True
    save_tokenizer(tokenizer, out)  # in files the Factory's transformers 4.40 reads too
    model.save_pretrained(out)
    return model.eval()


def _parallelism(trainer, args) -> str:
    if trainer.is_deepspeed_enabled:
        return f"deepspeed zero-{trainer.accelerator.deepspeed_config['zero_optimization']['stage']}"
    if trainer.is_fsdp_enabled:
        return "fsdp"
    return "ddp" if args.world_size > 1 else "single process"


def _files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _summary(config: TrainConfig, spec: TuneSpec, source: str, template: str, precision: str, args, trainer,
             metrics: dict, data_report, trainable: int, total: int, first_step: int, train_seconds: float,
             started: float, out: Path) -> dict[str, Any]:
    state = trainer.state
    losses = loss_history(state.log_history)
    steps_run = state.global_step - first_step
    samples = steps_run * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return {
        "stage": config.stage,
        "recipe": config.recipe,
        "tune_types": spec.as_dict(),
        "template": template,
        "start": source,
        "output": str(out),
        "lora": ({"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                  "merged": config.merge_lora}
                 if any(spec.of(part) in ("lora", "qlora") for part in PARTS) else None),
        "parameters": {"trainable": trainable, "total": total,
                       "trainable_fraction": round(trainable / total, 6) if total else 0.0},
        "steps": state.global_step,
        "steps_this_run": steps_run,
        "resumed_from_step": first_step if config.resume else None,
        "epochs": state.epoch,
        "max_steps": state.max_steps,
        "learning_rate": config.learning_rate,
        "part_learning_rates": config.part_learning_rates,
        "batch_size_per_device": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "parallelism": _parallelism(trainer, args),
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "precision": precision,
        "device": str(args.device),
        "final_loss": losses[-1][1] if losses else None,
        "mean_loss": metrics.get("train_loss"),
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "samples_per_second": round(samples / train_seconds, 3) if train_seconds > 0 else None,
        "steps_per_second": round(steps_run / train_seconds, 4) if train_seconds > 0 else None,
        "data": data_report.to_dict(),
    }
