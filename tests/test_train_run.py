"""`train()` and `tinyllava-train` end to end on CPU: two stages from a preset, outputs, resume,
LoRA/QLoRA outputs, DDP through torchrun (gloo), DeepSpeed/FSDP where they can run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tinyllava_edge.data.shapes import write_dataset
from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model import TinyLlavaForConditionalGeneration
from tinyllava_edge.testing.checkpoints import build_miniature
from tinyllava_edge.train import TrainConfig, merge_lora_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(recipe="custom", tune_llm="full", tune_vision="full", tune_connector="full")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_run")
    write_dataset(root / "data", n_train=8, n_val=2, n_test=2, image_size=32)
    train_shapes_tokenizer(root / "tokenizer")
    build_miniature("TinyLLaVA-TinyLlama-SigLIP", root / "mini")
    return root


def _config(env, out, **options):
    base = dict(model=str(env / "mini"), data=str(env / "data" / "train.json"), output=str(out), max_steps=4,
                batch_size=2, lr=1e-3, save_steps=2, quiet=True)
    return TrainConfig(**{**base, **options})


def _weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_stages_from_a_preset_with_every_part_full(env, capsys):
    from tinyllava_edge.cli.train import main

    first = train(TrainConfig(preset="tiny-shapes", tokenizer=str(env / "tokenizer"), stage="pretrain",
                              data=str(env / "data" / "pretrain.json"), output=str(env / "pretrain"),
                              max_steps=2, batch_size=2, quiet=True, **FULL))
    s = first.summary
    assert s["stage"] == "pretrain" and s["template"] == "pretrain" and s["steps"] == 2
    assert s["tune_types"] == {"llm": "full", "vision_tower": "full", "connector": "full", "vision_from_layer": None}
    assert s["parameters"]["trainable"] == s["parameters"]["total"] > 4_000_000
    assert s["final_loss"] > 0 and s["samples_per_second"] > 0 and s["wall_seconds"] >= s["train_seconds"] > 0
    out = env / "pretrain"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "loss.png", "train_summary.json", "train_config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "train_summary.json").read_text())["files"]["model.safetensors"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tinyllava" and config["tune_type_vision_tower"] == "full"
    assert config["use_cache"] is True

    # stage 2 starts from stage 1's output, through the CLI
    assert main(["--model", str(out), "--data", str(env / "data" / "train.json"), "--stage", "finetune",
                 "--recipe", "custom", "--tune-llm", "full", "--tune-vision", "full", "--tune-connector", "full",
                 "--output", str(env / "finetune"), "--max-steps", "2", "--batch-size", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "trained finetune / custom" in printed and "model.safetensors" in printed
    second = json.loads((env / "finetune" / "train_summary.json").read_text())
    assert second["template"] == "llama" and second["start"] == str(out)
    # lr 2e-5 for 2 steps: the finetuned weights stay next to stage 1's (a fresh init is ~0.1 away)
    assert 0 < _max_diff(_weights(out), _weights(env / "finetune")) < 1e-2
    assert TinyLlavaForConditionalGeneration.from_pretrained(env / "finetune").config.tune_type_llm == "full"


class StopAfter(TrainerCallback):
    """Ends the run after `step` steps with a checkpoint, as an interruption would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_resume_equals_an_uninterrupted_run(env, tmp_path, tune):
    options = dict(FULL) if tune == "full" else dict(recipe="custom", tune_llm="lora", tune_vision="frozen",
                                                      tune_connector="full", lora_r=4, merge_lora=True)
    whole = train(_config(env, tmp_path / "whole", **options))
    cut = _config(env, tmp_path / "cut", **options)
    assert train(cut, callbacks=[StopAfter(2)]).summary["steps"] == 2
    with pytest.raises(TinyLlavaError, match="not empty; pass resume"):
        train(cut)
    with pytest.raises(TinyLlavaError, match=r"these differ from .*: lr \(0.001 -> 0.002\)"):
        train(TrainConfig(**{**cut.to_dict(), "resume": True, "lr": 2e-3}))
    resumed = train(TrainConfig(**{**cut.to_dict(), "resume": True}))
    assert resumed.summary["resumed_from_step"] == 2 and resumed.summary["steps"] == 4
    # fp32 on CPU, same data order (seeded sampler), optimizer/scheduler/RNG restored: equal to
    # float rounding; measured 0.0.
    assert _max_diff(_weights(tmp_path / "whole"), _weights(tmp_path / "cut")) <= 1e-6
    assert whole.summary["final_loss"] == pytest.approx(resumed.summary["final_loss"], abs=1e-6)


