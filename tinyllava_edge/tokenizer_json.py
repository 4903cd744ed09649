"""Tokenizer files that transformers 4.40 (TinyLLaVA_Factory's pin, with tokenizers 0.19) reads too.

Two things transformers 5 writes that 4.40 refuses, each with a form both versions read:

* BPE merges: tokenizers 0.20 and later save each merge as a pair (`["Ġ", "a"]`); 0.19 reads only
  the string form (`"Ġ a"`) and refuses the whole `tokenizer.json`. The string form is written
  whenever it is unambiguous: no token of a merge holds a space (byte-level BPE writes spaces as
  `Ġ`), or a string could not say where the merge splits.
* `tokenizer_config.json`'s `tokenizer_class`: 5.x names its generic tokenizers-library class
  `TokenizersBackend`, unknown to 4.x; both know it as `PreTrainedTokenizerFast` (an alias in 5.x).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tinyllava_edge.atomic import write_text

# 5.x class name -> the name 4.x knows for the same class
_CLASS_NAMES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def write_for_4x_readers(directory: str | os.PathLike) -> None:
    """Rewrite a saved tokenizer's files in place so that transformers 4.40 reads them too."""
    directory = Path(directory)
    write_legacy_merges(directory / "tokenizer.json")
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") in _CLASS_NAMES:
            config["tokenizer_class"] = _CLASS_NAMES[config["tokenizer_class"]]
            _rewrite(config_path, config)


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
    _rewrite(path, data)
    return True


def _rewrite(path: Path, data: Any) -> None:
    """`data` as JSON at `path` through a temporary name (atomic.py)."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2))
