"""The tokenizer half of an LLM GGUF: vocabulary, token types, merges or scores, special ids.

Everything is read from the HF tokenizer object itself (its `tokenizer.json` pipeline through
``tokenizer.backend_tokenizer``), never from file names or paths: transformers 5's
``save_pretrained`` writes no ``tokenizer.model``, so checkpoints we train carry only
``tokenizer.json`` even for SentencePiece vocabularies.

Which llama.cpp tokenizer applies is decided by an exact match of the pipeline's
tokenization-relevant parts (normalizer, pre-tokenizer, model flags) against the tables below;
an unknown pipeline raises :class:`TinyLlavaError` naming it, never a guessed pre-tokenizer
(llama.cpp refuses a file whose ``tokenizer.ggml.pre`` it does not know, and a wrong but known
name silently splits text differently).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import gguf
from gguf import TokenType

from tinyllava_edge.errors import TinyLlavaError

# Split regexes as the released tokenizer.json files spell them.
# GPT-2's is built into the `tokenizers` ByteLevel pre-tokenizer (use_regex=true), so it has no
# spelling of its own here. Qwen2's: transformers models/qwen2/tokenization_qwen2.py
# PRETOKENIZE_REGEX; StableLM-2's Arcade100k `pat_str` is the same string.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _reduce(component: Mapping[str, Any] | None) -> Any:
    """The parts of a tokenizer.json normalizer / pre-tokenizer that change which tokens come out.

    Offsets-only options (ByteLevel `trim_offsets`) are dropped, so the same pipeline rebuilt by a
    different transformers version still matches; unknown component types keep every field.
    """
    if component is None:
        return None
    kind = component["type"]
    if kind == "Sequence":
        parts = component.get("pretokenizers", component.get("normalizers", []))
        return ("Sequence", tuple(_reduce(p) for p in parts))
    if kind == "ByteLevel":
        return ("ByteLevel", bool(component.get("add_prefix_space", False)), bool(component.get("use_regex", True)))
    if kind == "Split":
        return ("Split", *_pattern(component["pattern"]), component["behavior"], bool(component["invert"]))
    if kind == "Replace":
        return ("Replace", *_pattern(component["pattern"]), component["content"])
    if kind == "Prepend":
        return ("Prepend", component["prepend"])
    if kind == "Metaspace":
        return ("Metaspace", component["replacement"], component.get("prepend_scheme"), bool(component.get("split")))
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return (kind,)
    return (kind, json.dumps(component, sort_keys=True))


def _pattern(pattern: Mapping[str, str]) -> tuple[str, str]:
    ((kind, value),) = pattern.items()  # {"String": " "} or {"Regex": "..."}
    return kind, value


# (normalizer, pre-tokenizer) of byte-level BPE pipelines -> llama.cpp `tokenizer.ggml.pre`.
# llama.cpp's llama-vocab.cpp gives each name its split regexes; it applies no normalizer, so
# Qwen2's NFC is the caller's business (text already in NFC tokenizes the same).
BYTE_LEVEL_PRE: Mapping[tuple[Any, Any], str] = MappingProxyType({
    # GPT-2's regex inside ByteLevel: microsoft/phi-2 and our shapes tokenizer.
    (None, ("ByteLevel", False, True)): "gpt-2",
    # Qwen/Qwen2-*: NFC, then the Qwen2 regex (Isolated), then bytes.
    (("NFC",), ("Sequence", (("Split", "Regex", QWEN2_SPLIT_REGEX, "Isolated", False),
                             ("ByteLevel", False, False)))): "qwen2",
    # stabilityai/stablelm-2-*: Arcade100k converted from tiktoken, the same regex spelled as
    # Removed + invert (keeps exactly the matches).
    (None, ("Sequence", (("Split", "Regex", QWEN2_SPLIT_REGEX, "Removed", True),
                         ("ByteLevel", False, False)))): "stablelm2",
})
# Aliases llama.cpp treats exactly like the name above (llama-vocab.cpp maps both to
# LLAMA_VOCAB_PRE_TYPE_GPT2); convert_hf_to_gguf.py names microsoft/phi-2's vocabulary "phi-2".
FAMILY_PRE_ALIAS: Mapping[tuple[str, str], str] = MappingProxyType({("phi", "gpt-2"): "phi-2"})

# (normalizer, pre-tokenizer) of SentencePiece-BPE pipelines -> llama.cpp `add_space_prefix`.
SENTENCEPIECE_PREFIX: Mapping[tuple[Any, Any], bool] = MappingProxyType({
    # transformers 5's LlamaConverter (TinyLlama / Llama 2 tokenizer.model, legacy=False).
    (None, ("Metaspace", "▁", "first", False)): True,
    # tokenizers' earlier conversion, as the released TinyLlama tokenizer.json has it.
    (("Sequence", (("Prepend", "▁"), ("Replace", "String", " ", "▁"))), None): True,
    # GemmaConverter (google/gemma-*): spaces escaped, no dummy prefix.
    (("Replace", "String", " ", "▁"), ("Split", "String", " ", "MergedWithPrevious", False)): False,
})

_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")  # SentencePiece byte-fallback pieces


@dataclass(frozen=True)
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: tuple[str, ...]  # by id, padded to the embedding's rows
    types: tuple[int, ...]  # gguf.TokenType per token
    scores: tuple[float, ...] | None  # SentencePiece merge priorities (higher merges first)
    merges: tuple[str, ...] | None  # byte-level BPE merges "left right", by rank
    special_ids: Mapping[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None  # SentencePiece dummy prefix; None for byte-level

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        writer.add_token_types(list(self.types))
        if self.scores is not None:
            writer.add_token_scores(list(self.scores))
        if self.merges is not None:
            writer.add_token_merges(list(self.merges))
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for role, token_id in self.special_ids.items():
            adders[role](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def read_vocab(tokenizer: Any, n_vocab: int, family: str) -> GGUFVocab:
    """The GGUF vocabulary of an HF tokenizer for an embedding of `n_vocab` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TinyLlavaError(
            f"the {type(tokenizer).__name__} tokenizer has no tokenizer.json pipeline (backend_tokenizer); "
            "the GGUF writer reads the vocabulary from it"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise TinyLlavaError(f"the tokenizer's model is {model.get('type')!r}; the GGUF writer supports BPE only")
    signature = (_reduce(spec.get("normalizer")), _reduce(spec.get("pre_tokenizer")))
    texts = _id_texts(backend, n_vocab)
    added = {i: (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}
    merges = tuple(_merge_text(m) for m in model.get("merges", []))
    add_bos, add_eos = _added_specials(tokenizer)
    special = {role: i for role, i in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id))
               if i is not None}

    if model.get("byte_fallback"):
        if signature not in SENTENCEPIECE_PREFIX:
            raise TinyLlavaError(f"unknown SentencePiece tokenizer kind {_describe(signature)}; the GGUF writer "
                                 f"knows {len(SENTENCEPIECE_PREFIX)} (Llama/TinyLlama and Gemma conversions)")
        unk_id = backend.token_to_id(model["unk_token"]) if model.get("unk_token") else None
        types = [_sentencepiece_type(i, text, added, unk_id) for i, text in enumerate(texts)]
        return GGUFVocab("llama", "default", _padded(texts), tuple(types), _scores(texts, types, merges), None,
                         special, add_bos, add_eos, SENTENCEPIECE_PREFIX[signature])

    if signature not in BYTE_LEVEL_PRE or model.get("ignore_merges") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        known = ", ".join(sorted(set(BYTE_LEVEL_PRE.values())))
        raise TinyLlavaError(f"unknown BPE tokenizer kind {_describe(signature)}; the GGUF writer knows {known}")
    pre = BYTE_LEVEL_PRE[signature]
    pre = FAMILY_PRE_ALIAS.get((family, pre), pre)
    types = [_byte_level_type(i, text, added) for i, text in enumerate(texts)]
    return GGUFVocab("gpt2", pre, _padded(texts), tuple(types), None, merges, special, add_bos, add_eos, None)


