"""Checkpoints whose LLM is stored GPTQ-quantized, and how they load (GPTQModel, CPU).

`quant/torch_gptq.py` writes them; `TinyLlavaForConditionalGeneration.from_pretrained` (so also
`tinyllava_edge.load`) reads them through :func:`attach_gptq_llm`. The layout is the Factory one
with the LLM moved into a Hugging Face causal-LM folder of its own:

    config.json               the TinyLlavaConfig (text_config: the LLM's unquantized architecture)
    model.safetensors         vision_tower.* and connector.* only, in fp32
    tokenizer files
    quantization.json         what was done: bits, group size, calibration, time, layer count, fidelity
    language_model/           what GPTQModel saved: config.json with `quantization_config`
                              (quant_method "gptq"), model.safetensors (qweight / qzeros / scales /
                              g_idx per linear; embeddings, norms, lm_head unquantized),
                              quantize_config.json, the tokenizer (GPTQModel.load reads one)

GPTQModel (PyPI `gptqmodel`) is only in `.venv-gptq` (scripts/setup-gptq.sh: it declares
torch>=2.14.1 and would pull a CUDA torch into the default environment). Reading the layout
needs only json; loading the LLM needs GPTQModel, which is imported here and nowhere at module
level. The LLM loads with GPTQModel's torch fused kernel (`BACKEND.GPTQ_TORCH_FUSED`; GPTQModel's
default CPU pick, the AVX-512 kernel, compiles C++ for ~155 s on first use), on CPU, in the dtype
asked for (default float32, like unquantized checkpoints). That kernel repacks each layer's
weights at its first forward and multiplies with torch's `aten._weight_int4pack_mm_for_cpu`, in
bfloat16: the quantized matmuls see bf16 activations whatever the model's dtype
(gptqmodel/nn_modules/qlinear/torch_fused.py), which the measured differences include.
Importing GPTQModel touches the process: it sets PYTORCH_ALLOC_CONF and CUDA_DEVICE_ORDER when
unset and patches transformers' GPTQ quantizer; that kernel's first forward sets
torch._inductor's `freezing` and `max_autotune`. Hence it is imported only for GPTQ work.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tinyllava_edge.errors import CheckpointError, TinyLlavaError

GPTQ_LLM_DIR = "language_model"
QUANTIZATION_RECORD = "quantization.json"
MISSING_GPTQMODEL = ("GPTQ needs GPTQModel, which is installed only in its own environment (it would pull a CUDA "
                     "torch build into this one): run bash scripts/setup-gptq.sh and use .venv-gptq/bin/python or "
                     "its tinyllava-* commands")
# The only GPTQ kernel used here: torch ops, CPU, no compile (gptqmodel/nn_modules/qlinear/torch_fused.py:
# 4 bits; group size -1, 16, 32, 64 or 128).
FUSED_BITS = (4,)
FUSED_GROUP_SIZES = (128, 64, 32, 16, -1)


def gptq_llm_dir(path: str | os.PathLike) -> Path | None:
    """`path/language_model` when it holds a GPTQ causal LM (its config says quant_method "gptq"), else None."""
    folder = Path(path) / GPTQ_LLM_DIR
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config} is not valid JSON ({exc})") from None
    method = (raw.get("quantization_config") or {}).get("quant_method") if isinstance(raw, dict) else None
    return folder if method == "gptq" else None


def read_quantization_record(path: str | os.PathLike) -> dict:
    """The `quantization.json` of a GPTQ checkpoint (one sentence when it is missing or unreadable)."""
    record = Path(path) / QUANTIZATION_RECORD
    try:
        raw = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} holds a GPTQ LLM in {GPTQ_LLM_DIR}/ but no {QUANTIZATION_RECORD}; "
                              "expected a checkpoint written by tinyllava-quantize --torch gptq") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{record} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("method") != "gptq":
        raise CheckpointError(f"{record} does not record a GPTQ quantization (method {raw.get('method')!r})"
                              if isinstance(raw, dict) else f"{record} holds no JSON object")
    return raw


@contextlib.contextmanager
def quiet():
    """GPTQModel logs to stdout (a banner, kernel choices, config dumps, progress tables) and its
    loading draws progress bars on stderr; stdout is where tinyllava-chat streams answers, so
    loading runs inside this (errors still raise, with their message)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def import_gptqmodel():
    """`gptqmodel`, imported with this machine's settings, or one sentence naming setup-gptq.sh."""
    # GPTQModel 7.7.0 sizes its CPU pool as (cores + 1) // 2 but asks for 2 loader workers: on <= 3
    # cores `GPTQModel.load` raises "Virtual pool 'model_loader:cpu' requests 2 workers but parent
    # 'cpu' only has 1". Its packing C++ extension costs a 39 s compile for the same bytes as the
    # Python packer on these model sizes. Both must be set before the import.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # Its import also logs warnings through handlers bound to the real stderr (torchao's CUDA-only
    # libraries that do not load on a CPU build, torch pytree deprecations): irrelevant here, muted.
    logging.disable(logging.WARNING)
    try:
        with quiet():
            import gptqmodel
    except ImportError:
        raise TinyLlavaError(MISSING_GPTQMODEL) from None
    finally:
        logging.disable(logging.NOTSET)
    # tokenicer (imported by gptqmodel) calls logging.basicConfig(level=INFO) at import, which would
    # print every library's INFO records for the rest of the process: undo it.
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    # Its quantization loop writes a per-layer log file under ./logs of whatever directory the
    # process runs in (a module constant, loop_processor._PROJECT_LOG_DIR): send those to the
    # system temp directory instead of the user's working tree.
    try:
        from gptqmodel.looper import loop_processor

        if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
            loop_processor._PROJECT_LOG_DIR = Path(tempfile.gettempdir()) / "gptqmodel-logs"
    except ImportError:
        pass
    return gptqmodel


