"""The mmproj (vision tower + connector for stock llama.cpp mtmd) requantized to Q8_0.

    quantize_mmproj("bundle/mmproj-F16.gguf", "out/mmproj-Q8_0.gguf")

`llama_model_quantize` only reads text-model files (an mmproj has `general.architecture =
"clip"`), so the file is rewritten here: every key/value copied as read, the matrices of the
attention, FFN and projector (`*.weight`, 2-D, rows a multiple of 32) quantized with gguf-py's
numpy Q8_0 (the same 32-value blocks with one f16 scale as ggml's), everything else (patch
convolution, position embeddings, norms, biases) kept as written. This mirrors what llama.cpp's
own `clip_model_quantize` keeps out (tools/mtmd/clip.cpp quantizes 2-D weights only).
Whether stock mtmd then computes the same features is measured, not assumed
(`export.validate.measure_mmproj`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinyllava_edge.atomic import atomic_file
from tinyllava_edge.errors import TinyLlavaError

MMPROJ_TYPES = ("Q8_0",)
_KEEP = ("position_embd", "patch_embd", "class_embd")  # not matmul weights: keep their type
_FILE_TYPE_Q8_0 = 7  # LLAMA_FTYPE_MOSTLY_Q8_0 (general.file_type)


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and shape[-1] % 32 == 0 and not any(k in name for k in _KEEP)


def quantize_mmproj(src: str | os.PathLike, dst: str | os.PathLike, quant: str = "Q8_0") -> dict:
    """Rewrite an F16/F32 mmproj with its matrices in `quant` (Q8_0); returns {path, size, tensor_types}."""
    import gguf

    if quant not in MMPROJ_TYPES:
        raise TinyLlavaError(f"mmproj quant type {quant!r} is not supported; expected one of {', '.join(MMPROJ_TYPES)}")
    source, final = Path(src), Path(dst)
    try:
        reader = gguf.GGUFReader(str(source))
    except (ValueError, OSError) as exc:
        raise TinyLlavaError(f"{source} is not a readable GGUF file ({exc})") from None
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "clip":
        raise TinyLlavaError(f"{source.name} is not an mmproj (general.architecture is "
                             f"{arch.contents() if arch else None!r}; expected 'clip')")
    qtype = gguf.GGMLQuantizationType[quant]
    types: dict[str, str] = {}
    with atomic_file(final) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="clip", endianess=reader.endianess)
        try:
            for name, field in reader.fields.items():
                if name.startswith("GGUF.") or name == "general.architecture":
                    continue  # written by the writer itself
                value = _FILE_TYPE_Q8_0 if name == "general.file_type" else field.contents()
                sub = field.types[1] if len(field.types) > 1 else None
                writer.add_key_value(name, value, field.types[0], sub_type=sub)
            for tensor in reader.tensors:
                data = np.asarray(tensor.data)
                shape = tuple(int(d) for d in reversed(tensor.shape))  # numpy order (rows, cols)
                if tensor.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) \
                        and _quantizable(tensor.name, shape):
                    packed = gguf.quants.quantize(data.reshape(shape).astype(np.float32), qtype)
                    writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=qtype)
                    types[tensor.name] = quant
                else:
                    writer.add_tensor(tensor.name, data.reshape(shape), raw_dtype=tensor.tensor_type)
                    types[tensor.name] = tensor.tensor_type.name
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()  # flushes the file before atomic_file renames it; after an error, releases it
    return {"path": str(final), "quant": quant, "size": final.stat().st_size, "tensor_types": types}
