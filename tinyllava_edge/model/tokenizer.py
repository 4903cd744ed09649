"""Loading a checkpoint's tokenizer the way its LLM family expects.

Two things differ from a plain `AutoTokenizer.from_pretrained(dir)`:

* transformers picks a tokenizer class from the directory's `config.json`, which for a
  TinyLLaVA checkpoint is the multimodal config. StableLM-2's files name `GPT2Tokenizer`, and
  without the StableLM config transformers 5 rebuilds them with GPT-2's split rule (Arcade100k
  splits digits one by one), so we pass the LLM's own config.
* TinyLLaVA_Factory's post-load (tinyllava/model/llm/*.py): pad := unk for phi, llama and gemma;
  unk := pad for qwen2. A pad token recorded in the checkpoint's config wins.

`save_tokenizer` writes one so that the Factory's pinned transformers 4.40 reads it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tinyllava_edge.errors import CheckpointError
from tinyllava_edge.model.checkpoint import LEGACY_FAMILIES, read_config_json
from tinyllava_edge.model.llm import family_for
from tinyllava_edge.tokenizer_json import write_for_4x_readers


def text_model_type(raw: dict[str, Any]) -> str | None:
    """The LLM's model_type from a config.json of any supported layout."""
    if raw.get("model_type") in LEGACY_FAMILIES:
        return LEGACY_FAMILIES[raw["model_type"]]
    text = raw.get("text_config")
    return text.get("model_type") if isinstance(text, dict) else None


def load_tokenizer(path: str | os.PathLike, model_type: str | None = None, pad_token: str | None = None):
    """The tokenizer saved in a checkpoint directory (or any tokenizer directory).

    `model_type` is the LLM family (read from `path/config.json` when not given); `pad_token`
    overrides the pad token (default: the checkpoint's recorded `pad_token`, else the family's
    Factory convention).
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    # transformers would take a missing folder for a hub repository id and look it up online
    if not path.is_dir():
        raise CheckpointError(f"tokenizer folder {path} {'is a file' if path.exists() else 'does not exist'}; "
                              "expected a checkpoint or tokenizer directory")
    if model_type is None and (path / "config.json").is_file():
        raw = read_config_json(path)
        model_type = text_model_type(raw)
        pad_token = pad_token or raw.get("pad_token")
    kwargs = {"config": AutoConfig.for_model(model_type)} if model_type else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} holds no loadable tokenizer ({str(exc).splitlines()[0]})") from None
    if pad_token:
        tokenizer.pad_token = pad_token
    elif model_type:
        family = family_for(model_type)
        if family.pad_from_unk and tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif family.unk_from_pad and tokenizer.pad_token is not None:
            tokenizer.unk_token = tokenizer.pad_token
    return tokenizer


def save_tokenizer(tokenizer, out: str | os.PathLike) -> None:
    """`save_pretrained`, in files that transformers 4.40 and its tokenizers 0.19 read too (tokenizer_json.py)."""
    tokenizer.save_pretrained(out)
    write_for_4x_readers(out)