def _id_texts(backend: Any, n_vocab: int) -> list[str | None]:
    """Token text by id (None for an id the tokenizer lacks), for ids below `n_vocab`."""
    size = backend.get_vocab_size(with_added_tokens=True)
    beyond = [i for i in range(n_vocab, size) if backend.id_to_token(i) is not None]
    if beyond:
        raise TinyLlavaError(
            f"the tokenizer has token ids up to {max(beyond)} but the LLM's embedding has only {n_vocab} rows"
        )
    texts = [backend.id_to_token(i) for i in range(n_vocab)]
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text is not None and seen.setdefault(text, i) != i:
            raise TinyLlavaError(f"the tokenizer spells ids {seen[text]} and {i} both {text!r}; llama.cpp "
                                 "refuses duplicate tokens")
    return texts


def _padded(texts: list[str | None]) -> tuple[str, ...]:
    # Rows past the tokenizer (vocabularies padded to a multiple, a spare <image> row) still need
    # a unique token each; convert_hf_to_gguf.py names them [PAD<id>].
    return tuple(f"[PAD{i}]" if text is None else text for i, text in enumerate(texts))


def _byte_level_type(i: int, text: str | None, added: Mapping[int, tuple[str, bool]]) -> int:
    if text is None:
        return TokenType.UNUSED
    if i in added:
        # llama.cpp matches CONTROL tokens in text only when asked to parse specials and
        # USER_DEFINED ones always, as transformers does with special / plain added tokens.
        return TokenType.CONTROL if added[i][1] else TokenType.USER_DEFINED
    return TokenType.NORMAL


