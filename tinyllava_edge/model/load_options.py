"""What `TinyLlavaForConditionalGeneration.from_pretrained` does with each option transformers passes.

transformers' Auto classes and `PreTrainedModel.from_pretrained` hand every model class a set of
keyword options that grows between releases (5.25 added `force_download` and `proxies` to what
the Auto classes forward). Each one is classified here once, so that a new transformers either
finds it handled or fails `tests/test_model.py::test_every_transformers_option_is_classified`
instead of a user's load:

- HONOURED: changes what is loaded or returned (dtype, device, subfolder, loading info).
  The Hub options (revision, cache_dir, token, local_files_only, force_download) act when the
  path is a Hub repository id (tinyllava_edge/hub.py); a local folder is read as it is.
- IGNORED: has nothing to act on for a safetensors checkpoint (proxies and the bookkeeping keys;
  options whose default is all we do: weights_only, mmap, ...).
- REFUSED_UNLESS_DEFAULT: asks for something this loader does not do (quantization configs,
  GGUF, tensor parallelism, offloading, ...). Its default value passes silently (the Auto
  classes forward several with None); any other value is refused with the way to get it.
"""

from __future__ import annotations

from typing import Any

# Options of tinyllava_edge.hub.resolve_model, for a path that is a Hub repository id.
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
HONOURED = frozenset({"dtype", "torch_dtype", "device", "device_map", "subfolder", "output_loading_info",
                      "attn_implementation", "use_safetensors", "ignore_mismatched_sizes",
                      # the Auto classes always pass the hub options here; it names an adapter
                      # only when they found an adapter_config.json in the folder
                      "adapter_kwargs", *HUB_OPTIONS})

# huggingface_hub's snapshot_download takes no proxies (its HTTP client reads the HTTP(S)_PROXY
# variables) and resumes by itself; the bookkeeping keys are what the Auto classes and pipelines
# add for themselves.
IGNORED = frozenset({
    "proxies", "resume_download", "user_agent", "code_revision", "_from_auto", "_from_pipeline", "_commit_hash",
    # the directory's own config.json is always the one read: the Auto classes pass the config
    # they read from the same file (only an attn_implementation they put in it is taken)
    "config",
    # remote code is never run, whatever this says: the model class is this one
    "trust_remote_code",
    # safetensors only: loading never unpickles, so weights_only=True is all there is
    "weights_only", "disable_mmap", "low_cpu_mem_usage", "tqdm_class",
})

REFUSED_UNLESS_DEFAULT = {
    "quantization_config": "load 4/8-bit weights with tinyllava_edge.load(path, quantization='nf4' | 'int8')",
    "gguf_file": "a GGUF bundle loads with tinyllava_edge.load(bundle_dir)",
    "variant": "checkpoints here are one model.safetensors without variants",
    "state_dict": "weights come from the folder's model.safetensors",
    "from_tf": "only safetensors are read", "from_flax": "only safetensors are read",
    "tp_plan": "tensor parallelism is for the HF export (tinyllava-export --format hf)",
    "tp_size": "tensor parallelism is for the HF export (tinyllava-export --format hf)",
    "device_mesh": "tensor parallelism is for the HF export (tinyllava-export --format hf)",
    "distributed_config": "tensor parallelism is for the HF export (tinyllava-export --format hf)",
    "max_memory": "place the whole model with device=",
    "offload_folder": "place the whole model with device=", "offload_buffers": "place the whole model with device=",
    "offload_state_dict": "place the whole model with device=",
    "key_mapping": "the three checkpoint layouts are mapped by the loader itself",
    "adapter_name": "merge LoRA adapters before saving (tinyllava-train does)",
    "_adapter_model_path": "merge LoRA adapters before saving (tinyllava-train does)",
    "generation_config": "pass generation settings to generate()",
    "use_kernels": "hub kernels are never fetched at run time", "kernel_config": "hub kernels are never fetched at run time",
    "kernels_mode": "hub kernels are never fetched at run time", "allow_all_kernels": "hub kernels are never fetched at run time",
    "fusion_config": "the model runs transformers' own modules", "experts_implementation": "no model here has experts",
}

CLASSIFIED = HONOURED | IGNORED | set(REFUSED_UNLESS_DEFAULT)


def resolve_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check `from_pretrained`'s keyword options; return the honoured ones, normalised.

    Returns {"dtype", "device", "subfolder", "output_loading_info", "attn_implementation", "hub"}
    ("hub": the HUB_OPTIONS given, for tinyllava_edge.hub.resolve_model).
    Raises TypeError for an option transformers does not define either, ValueError for a value
    this loader does not do.
    """
    unknown = sorted(set(kwargs) - CLASSIFIED)
    if unknown:
        raise TypeError(f"unsupported from_pretrained options: {', '.join(unknown)}")
    for name, how in REFUSED_UNLESS_DEFAULT.items():
        if kwargs.get(name) not in (None, False, {}, ""):
            raise ValueError(f"from_pretrained({name}=...) is not supported for TinyLLaVA checkpoints: {how}")
    if "_adapter_model_path" in (kwargs.get("adapter_kwargs") or {}):
        raise ValueError("from_pretrained: the folder holds a PEFT adapter; merge LoRA adapters before saving "
                         "(tinyllava-train does)")
    if kwargs.get("use_safetensors") is False:
        raise ValueError("from_pretrained(use_safetensors=False): only safetensors are read (no pickle)")
    if kwargs.get("ignore_mismatched_sizes"):
        raise ValueError("from_pretrained(ignore_mismatched_sizes=True): weights of the wrong shape always "
                         "fail the load, listed by name")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    device = kwargs.get("device")
    device_map = kwargs.get("device_map")
    if device_map is not None:
        device = _device_from_map(device_map, device)
    return {
        "dtype": dtype,
        "device": device,
        "subfolder": kwargs.get("subfolder") or "",
        "output_loading_info": bool(kwargs.get("output_loading_info")),
        # the Auto classes move attn_implementation into the config they read and pass that
        "attn_implementation": kwargs.get("attn_implementation")
        or getattr(kwargs.get("config"), "_attn_implementation_internal", None),
        "hub": {name: kwargs[name] for name in HUB_OPTIONS if kwargs.get(name) is not None},
    }


def _device_from_map(device_map: Any, device: Any) -> Any:
    """A device_map that puts the whole model on one device; per-module placement is refused."""
    if device is not None:
        raise ValueError("from_pretrained: pass device= or device_map=, not both")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError("from_pretrained(device_map=...): only the whole model on one device is supported "
                             "({'': 'cpu'} or a device name), not a per-module map")
        device_map = device_map[""]
    if device_map == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"from_pretrained(device_map={device_map!r}): only the whole model on one device is "
                         "supported ('auto', 'cpu', 'cuda:0', ...)")
    return device_map
