"""The tensors of safetensors files, read one at a time when asked for.

    weights = LazyWeights([Path("ckpt/model.safetensors")])
    weights.shape("language_model.lm_head.weight")     # from the header, nothing read
    weights["language_model.lm_head.weight"]           # this tensor only, in the file's dtype

Only the headers are read up front (8 bytes of length, then JSON: dtype, shape and byte range of
every tensor). A tensor is read with `os.pread` into its own buffer, so holding it costs its bytes
and dropping it frees them. The files are deliberately not memory-mapped: pages of a mapping
stay counted in the process's resident memory after the tensor is gone, and an export that
streams a 6 GB checkpoint through would look (and on a device with little memory, be) 6 GB
bigger; the kernel's page cache still keeps recently read files for the next reader.
(docs/export-and-quantization.md, "Memory".)
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from tinyllava_edge.errors import CheckpointError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class LazyWeights(Mapping):
    """A read-only mapping name -> tensor over one or more safetensors files (shards)."""

    def __init__(self, files: Sequence[Path]):
        self._where: dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]] = {}
        for file in files:
            for name, entry in _read_header(file).items():
                self._where[name] = entry

    def __getitem__(self, name: str) -> torch.Tensor:
        path, start, end, dtype, shape = self._where[name]
        buffer = bytearray(end - start)
        fd = os.open(path, os.O_RDONLY)
        try:
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    raise CheckpointError(f"{path} is not a readable safetensors file (it ends inside tensor {name}: truncated)")
                done += got
        finally:
            os.close(fd)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][4]

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][3]

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of one tensor, or of all of them."""
        names = [name] if name is not None else list(self._where)
        return sum(self._where[n][2] - self._where[n][1] for n in names)


def _read_header(path: Path) -> dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            start, end = (base + int(v) for v in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a header entry this reader does not know "
                                  f"({info!r})") from None
        if end > size or end < start:
            raise CheckpointError(f"{path} is not a readable safetensors file (it ends inside tensor {name}: truncated)")
        entries[name] = (path, start, end, dtype, shape)
    return entries


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file at `path`, one tensor's bytes at a time.

    safetensors' own `save_file` first turns every tensor into a bytes object, a second full
    copy of the model in memory (6 GB more for a 3B bf16 checkpoint); here the header is computed
    from shapes and dtypes, then each tensor's memory is written as it is (contiguous CPU tensors
    are not copied). The layout is the format's: little-endian u64 header length, the JSON
    header padded with spaces to 8 bytes, then the data in header order without gaps.
    """
    names = {dtype: key for key, dtype in _DTYPES.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in names:
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