def _sentencepiece_type(i: int, text: str | None, added: Mapping[int, tuple[str, bool]], unk_id: int | None) -> int:
    if text is None:
        return TokenType.UNUSED
    if i == unk_id:
        return TokenType.UNKNOWN
    if i in added:
        return TokenType.CONTROL if added[i][1] else TokenType.USER_DEFINED
    if _BYTE_PIECE.match(text):
        return TokenType.BYTE
    return TokenType.NORMAL


def _scores(texts: list[str | None], types: list[int], merges: tuple[str, ...]) -> tuple[float, ...]:
    """SentencePiece scores from the BPE merge ranks.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring token; transformers' BPE applies the lowest-ranked merge. Scoring each piece
    by minus the rank of the first merge that makes it gives both the same order (SentencePiece's
    own scores are minus the creation order, which the converted merges follow). Pieces no merge
    makes (single characters, bytes, specials) are never a merge result; they get 0 as in
    SentencePiece files, single characters below every merged piece.
    """
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        first_rank.setdefault(left + right, rank)
    scores = []
    for text, kind in zip(texts, types):
        if kind != TokenType.NORMAL:
            scores.append(0.0)
        elif text in first_rank:
            scores.append(-float(first_rank[text]))
        else:
            scores.append(-float(len(merges)))
    return tuple(scores)


def _merge_text(merge: str | list[str]) -> str:
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    if " " in left or " " in right:
        raise TinyLlavaError(f"BPE merge {left!r} + {right!r} contains a space, which GGUF merges cannot hold")
    return f"{left} {right}"


def _added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """(adds bos, adds eos), measured: what encoding adds around a plain text."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    start = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
    if start is None:
        raise TinyLlavaError("the tokenizer's special tokens change the text's own tokens; GGUF cannot express that")
    prefix, suffix = full[:start], full[start + len(plain):]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if prefix not in ([], [bos]) or suffix not in ([], [eos]):
        raise TinyLlavaError(
            f"the tokenizer adds {prefix} before and {suffix} after a text; GGUF can express only a bos before "
            "and an eos after"
        )
    return bool(prefix), bool(suffix)


def _describe(signature: tuple[Any, Any]) -> str:
    normalizer, pre = signature
    return f"(normalizer {normalizer!r}, pre-tokenizer {pre!r})"
