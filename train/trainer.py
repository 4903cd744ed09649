"""transformers' `Trainer`, with the Factory's sampling and checkpoints that resume LoRA runs whole.

Everything else is the stock Trainer, so the same code runs in one process, under `torchrun`
(DDP; gloo on CPU), FSDP or DeepSpeed. Changes:

* the train sampler is the Factory's length grouping or a seeded shuffle (`sampler.py`),
  identical on every rank and after a resume;
* a LoRA run's `checkpoint-N` holds every trainable tensor (`trainable.safetensors`: the
  adapters *and* parts tuned `full`, such as the connector), not only peft's adapter, which the
  stock Trainer would save and restore alone;
* parts may train at their own learning rates (Factory's ``mm_projector_lr``): one optimizer
  parameter group per (part learning rate, weight decay);
* the progress bar shows the loss instead of printing a line per logged step.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from tinyllava_edge.errors import CheckpointError
from tinyllava_edge.train.recipes import PART_MODULES
from tinyllava_edge.train.sampler import LengthGroupedSampler, SeededRandomSampler

TRAINABLE_NAME = "trainable.safetensors"


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class TinyLlavaTrainer(Trainer):
    def __init__(self, *args, grouped: bool, lengths: list[int], sample_seed: int, quiet: bool = False,
                 part_lrs: dict[str, float] | None = None, **kwargs):
        self.grouped = grouped
        self.part_lrs = dict(part_lrs or {})
        self.lengths = lengths
        self.sample_seed = sample_seed
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        if not quiet:
            self.add_callback(LossProgressCallback())

    def _get_train_sampler(self, train_dataset=None):
        if self.grouped:
            return LengthGroupedSampler(self.lengths, self.args.train_batch_size, self.args.world_size,
                                        self.sample_seed)
        return SeededRandomSampler(len(self.lengths), self.sample_seed)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self.part_lrs:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float | None, float], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                key = (self.part_lrs.get(part_of(name)), self.args.weight_decay if name in decay else 0.0)
                groups.setdefault(key, []).append(param)
        # A group without "lr" takes the optimizer's (the run's) learning rate; the scheduler
        # scales every group's own.
        param_groups = [{"params": params, "weight_decay": wd, **({"lr": lr} if lr is not None else {})}
                        for (lr, wd), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # -- checkpoints of LoRA runs -------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not _is_peft(self.model) or self.is_fsdp_enabled:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # Under DeepSpeed the Trainer hands over the gathered state dict; the live tensors are shards.
        source = state_dict if state_dict is not None else dict(self.model.named_parameters())
        tensors = {n: source[n].detach().cpu().contiguous() for n in names if n in source}
        save_file(tensors, os.path.join(output_dir, TRAINABLE_NAME), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_NAME)
        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not os.path.isfile(path):
            return self._load_whole_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        model = model if model is not None else self.model
        saved = load_file(path)
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        missing, unexpected = sorted(trainable - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"{path} does not match this run's trainable parameters: {len(missing)} missing "
                f"({', '.join(missing[:3])}), {len(unexpected)} unknown ({', '.join(unexpected[:3])})"
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor.to(params[name].device))

    def _load_whole_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """A checkpoint `save_pretrained` wrote, read back through our checkpoint reader.

        The stock Trainer loads the file by the live parameter names; the file holds what
        transformers 4.x readers need instead in places (DINOv2's 4.x weight names, a placeholder
        SigLIP head: model/tf4_compat.py), which only the reader maps back.
        """
        model = model if model is not None else self.model
        if _is_peft(model) or not os.path.isfile(os.path.join(resume_from_checkpoint, "model.safetensors")):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from tinyllava_edge.model.checkpoint import load_state, read_checkpoint

        checkpoint = read_checkpoint(resume_from_checkpoint)
        load_state(model, checkpoint.state_dict, checkpoint.path)


def part_of(name: str) -> str | None:
    """The part (PARTS key) a parameter name belongs to, also under peft's `base_model.model.` prefix."""
    name = name.removeprefix("base_model.model.")
    return next((part for part, module in PART_MODULES.items() if name.startswith(module + ".")), None)


class LossProgressCallback(ProgressCallback):
    """The stock progress bar, with the latest loss and learning rate as its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "learning_rate") if isinstance(logs.get(k), float)}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)