def gptq_layers(module) -> dict[str, int]:
    """{GPTQModel quantized-linear class name: count} under `module`."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return dict(Counter(type(m).__name__ for m in module.modules() if isinstance(m, BaseQuantLinear)))


def load_gptq_llm(llm_dir: str | os.PathLike, dtype: Any = None, device: Any = None):
    """The causal LM of `llm_dir` (GPTQModel's folder) as a transformers model, quantized linears in place."""
    import torch

    if device is not None and torch.device(device).type != "cpu":
        raise TinyLlavaError(f"GPTQ checkpoints run on CPU here (GPTQModel's torch fused kernel); device {device!r} "
                             "was asked for: load with device='cpu'")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    gptqmodel = import_gptqmodel()
    from transformers import GenerationConfig

    with quiet():
        wrapper = gptqmodel.GPTQModel.load(str(llm_dir), device="cpu", backend=gptqmodel.BACKEND.GPTQ_TORCH_FUSED,
                                           dtype=dtype or torch.float32)
    llm = wrapper.model.eval()
    # GPTQModel forces `do_sample=True` into the generation config it loads (gptqmodel/utils/hf.py
    # _sanitize_generation_config); give back the defaults an unquantized LLM built from its config has.
    llm.generation_config = GenerationConfig.from_model_config(llm.config)
    return llm


def attach_gptq_llm(model, state: dict, where: Path, llm_dir: Path, dtype: Any = None, device: Any = None) -> dict:
    """Fill `model` (built from its config, weights not loaded): the vision tower and connector from
    `state` (the checkpoint's model.safetensors, our names), the LLM from `llm_dir` through GPTQModel.

    Checks that the LLM holds as many quantized linears as `quantization.json` recorded; returns that
    record with the layer classes found under `layers`.
    """
    from tinyllava_edge.model.checkpoint import load_state

    import_gptqmodel()  # without it, the one sentence naming setup-gptq.sh before anything else
    record = read_quantization_record(where)
    parts = ("vision_tower", "connector")
    stray = sorted(k for k in state if k.split(".", 1)[0] not in parts)
    if stray:
        raise CheckpointError(f"{where} holds its LLM GPTQ-quantized in {GPTQ_LLM_DIR}/ but model.safetensors also "
                              f"holds {len(stray)} other weights (first: {stray[0]}); expected only the vision "
                              "tower and connector there")
    for part in parts:
        prefix = f"{part}."
        load_state(getattr(model, part), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                   where)
    llm = load_gptq_llm(llm_dir, dtype=dtype, device=device)
    expected = int(record.get("quantized_linears", 0))
    layers = gptq_layers(llm)
    if not expected or sum(layers.values()) != expected:
        raise CheckpointError(f"{llm_dir} loaded with {sum(layers.values())} GPTQ linear layers "
                              f"({', '.join(f'{k} x{v}' for k, v in layers.items()) or 'none'}) but "
                              f"{QUANTIZATION_RECORD} records {expected}")
    model.language_model = llm
    if dtype is not None or device is not None:
        for part in parts:
            getattr(model, part).to(device=device, dtype=dtype)
    return {**record, "layers": layers}
