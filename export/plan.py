"""What an export will need before it starts: peak resident memory per stage, and disk.

    plan = export_plan("runs/model", bits=4, verify=True, mmproj=True)
    plan["peak_bytes"], plan["peak_stage"], plan["disk_bytes"]
    check_plan(plan, max_memory=8 * 10**9, out_dir="bundles/q4")   # refuses in one sentence

The figures come from the checkpoint's tensor index alone (model/weights.py: no tensor is read)
and from how each stage holds memory (export/bundle.py, quant/bundle.py; the stages run one after
another and free what they held): the vision graph is made from the float32 tower and connector;
the LLM GGUF streams one tensor at a time; llama.cpp maps a whole GGUF; the PyTorch reference holds
the checkpoint in its stored dtype plus one layer widened to float32 and one forward's activations
(no KV cache: export/checks.torch_teacher_forced). `BASE` is the interpreter
with torch, onnxruntime and llama.cpp imported, the factors are measured at bench-scale (SigLIP-
so400m's tower, docs/bench.md "Memory"). The estimates err high where they are not measured
(bench-scale, --bits 16: reference 5.2 GiB estimated, 4.3 measured; vision 4.9 and 4.2); the
manifest records the plan beside the measured peak of every stage, so each export checks it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.sizes import human_size

BASE = 700 * 2**20  # python + torch + onnx + onnxruntime + llama.cpp, imported (measured ~0.55 GB)
ONNX_EXPORT_FACTOR = 2.6  # torch.onnx: the float32 weights, the exported program's copy, serialization
ONNX_QUANT_FACTOR = 3.0  # onnxruntime's int4 quantizer: the graph loaded, its quantized copy, the save
KV_F32_CHECK_TOKENS = 512  # positions past the image the checks' llama.cpp context holds (bundle._verify_llm)


def export_plan(checkpoint_dir: str | os.PathLike, *, bits: int, verify: bool, mmproj: bool = True) -> dict:
    """Estimated peak resident bytes of each stage of `tinyllava-export --bits bits`, the largest,
    and the bytes the output (plus a quantized export's scratch bundle) takes on disk."""
    from tinyllava_edge.model.checkpoint import read_checkpoint

    ckpt = read_checkpoint(checkpoint_dir)
    state = ckpt.state_dict
    shape_of = getattr(state, "shape", lambda k: tuple(state[k].shape))  # a renamed DINOv2 tower is a dict
    numel = {name: _numel(shape_of(name)) for name in state}
    vision = sum(n for k, n in numel.items() if k.startswith(("vision_tower.", "connector.")))
    llm = sum(n for k, n in numel.items() if k.startswith("language_model."))
    text = ckpt.config.text_config
    if not getattr(text, "tie_word_embeddings", False) or "language_model.lm_head.weight" in numel:
        llm_file = 2 * llm
    else:  # a tied matrix may be written twice (architectures whose graph always reads `output`)
        llm_file = 2 * llm + 2 * text.vocab_size * text.hidden_size
    width = 4 if bits == 32 else 2
    llm_file = llm_file * width // 2
    vision32 = 4 * vision
    largest = max(numel.values()) * 4
    stored = state.nbytes() if hasattr(state, "nbytes") else sum(v.numel() * v.element_size() for v in state.values())
    n_tokens = _image_tokens(ckpt.config)
    kv = 2 * text.num_hidden_layers * _kv_width(text) * 4 * (n_tokens + KV_F32_CHECK_TOKENS)
    stages = {
        "vision graph (torch.onnx, float32 tower + connector)": vision32 * ONNX_EXPORT_FACTOR,
        "LLM GGUF (streamed, one tensor at a time)": 3 * largest,
        "llama.cpp probe (the GGUF mapped)": llm_file,
    }
    if verify:
        block = _largest_block(numel, shape_of, text.vocab_size)
        positions = n_tokens + 128  # the image, the question and the answer (bundle._verify_llm)
        activations = 4 * (3 * text.num_attention_heads * positions ** 2
                           + 4 * positions * (getattr(text, "intermediate_size", None) or 4 * text.hidden_size))
        stages["PyTorch reference (stored dtype, one layer widened)"] = stored + block + activations
        # the vision graph's rows first (onnxruntime, no pre-packing), then llama.cpp: one at a time
        stages["checks (vision.onnx, then the GGUF mapped with an F32 KV cache)"] = max(vision32, llm_file + kv)
    if bits in (8, 4):
        stages["quantization (llama.cpp maps the F16 GGUF)"] = llm_file + 3 * largest
        stages["quantized vision graph (onnxruntime)"] = vision32 * ONNX_QUANT_FACTOR
        if verify:
            stages["quantized LLM check (one GGUF mapped at a time)"] = max(vision32, llm_file + kv)
    stages = {k: int(BASE + v) for k, v in stages.items()}
    peak_stage = max(stages, key=stages.get)
    mmproj_file = vision32 // 2 if mmproj else 0
    bundle16 = vision32 + llm_file + mmproj_file
    disk = bundle16 if bits in (16, 32) else bundle16 + vision32 + llm_file // 3 + mmproj_file
    return {"stages": stages, "peak_stage": peak_stage, "peak_bytes": stages[peak_stage],
            "checkpoint_bytes": stored, "disk_bytes": int(disk),
            "without_checks_bytes": max(v for k, v in stages.items() if "reference" not in k and "check" not in k)}


def check_plan(plan: dict, *, max_memory: int | None, out_dir: str | os.PathLike) -> None:
    """Refuse before any work, in one sentence, an export that cannot fit `max_memory` bytes of
    memory or the free space beside `out_dir`."""
    if max_memory is not None and plan["peak_bytes"] > max_memory:
        hint = ""
        if plan["without_checks_bytes"] <= max_memory:
            hint = f"; without the checks against PyTorch (--no-verify) it needs {human_size(plan['without_checks_bytes'])}"
        raise TinyLlavaError(f"this export needs about {human_size(plan['peak_bytes'])} of memory (its largest stage: "
                             f"{plan['peak_stage']}), more than --max-memory {human_size(max_memory)}{hint}")
    parent = next((p for p in (Path(out_dir).resolve(), *Path(out_dir).resolve().parents) if p.exists()), None)
    if parent is not None:
        free = shutil.disk_usage(parent).free
        if plan["disk_bytes"] > free:
            raise TinyLlavaError(f"this export writes about {human_size(plan['disk_bytes'])} beside {out_dir} and "
                                 f"{parent} has {human_size(free)} free; free some space or choose another --out")


def _largest_block(numel: dict[str, int], shape_of, vocab_size: int) -> int:
    """float32 bytes of the largest thing `checks.computed_in_fp32` widens at once: a layer (the
    tensors under one `layers.N.`), or a tensor outside the layers; the embedding and the output
    layer (vocab_size rows) are widened a slice at a time and not counted."""
    import re

    groups: dict[str, int] = {}
    for name, n in numel.items():
        shape = shape_of(name)
        if len(shape) == 2 and int(shape[0]) == vocab_size:
            continue
        match = re.match(r"(.*\.layers?\.\d+)\.", name)
        key = match.group(1) if match else name
        groups[key] = groups.get(key, 0) + n
    return 4 * max(groups.values(), default=0)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _kv_width(text) -> int:
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return kv_heads * head_dim


def _image_tokens(config) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1
