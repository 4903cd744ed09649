"""`tokenizer.json` that the tokenizers library of transformers 4.40 (TinyLLaVA_Factory's pin) reads.

tokenizers 0.20 and later save each BPE merge as a pair (`["Ġ", "a"]`); 0.19, which transformers
4.40 requires, reads only the older string form (`"Ġ a"`) and refuses the whole file. Every
version reads the string form, so files we write use it whenever it is unambiguous: no token of a
merge holds a space (byte-level BPE writes spaces as `Ġ`), or a string could not say where the
merge splits.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_legacy_merges(path: str | os.PathLike) -> bool:
    """Rewrite the BPE merges of a `tokenizer.json` in the string form, in place; True if rewritten."""
    path = Path(path)
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) and len(m) == 2 for m in merges):
        return False
    if any(" " in part for merge in merges for part in merge):
        return False
    model["merges"] = [" ".join(merge) for merge in merges]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.chmod(tmp, path.stat().st_mode & 0o777)  # keep the mode the file was written with
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True
