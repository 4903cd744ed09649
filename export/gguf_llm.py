"""The LLM half of a TinyLLaVA checkpoint as a GGUF file that stock llama.cpp loads.

`write_llm_gguf(model, tokenizer, path)` writes the language model's weights (named and transformed
per family by `gguf_arch`), its hyper-parameters, the tokenizer (`gguf_tokenizer`) and the chat
template as Jinja (`chat_template`). The file appears at `path` only when complete: it is written
under a temporary name in the same folder and moved into place.

`llm_logits_diff(model, path, prompts)` is the check against the PyTorch reference: the same token
ids through transformers and through llama.cpp, max |logit difference|.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf
import numpy as np

from tinyllava_edge.atomic import atomic_file
from tinyllava_edge.data.template import default_template_for_family, get_template
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.export.chat_template import jinja_chat_template
from tinyllava_edge.export.gguf_arch import (ArchSpec, Hyper, arch_for, hyperparameters, map_tensor_names, transform,
                                             write_hyperparameters)
from tinyllava_edge.export.gguf_tokenizer import read_vocab

# ftype name -> (general.file_type, dtype of matrices). Vectors (norm weights, biases) stay F32
# in every type, as llama.cpp's converter keeps them: they are tiny and ggml adds/multiplies them
# in F32.
FTYPES = MappingProxyType({
    "f32": (gguf.LlamaFileType.ALL_F32, np.float32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, np.float16),
})


_GGML_F32 = int(gguf.GGMLQuantizationType.F32)  # llama.cpp's ggml_type for a KV cache type


@dataclass(frozen=True)
class _PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (gguf-py reverses it into ggml's)
    dtype: type
    load: Callable[[], np.ndarray]  # converted on demand, so one tensor at a time is in memory

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def write_llm_gguf(model: Any, tokenizer: Any, out_path: str | os.PathLike, *, ftype: str = "f16",
                   template: str | None = None, progress: bool = False,
                   weights: Mapping[str, Any] | None = None) -> dict:
    """Write `model.language_model` with `tokenizer` to a GGUF file at `out_path`.

    `model` is a `TinyLlavaForConditionalGeneration`, `tokenizer` its HF tokenizer
    (`load_tokenizer(checkpoint)`), `ftype` "f32" or "f16", `template` a chat template name
    (default: the one the checkpoint's LLM family is trained with). `weights` (names relative to
    the language model, e.g. a checkpoint's lazy mapping) supplies the tensors instead of the
    model's parameters, which may then be on the meta device: each tensor is read, converted and
    written before the next is read, so the file is streamed from the checkpoint in its stored
    dtype and never more than one tensor is held. Returns a report of what was written.
    """
    if ftype not in FTYPES:
        raise TinyLlavaError(f"GGUF LLM type {ftype!r} is not supported; expected one of {', '.join(FTYPES)}")
    file_type, matrix_dtype = FTYPES[ftype]
    text_config = model.config.text_config
    family = text_config.model_type
    spec = arch_for(family)
    hp = hyperparameters(spec, text_config)
    template_name = template or default_template_for_family(family)
    chat_template = jinja_chat_template(get_template(template_name))
    tensors = _plan_tensors(spec, model.language_model, hp, matrix_dtype, weights)
    n_vocab = model.language_model.get_input_embeddings().weight.shape[0]
    vocab = read_vocab(tokenizer, n_vocab, family)

    out = Path(out_path)
    if out.is_dir():
        raise TinyLlavaError(f"GGUF output {out} is a directory; expected a file path")
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, spec.arch_name)
        try:
            writer.add_name(getattr(model.config, "llm_model_name_or_path", None) or family)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            write_hyperparameters(writer, spec, hp)
            vocab.write(writer)
            writer.add_chat_template(chat_template)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), t.nbytes)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_data(writer, tensors, progress)
        finally:
            writer.close()  # flushes the file before atomic_file renames it; after an error, releases it

    types = Counter(gguf.GGMLQuantizationType.F16.name if t.dtype is np.float16 else
                    gguf.GGMLQuantizationType.F32.name for t in tensors)
    return {
        "path": str(out),
        "architecture": spec.arch_name,
        "family": family,
        "ftype": ftype,
        "n_tensors": len(tensors),
        "tensor_types": dict(sorted(types.items())),
        "file_size": out.stat().st_size,
        "tokenizer_model": vocab.model,
        "tokenizer_pre": vocab.pre,
        "n_vocab": len(vocab.tokens),
        "add_bos": vocab.add_bos,
        "context_length": hp.context_length,
        "template": template_name,
    }


def _plan_tensors(spec: ArchSpec, lm: Any, hp: Hyper, matrix_dtype: type,
                  weights: Mapping[str, Any] | None) -> list[_PlannedTensor]:
    import torch

    state = dict(lm.state_dict())
    source = {name: name for name in state}  # GGUF-bound name -> where its data is read
    out_layer, in_layer = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied = out_layer is not None and out_layer.weight is in_layer.weight
    if tied:
        del state["lm_head.weight"]
        if spec.output == "required":  # the graph always reads `output`: write the shared matrix
            state["lm_head.weight"] = in_layer.weight
            source["lm_head.weight"] = next(n for n, p in lm.named_parameters() if p is in_layer.weight)
    elif spec.output == "tied":
        raise TinyLlavaError(
            f"this {spec.model_type} model has an lm_head apart from its embeddings; llama.cpp's "
            f"{spec.arch_name} graph always projects with token_embd"
        )
    names = map_tensor_names(spec, state)
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise TinyLlavaError(f"GGUF export needs floating-point weights; {', '.join(not_float)} are not "
                             "(export the model before quantizing it)")

    def loader(hf_name: str, kind: gguf.MODEL_TENSOR, dtype: type) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            value = weights[source[hf_name]] if weights is not None else state[hf_name]
            array = value.detach().to("cpu", torch.float32).numpy()
            return np.ascontiguousarray(transform(spec, kind, array, hp), dtype=dtype)
        return load

    planned = []
    for hf_name, value in state.items():
        gguf_name, kind = names[hf_name]
        dtype = matrix_dtype if value.dim() > 1 else np.float32
        planned.append(_PlannedTensor(gguf_name, tuple(value.shape), dtype, loader(hf_name, kind, dtype)))
    return planned


def _write_data(writer: gguf.GGUFWriter, tensors: Sequence[_PlannedTensor], progress: bool) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="GGUF LLM")
    try:
        for t in tensors:
            array = t.load()
            writer.write_tensor_data(array)
            if bar is not None:
                bar.update(array.nbytes)
    finally:
        if bar is not None:
            bar.close()


def llm_logits_diff(model: Any, gguf_path: str | os.PathLike, prompts: Sequence[Sequence[int]],
                    n_threads: int = 1, f32_cache: bool = True) -> float:
    """Max |logit difference| between transformers and llama.cpp over every position of `prompts`.

    Each prompt (token ids) runs from an empty context in both; llama.cpp's logits for all
    positions come from `logits_all`. `f32_cache` keeps llama.cpp's KV cache in F32 (its default
    is F16, which alone adds ~1e-3 on random miniatures), so what is measured is the file.
    """
    import torch
    from llama_cpp import Llama

    n_ctx = max(len(p) for p in prompts) + 1
    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=max(n_ctx, 32), n_threads=n_threads,
                n_batch=max(n_ctx, 32), verbose=False,
                **({"type_k": _GGML_F32, "type_v": _GGML_F32} if f32_cache else {}))
    worst = 0.0
    try:
        for ids in prompts:
            with torch.no_grad():
                ref = model.language_model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()
            llm.reset()
            llm.eval(list(ids))
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            worst = max(worst, float(np.abs(got - ref).max()))
    finally:
        llm.close()
    return worst
