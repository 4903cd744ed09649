"""GPU training figures: bf16 throughput and MFU at real small-LMM dims, plus one LoRA and one QLoRA step.

    python benchmarks/train_gpu.py [--steps 20] [--batch 8] [--text-len 128] [--out results.json]

Builds a random-init TinyLLaVA with Qwen2-0.5B LLM dims and a SigLIP-so400m-384 tower (no
download), trains it in bf16 with every part full, and reports tokens/s (image tokens + text
tokens), model FLOPs utilisation against the card's bf16 matmul peak measured in the same run,
and peak memory. Then one LoRA step and one QLoRA (bitsandbytes nf4) step on the LLM.
Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

QWEN2_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                     num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul TFLOP/s on random data (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def build():
    from tinyllava_edge.model import TinyLlavaConfig, TinyLlavaForConditionalGeneration

    config = TinyLlavaConfig(text_config=QWEN2_05B, vision_config=SIGLIP_SO400M, connector_type="mlp2x_gelu",
                             tokenizer_model_max_length=4096)
    return TinyLlavaForConditionalGeneration(config)


def batch(model, size: int, text_len: int):
    from tinyllava_edge.constants import IMAGE_TOKEN_INDEX

    vocab = model.config.text_config.vocab_size
    ids = torch.randint(10, vocab, (size, text_len), device="cuda")
    ids[:, 4] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :5] = -100
    images = torch.randn(size, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    return ids, labels, images


def train_steps(model, steps: int, size: int, text_len: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids, labels, images = batch(model, size, text_len)
    n_image = model.encode_images(images[:1]).shape[1]
    tokens = size * (text_len - 1 + n_image)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, images=images, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 3:  # warm-up excluded
            times.append(time.perf_counter() - t)
    per_step = sorted(times)[len(times) // 2]
    return {"tokens_per_step": tokens, "image_tokens": n_image, "step_s_median": per_step,
            "tokens_per_s": tokens / per_step, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(loss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU: this benchmark measures GPU training", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["bf16_peak_tflops"] = matmul_peak()

    model = build().to("cuda", torch.bfloat16).train()
    model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    full = train_steps(model, args.steps, args.batch, args.text_len)
    # 6 N FLOPs per token (forward + backward), ignoring attention's quadratic term and
    # gradient-checkpointing recompute, so MFU is a lower bound.
    full["mfu"] = 6 * n_params * full["tokens_per_s"] / (result["bf16_peak_tflops"] * 1e12)
    full["parameters"] = n_params
    result["full_bf16"] = full
    del model
    torch.cuda.empty_cache()

    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
    model = build().to("cuda", torch.bfloat16)
    model.language_model = get_peft_model(model.language_model, lora_cfg)
    model.vision_tower.requires_grad_(False)
    result["lora_bf16"] = train_steps(model, 3, args.batch, args.text_len)
    del model
    torch.cuda.empty_cache()

    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    model = build()
    for name, module in list(model.language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(module, child_name, q)
    model = model.to("cuda")
    model.vision_tower.to(torch.bfloat16).requires_grad_(False)
    model.connector.to(torch.bfloat16)
    model.language_model = prepare_model_for_kbit_training(model.language_model, use_gradient_checkpointing=True)
    model.language_model = get_peft_model(model.language_model, lora_cfg)
    result["qlora_nf4"] = train_steps(model, 3, args.batch, args.text_len)

    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