def test_resume_maps_the_files_weight_names(env, tmp_path):
    # DINOv2 weights are written with their 4.x names (model/tf4_compat.py): resuming must map them
    # back, or the tower's trained attention would silently keep its start values
    import shutil

    from tinyllava_edge.testing.checkpoints import miniature_config, random_model

    base = tmp_path / "dinov2"
    shutil.copytree(env / "mini", base)
    raw = json.loads((base / "config.json").read_text())
    config = miniature_config("llama", "dinov2", raw["text_config"]["vocab_size"], pad_token=raw["pad_token"],
                              pad_token_id=raw["pad_token_id"])
    random_model(config).save_pretrained(base)
    train(_config(env, tmp_path / "whole", model=str(base), **FULL))
    cut = _config(env, tmp_path / "cut", model=str(base), **FULL)
    train(cut, callbacks=[StopAfter(2)])
    train(TrainConfig(**{**cut.to_dict(), "resume": True}))
    assert _max_diff(_weights(tmp_path / "whole"), _weights(tmp_path / "cut")) <= 1e-6


def test_resume_needs_a_checkpoint(env, tmp_path):
    with pytest.raises(TinyLlavaError, match="holds no checkpoint-N folder"):
        train(_config(env, tmp_path / "none", resume=True))


def test_qlora_trains_and_merges_into_a_plain_checkpoint(env, tmp_path):
    from tinyllava_edge.train.lora import load_merged

    options = dict(recipe="custom", tune_llm="qlora", tune_vision="frozen", tune_connector="full", lora_r=4,
                   lora_alpha=8, max_steps=3)
    kept = train(_config(env, tmp_path / "adapter", **options))
    assert kept.summary["lora"] == {"r": 4, "alpha": 8, "dropout": 0.05, "merged": False}
    assert kept.summary["parameters"]["trainable"] < kept.summary["parameters"]["total"] / 2
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)  # 7 Linear x 2 layers trained
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["tune_type_llm"] == "qlora"

    merged = train(_config(env, tmp_path / "merged", merge_lora=True, **options))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    via_adapter = load_merged(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, -200, 7, 8, 9]])
    image = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the trained model is still on the GPU where there is one
        logits = [m.cpu()(input_ids=ids, images=image).logits for m in (plain, via_adapter, merged.model)]
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 and torch.equal(logits[0], logits[2])

    merge_lora_checkpoint(tmp_path / "adapter", tmp_path / "merged_later")
    assert _max_diff(_weights(tmp_path / "merged_later"), _weights(tmp_path / "merged")) <= 1e-6
    assert (tmp_path / "merged_later" / "tokenizer.json").is_file()


def test_parts_train_at_their_own_learning_rates(env, tmp_path):
    result = train(_config(env, tmp_path / "rates", max_steps=2, connector_lr=1e-12, **FULL))
    assert result.summary["part_learning_rates"] == {"connector": 1e-12}
    start, end = _weights(env / "mini"), _weights(tmp_path / "rates")
    moved = {k: (end[k].float() - start[k].float()).abs().max().item() for k in start}
    connector = [v for k, v in moved.items() if k.startswith("connector.")]
    llm = [v for k, v in moved.items() if k.startswith("language_model.")]
    assert connector and max(connector) < 1e-9  # AdamW steps are ~lr in size
    assert max(llm) > 1e-4


