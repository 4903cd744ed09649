"""Measure what stock llama.cpp (mtmd) computes from an mmproj against PyTorch `encode_images`.

`measure_mmproj` loads the mmproj through llama-cpp-python's mtmd bindings (which need a text
model GGUF of the same embedding width), encodes one image the way a llama.cpp user would
(`mtmd_tokenize` of the media marker, `mtmd_encode_chunk`, `mtmd_get_output_embd`), and compares
the rows with `model.encode_images` on the model's own preprocessing of the same image.

When the token counts differ by the one row the llava graph adds or drops (see
`export/mmproj.py`), the rows are aligned on the patches both sides hold: stock rows 1..N
against the model's N when stock has the extra first token, the model's rows 1..N against
stock's N when the model keeps a CLS token.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from tinyllava_edge.data.preprocess import ImageInput, PreprocessConfig, load_image, preprocess
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.export.onnx_vision import token_cosine

_LOG_LINES_KEPT = 40


@contextmanager
def _captured_llama_logs() -> Iterator[list[str]]:
    """Route llama.cpp and mtmd logs into a list while inside; restore llama-cpp-python's after.

    The ctypes callback lives in a local that outlives every native call made inside the
    block (a collected callback segfaults, docs/architecture.md).
    """
    import llama_cpp
    from llama_cpp import _logger, mtmd_cpp

    lines: list[str] = []

    def keep(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))
        del lines[:-_LOG_LINES_KEPT]

    callback = llama_cpp.llama_log_callback(keep)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        del callback


def _last_error(lines: list[str]) -> str:
    text = "".join(lines).strip().splitlines()
    return text[-1].strip() if text else "no log output"


def stock_image_embeddings(mmproj_path: str | os.PathLike, text_gguf_path: str | os.PathLike,
                           image: ImageInput, n_threads: int = 1) -> np.ndarray:
    """(N, hidden) float32: the rows stock mtmd hands the LLM for one image."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    for label, path in (("mmproj", mmproj_path), ("text model", text_gguf_path)):
        if not Path(path).is_file():
            raise TinyLlavaError(f"{label} file {path} does not exist")
    rgb = np.ascontiguousarray(np.asarray(load_image(image), dtype=np.uint8))  # (H, W, 3)
    with _captured_llama_logs() as logs:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(os.fsencode(text_gguf_path), params)
        if not model:
            raise TinyLlavaError(f"llama.cpp cannot load the text model {text_gguf_path} ({_last_error(logs)})")
        ctx = chunks = bitmap = None
        try:
            ctx_params = mtmd_cpp.mtmd_context_params_default()
            ctx_params.use_gpu = False
            ctx_params.print_timings = False
            ctx_params.warmup = False
            ctx_params.n_threads = n_threads
            ctx = mtmd_cpp.mtmd_init_from_file(os.fsencode(mmproj_path), model, ctx_params)
            if not ctx:
                raise TinyLlavaError(f"stock llama.cpp mtmd cannot load the mmproj {mmproj_path} ({_last_error(logs)})")
            height, width = rgb.shape[:2]
            pixels = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
            bitmap = mtmd_cpp.mtmd_bitmap_init(width, height, pixels)
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if status != 0:
                raise TinyLlavaError(f"mtmd_tokenize failed with status {status} ({_last_error(logs)})")
            image_chunks = [
                mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))
                if mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE
            ]
            if len(image_chunks) != 1:
                raise TinyLlavaError(f"mtmd made {len(image_chunks)} image chunks of one image; expected 1")
            if mtmd_cpp.mtmd_encode_chunk(ctx, image_chunks[0]) != 0:
                raise TinyLlavaError(f"mtmd_encode_chunk failed ({_last_error(logs)})")
            n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(image_chunks[0])
            n_embd = llama_cpp.llama_model_n_embd(model)
            out = mtmd_cpp.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
        finally:
            if chunks:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
            if bitmap:
                mtmd_cpp.mtmd_bitmap_free(bitmap)
            if ctx:
                mtmd_cpp.mtmd_free(ctx)
            llama_cpp.llama_model_free(model)


def measure_mmproj(mmproj_path: str | os.PathLike, text_gguf_path: str | os.PathLike, model,
                   image: ImageInput, torch_embeds: np.ndarray | None = None) -> dict:
    """Stock mtmd vs `model.encode_images` on one image: token counts, per-token cosine, max diff.

    Returns `n_tokens_stock`, `n_tokens_torch`, `aligned` (which rows were compared),
    `token_cosine` (per compared row), `min_cosine`, `mean_cosine`, `max_abs_diff`,
    `max_rel_diff` (relative to the largest torch value) and both embeddings (`stock_embeds`,
    `torch_embeds`, float32 arrays) for further checks. `torch_embeds` given: `model.encode_images`
    of `image` computed beforehand (then only `model.config` is read).
    """
    stock = stock_image_embeddings(mmproj_path, text_gguf_path, image)
    config = model.config
    pre = PreprocessConfig.for_tower(config.vision_config.model_type, config.vision_config.image_size,
                                     config.image_aspect_ratio)
    if torch_embeds is not None:
        reference = np.asarray(torch_embeds, dtype=np.float32)
    else:
        with torch.no_grad():
            reference = model.encode_images(torch.from_numpy(preprocess(image, pre)))[0].float().cpu().numpy()
    if stock.shape[1] != reference.shape[1]:
        raise TinyLlavaError(
            f"the mmproj gives {stock.shape[1]}-wide embeddings and the model {reference.shape[1]}-wide; "
            "they are not the same model"
        )
    n_stock, n_torch = len(stock), len(reference)
    if n_stock == n_torch:
        a, b, aligned = stock, reference, "all rows"
    elif n_stock == n_torch + 1:
        a, b, aligned = stock[1:], reference, "stock rows 1..N against torch rows 0..N-1"
    elif n_torch == n_stock + 1:
        a, b, aligned = stock, reference[1:], "stock rows 0..N-1 against torch rows 1..N"
    else:
        raise TinyLlavaError(f"stock mtmd gives {n_stock} image tokens and the model {n_torch}; no alignment fits")
    cosine = token_cosine(a, b)
    diff = np.abs(a.astype(np.float64) - b)
    return {
        "n_tokens_stock": n_stock,
        "n_tokens_torch": n_torch,
        "aligned": aligned,
        "token_cosine": cosine.tolist(),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / (np.abs(b).max() or 1.0)),
        "stock_embeds": stock,
        "torch_embeds": reference,
    }
