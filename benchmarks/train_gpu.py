"""GPU training figures: bf16 throughput and MFU at real small-LMM dims, plus LoRA and QLoRA steps.

    python benchmarks/train_gpu.py [--steps 20] [--batch 8] [--text-len 128] [--out results.json]

Builds a random-init TinyLLaVA with Qwen2-0.5B LLM dims and a SigLIP-so400m-384 tower (no
download) and trains it the way `tinyllava-train` does on a GPU: fp32 master weights under bf16
autocast, AdamW, gradient checkpointing. Every part is tuned through the project's own
`apply_tuning` (train/tune.py): `full` for the throughput run, then `lora` and `qlora`
(bitsandbytes NF4 base weights) on the LLM. Reports tokens/s (image + text tokens), model FLOPs
utilisation against the card's bf16 matmul peak measured in the same run, and peak memory.
`--tiny` shrinks every dimension so the script can be checked on a CPU. Needs a CUDA GPU
otherwise; exits with a message when there is none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tinyllava_edge.bench.dims import QWEN2_05B, SIGLIP_SO400M

TINY_TEXT = {**QWEN2_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 1000}
TINY_VISION = {**SIGLIP_SO400M, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 28}


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul TFLOP/s on random data (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(tiny: bool):
    from tinyllava_edge.model import TinyLlavaConfig, TinyLlavaForConditionalGeneration

    config = TinyLlavaConfig(text_config=TINY_TEXT if tiny else QWEN2_05B,
                             vision_config=TINY_VISION if tiny else SIGLIP_SO400M,
                             connector_type="mlp2x_gelu", tokenizer_model_max_length=4096)
    model = TinyLlavaForConditionalGeneration(config)
    model.config.use_cache = False
    return model


def prepared(tune: dict, device: torch.device, tiny: bool):
    """A model set up by the project's own tuning code, on `device`, fp32 masters as the Trainer keeps."""
    from tinyllava_edge.train.recipes import TuneSpec
    from tinyllava_edge.train.tune import LoraSettings, apply_tuning, count_parameters

    model = build(tiny)
    trained = apply_tuning(model, TuneSpec(**tune), LoraSettings(), device, torch.bfloat16)
    trained.to(device)  # 4-bit layers are already there; everything else moves
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(trained)
    return model, trained, trainable, total


def batch(model, size: int, text_len: int, device: torch.device):
    from tinyllava_edge.constants import IMAGE_TOKEN_INDEX

    vocab = model.config.text_config.vocab_size
    side = model.config.vision_config.image_size
    ids = torch.randint(10, vocab, (size, text_len), device=device)
    ids[:, 4] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :5] = -100
    images = torch.randn(size, 3, side, side, device=device)
    return ids, labels, images


def train_steps(model, trained, steps: int, size: int, text_len: int, device: torch.device) -> dict:
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    ids, labels, images = batch(model, size, text_len, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        n_image = model.encode_images(images[:1]).shape[1]
    tokens = size * (text_len - 1 + n_image)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, images=images, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= 2:  # warm-up excluded
            times.append(time.perf_counter() - t)
    per_step = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"steps_timed": steps, "tokens_per_step": tokens, "image_tokens": n_image, "step_s_median": per_step,
            "tokens_per_s": tokens / per_step, "peak_mem_gib": peak, "loss": float(loss)}


def _layer_types(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.language_model.modules():
        name = type(module).__module__.split(".")[0] + "." + type(module).__name__
        if "Linear" in name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="tiny dims, runs on CPU (checks the script only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("error: no CUDA GPU: this benchmark measures GPU training (--tiny checks it on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "batch": args.batch, "text_len": args.text_len,
                    "precision": "bf16 autocast, fp32 master weights, gradient checkpointing"}
    result["bf16_peak_tflops"] = matmul_peak(device, n=8192 if device.type == "cuda" else 256)

    runs = {
        "full_bf16": ({"llm": "full", "vision_tower": "full", "connector": "full"}, args.steps),
        "lora_bf16": ({"llm": "lora", "vision_tower": "frozen", "connector": "full"}, 3),
        "qlora_nf4": ({"llm": "qlora", "vision_tower": "frozen", "connector": "full"}, 3),
    }
    for name, (tune, steps) in runs.items():
        model, trained, trainable, total = prepared(tune, device, args.tiny)
        figures = train_steps(model, trained, steps, args.batch, args.text_len, device)
        figures.update(tune=tune, trainable_parameters=trainable, parameters=total,
                       llm_linear_types=_layer_types(model))
        if name == "full_bf16":
            # 6 N FLOPs per token (forward + backward), ignoring attention's quadratic term and
            # the gradient-checkpointing recompute: MFU is a lower bound.
            figures["mfu"] = 6 * total * figures["tokens_per_s"] / (result["bf16_peak_tflops"] * 1e12)
        result[name] = figures
        print(name, json.dumps(figures), flush=True)
        del model, trained
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not any("Linear4bit" in k for k in result["qlora_nf4"]["llm_linear_types"]):
        print("error: the QLoRA run has no 4-bit layers", file=sys.stderr)
        return 1

    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