def test_gradient_checkpointing_trains_the_same(env, tmp_path):
    # base/pretrain: only the connector trains, behind a frozen, checkpointed LLM
    options = dict(recipe="base", stage="pretrain", data=str(env / "data" / "pretrain.json"), max_steps=2)
    train(_config(env, tmp_path / "plain", **options))
    train(_config(env, tmp_path / "ckpt", gradient_checkpointing=True, **options))
    start, plain, ckpt = (_weights(env / "mini"), _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt"))
    assert _max_diff(plain, ckpt) <= 1e-6
    moved = [k for k in start if not torch.equal(start[k], ckpt[k])]
    assert moved and all(k.startswith("connector.") for k in moved)


def test_bad_data_is_skipped_and_counted_in_the_summary(env, tmp_path):
    records = json.loads((env / "data" / "train.json").read_text())[:6]
    records[2]["image"] = "images/missing.png"
    del records[4]["conversations"][1]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    with pytest.raises(TinyLlavaError, match=r"bad.json record 2 \(line \d+\): image 'images/missing.png' not found"):
        train(_config(env, tmp_path / "strict", data=str(data), image_folder=str(env / "data")))
    result = train(_config(env, tmp_path / "skip", data=str(data), image_folder=str(env / "data"), skip_bad=True,
                           max_steps=1))
    assert result.summary["data"]["skipped"] == {"missing_image": 1, "no_assistant_turn": 1}
    assert result.summary["data"]["kept"] == 4


def test_ddp_two_processes_match_one_process(env, tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 1 x accumulation 2 each = one process, batch 2 x 2."""
    common = ["--model", str(env / "mini"), "--data", str(env / "data" / "train.json"), "--lr", "1e-3",
              "--max-steps", "3", "--grad-accum", "2", "--quiet", "--save-steps", "100", "--recipe", "custom",
              "--tune-llm", "full", "--tune-vision", "full", "--tune-connector", "full",
              # fp32: the bound below is float reordering; bf16 autocast (what `auto` picks on a CPU
              # with native bf16) rounds the two runs' sums differently (measured 1.7e-3)
              "--precision", "fp32"]
    # Both runs on CPU, also on a GPU host (two ranks would ask for two GPUs there).
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for launch, batch, name in ((["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "1", "ddp"),
                                ([], "2", "one")):
        proc = subprocess.run(
            [sys.executable, *launch, "-m", "tinyllava_edge.cli.train", *common, "--batch-size", batch,
             "--output", str(tmp_path / name)],
            capture_output=True, text=True, cwd=ROOT, env=env_vars, timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallelism"] == "ddp" and summary["global_batch_size"] == 4
    # Dropout is 0 in the miniature, the sampler gives both runs the same samples per step and the
    # loss is normalised by the tokens of the whole global batch: equal up to float reordering
    # (measured 7e-7).
    assert _max_diff(_weights(tmp_path / "ddp"), _weights(tmp_path / "one")) <= 1e-5


def test_fsdp_on_cpu_is_refused_clearly(env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(TinyLlavaError, match="FSDP needs CUDA GPUs"):
        train(_config(env, tmp_path / "fsdp", fsdp=True))


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_match_ddp(env, tmp_path):
    """DeepSpeed is not a dependency; where it is installed it runs on CPU (gloo) as well."""
    pytest.importorskip("deepspeed")
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["--model", str(env / "mini"), "--data", str(env / "data" / "train.json"), "--lr", "1e-3",
              "--max-steps", "3", "--grad-accum", "2", "--batch-size", "1", "--quiet", "--save-steps", "100"]
    outs = {}
    for name, extra in (("ddp", []), ("zero2", ["--deepspeed", "zero2"]), ("zero3", ["--deepspeed", "zero3"])):
        outs[name] = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "tinyllava_edge.cli.train", *common, *extra, "--output", str(outs[name])],
            capture_output=True, text=True, cwd=ROOT, env=env_vars, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("zero2", "zero3"):
        assert _max_diff(_weights(outs[name]), _weights(outs["ddp"])) <= 1e-5, name


@pytest.mark.cuda
def test_fsdp_and_bf16_on_gpus(env, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("FSDP needs two GPUs")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tinyllava_edge.cli.train", "--model", str(env / "mini"), "--data", str(env / "data" / "train.json"),
         "--max-steps", "2", "--batch-size", "1", "--quiet", "--fsdp", "--output", str(tmp_path / "fsdp")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "fsdp" / "train_summary.json").read_text())
    assert summary["parallelism"] == "fsdp" and summary["precision"] == "bf16"


def test_cli_help_and_one_line_errors(env, tmp_path, capsys):
    from tinyllava_edge.cli.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinyllava-train") and "--tune-vision-from-layer" in out

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--data", "d.json", "--output", "o", "--stage", "middle"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --stage: invalid choice") and err.count("\n") == 1

    target = tmp_path / "file"
    target.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "tinyllava_edge.cli.train", "--model", str(env / "mini"),
                           "--data", str(env / "data" / "train.json"), "--output", str(target)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    # bitsandbytes may print a line about optional CPU kernels on import; ours is the one error line
    lines = [line for line in proc.stderr.splitlines() if "kernels" not in line]
    assert proc.returncode == 2 and lines == [f"error: output {target} is a file; expected a directory"], proc.stderr


def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(tmp_path, monkeypatch):
    import tinyllava_edge.train.run as run_module

    amd = tmp_path / "zen4"
    amd.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n")
    intel = tmp_path / "spr"
    intel.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    old = tmp_path / "zen3"
    old.write_text("flags\t\t: fpu sse2 avx2 avx512f\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n")
    assert run_module.cpu_has_native_bf16(amd) and run_module.cpu_has_native_bf16(intel)
    assert not run_module.cpu_has_native_bf16(old)
    assert not run_module.cpu_has_native_bf16(tmp_path / "missing")

    monkeypatch.setattr(run_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run_module, "cpu_has_native_bf16", lambda: True)
    assert run_module._precision("auto") == "bf16" and run_module._precision("fp32") == "fp32"
    monkeypatch.setattr(run_module, "cpu_has_native_bf16", lambda: False)
    assert run_module._precision("auto") == "fp32"
