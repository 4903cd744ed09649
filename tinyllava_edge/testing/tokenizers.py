"""Miniature tokenizers of the same kind as each released TinyLLaVA LLM's tokenizer.

`build_tokenizer(kind, out_dir)` trains one in milliseconds on `CORPUS` and writes the files the
released model ships, so that `transformers.AutoTokenizer.from_pretrained(out_dir)` (5.x, offline)
builds the same tokenizer class with the same pre-tokenizer, normalizer, decoder and special-token
layout as the released one. Only the vocabulary is small and different.

What each kind reproduces (`get_kind(name)` returns the facts as data):

- `phi2` (microsoft/phi-2): CodeGenTokenizer, GPT-2 byte-level BPE (GPT-2 split regex through
  `ByteLevel(use_regex=True)`, no normalizer). `<|endoftext|>` is the last id of vocab.json and
  serves as bos, eos and unk; no pad. CodeGen's 38 whitespace-run tokens (31..2 spaces, then 9..2
  tabs; jaxformer `include_whitespace`/`include_tabs`) follow as non-special added tokens.
- `qwen2` (Qwen/Qwen2-0.5B): Qwen2Tokenizer, NFC normalizer, `Split(QWEN2_SPLIT_REGEX, Isolated)`
  then `ByteLevel(use_regex=False)`. `<|endoftext|>` (eos and pad, no bos, no unk),
  `<|im_start|>`, `<|im_end|>` are added tokens after vocab.json; ChatML chat template.
- `stablelm2` (stabilityai/stablelm-2-zephyr-1_6b): byte-level BPE converted from Arcade100k, a
  tiktoken vocabulary whose split regex is *Qwen's* (single digits), not cl100k's `\\p{N}{1,3}`:
  `pat_str` in tokenization_arcade100k.py, the released tokenizer.json's
  `Split(regex, Removed, invert=true)` quoted in llama.cpp PR 7349, and llama.cpp's llama-vocab.cpp
  giving STABLELM2 the QWEN2 regex all agree. No normalizer in tokenizer.json (Arcade100k's
  Python class applied NFC itself). The 32 Arcade100k special tokens follow vocab.json in their
  order, `<|im_start|>`/`<|im_end|>` included (ids +20, +21), because the zephyr tokenizer has
  them; its chat template is the zephyr `<|user|>` one, in plain text. tokenizer_config names
  GPT2Tokenizer, `<|endoftext|>` is bos, eos, unk and pad (Arcade100k set pad to it; the
  zephyr config's pad is inferred from that, not read).
  transformers 5 rebuilds a GPT2Tokenizer from vocab and merges with GPT-2's own regex, so the
  released pipeline only survives where the LLM's config (model_type `stablelm`) is known: then
  it loads `TokenizersBackend` from tokenizer.json. See `TokenizerKind.hf_loaded_class`.
- `tinyllama` (TinyLlama/TinyLlama-1.1B-Chat-v1.0, Llama 2's tokenizer): SentencePiece BPE
  `tokenizer.model` trained with Llama 2's trainer spec (identity normalisation, dummy prefix,
  no whitespace removal, split digits, byte fallback, whitespace-only pieces), `<unk>`=0, `<s>`=1,
  `</s>`=2, add_bos; LlamaTokenizer with legacy=false; tokenizer.json is transformers' own
  conversion of tokenizer.model. That conversion (Metaspace, prepend_scheme "first") adds no
  dummy prefix to text that already starts with a space, where sentencepiece adds one, and its
  decoder strips one leading space: such text loses one leading space in a round trip.
- `gemma` (google/gemma-2b; gemma-2b-it has the same tokenizer and the chat template used here):
  SentencePiece BPE without dummy prefix, `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, then
  user-defined `<mask>`, `<2mass>`, `[@BOS@]`, `<unused0..3>` (99 in the release),
  `<start_of_turn>`, `<end_of_turn>`; add_bos; GemmaTokenizer. The user-defined pieces are
  listed as added tokens so the converted tokenizer.json matches them whole, as sentencepiece does.

`vocab_size` counts the trained vocabulary (vocab.json, or the pieces of tokenizer.model) including
special tokens stored inside it; added tokens outside it (qwen2, stablelm2 specials, phi2's
whitespace runs) come on top, as in the releases, so `len(tokenizer)` may exceed it.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry

# -- split regexes (the GGUF writer needs them as `tokenizer.ggml.pre` names) ------------------

# GPT-2's, as the `tokenizers` ByteLevel pre-tokenizer applies it with use_regex=True
# (tokenizers src/pre_tokenizers/byte_level.rs; openai/gpt-2 src/encoder.py).
GPT2_SPLIT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Qwen2's (transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX): cl100k's pattern
# with single digits.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Arcade100k's `pat_str` is the same string (see the module docstring for the sources).
ARCADE100K_SPLIT_REGEX = QWEN2_SPLIT_REGEX

# Chat templates as the releases' tokenizer_config.json carry them.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ZEPHYR_CHAT_TEMPLATE = (  # TinyLlama-1.1B-Chat-v1.0 and stablelm-2-zephyr-1_6b
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


# -- the corpus --------------------------------------------------------------------------------

def _corpus() -> tuple[str, ...]:
    """English sentences, numbers, code, non-Latin scripts, emoji and whitespace runs (NFC)."""
    subjects = ("The small cat", "A red square", "Two blue circles", "The old man", "This image",
                "Every green triangle", "My friend", "The model", "Our team", "A yellow star")
    verbs = ("sits on", "is next to", "points at", "shows", "looks like", "is above", "moves toward",
             "describes", "contains", "is below")
    objects = ("the wooden table.", "a bright window!", "three white boxes?", "the picture, again.",
               "an orange ball;", "the quick brown fox.", "the lazy dog's house.", "two large trees:",
               "the question mark", "a black and white photo.")
    lines = [f"{s} {v} {o}" for i, s in enumerate(subjects) for j, v in enumerate(verbs)
             for k, o in enumerate(objects) if (i + 2 * j + 3 * k) % 7 == 0]
    lines += [f"Item {n}: {n * 37 % 1000} apples cost ${n * 1.25:.2f} on 2024-0{n % 9 + 1}-1{n % 10}."
              for n in range(1, 40)]
    lines += [
        "It's what they'd said: we'll see, you're right, I've won, she'll go, THEY'RE HERE, I'M OK.",
        "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e-5 0x1F 1,000,000 50% #7",
        "café naïve résumé coöperate Grüße aus Köln façade señor",
        "日本語のテキストと中文字符 한국어 русский текст Ελληνικά العربية हिन्दी",
        "emoji 😀 😂 👍🏽 🚀 ✨ ❤️ and symbols © ® ™ € £ ¥ → ≤ ≥ ∞",
        "def area(radius: float) -> float:\n    return 3.14159 * radius ** 2\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        "if x != None and y >= 10:\n        print(f\"{x!r} -> {y}\")  # comment\n",
        'config = {"name": "tiny", "layers": [1, 2, 3], "ok": true}',
        "    indented with four spaces\n\t\ttwo tabs\n  two spaces",
        "words    separated     by  runs   of spaces",
        "line one\nline two\n\nline four\r\nwindows line\n\n\n",
        "tabs\tbetween\t\tcolumns\t\t\tend",
        "trailing spaces   ",
        "<html><body class='main'>Hello, world!</body></html>",
        "SELECT name, COUNT(*) FROM users WHERE age > 21 GROUP BY name;",
        "USER: <image>\nWhat is in the picture? ASSISTANT: A cat on a mat.",
    ]
    return tuple(lines)


CORPUS: tuple[str, ...] = _corpus()

# Texts the tests round-trip: unicode, digits and every kind of whitespace run.
PROBE_TEXTS: tuple[str, ...] = (
    "Hello world",
    "café naïve 日本語 😀",
    "12345 and 3.14159",
    "It's I'M we'll",
    "    four spaces\ttab\t\ttwo tabs",
    "line\n\nbreaks\r\n end ",
    "def f(x):\n\treturn x  +  1\n",
    " leading space",
    "  two leading spaces",
    "a😀b👍🏽c ✨",
)


# -- the kinds ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerKind:
    """What a released tokenizer is, as data.

    hf_class: `tokenizer_class` in the released tokenizer_config.json (what transformers 5 loads
        from a directory whose config.json is not the LLM's own, e.g. a TinyLLaVA checkpoint).
    hf_model_type / hf_loaded_class: the LLM's config model_type and the class transformers 5
        loads when it sees that config (differs from hf_class for stablelm2 only).
    ggml_model / ggml_pre: `tokenizer.ggml.model` and `tokenizer.ggml.pre` for a GGUF writer
        (llama.cpp convert_hf_to_gguf.py: phi-2, qwen2 and stablelm2 are pre-tokenizer names it
        recognises by hash; SentencePiece vocabularies use "llama" and no pre-tokenizer).
    bos, eos, unk, pad: the released special tokens (None: not set).
    factory_pad_unk: what TinyLLaVA_Factory's `tokenizer_and_post_load` (tinyllava/model/llm/*.py)
        does after loading: "pad=unk" sets pad_token = unk_token (phi, tinyllama, gemma),
        "unk=pad" sets unk_token = pad_token (qwen2), "keep" leaves both (stablelm).
    split_regex: the pre-tokenizer's split regex for byte-level kinds, None for SentencePiece.
    """

    name: str
    source: str
    hf_class: str
    hf_model_type: str
    hf_loaded_class: str
    ggml_model: str
    ggml_pre: str
    bos: str | None
    eos: str
    unk: str | None
    pad: str | None
    add_bos: bool
    factory_pad_unk: str
    split_regex: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class _ByteLevelRecipe:
    """tokenizer.json components (as the released file spells them) and the special-token layout."""

    normalizer: Mapping[str, Any] | None
    pre_tokenizer: Mapping[str, Any]
    post_processor: Mapping[str, Any]
    decoder: Mapping[str, Any]
    in_vocab: tuple[str, ...]  # special tokens stored at the end of vocab.json (GPT-2 style)
    added_special: tuple[str, ...]  # special tokens after vocab.json
    added_plain: tuple[str, ...]  # non-special added tokens after those
    config: Mapping[str, Any]  # tokenizer_config.json keys besides special tokens


@dataclass(frozen=True)
class _SentencePieceRecipe:
    trainer: Mapping[str, Any]  # SentencePieceTrainer options on top of _LLAMA_TRAINER_SPEC
    special_ids: tuple[str, ...]  # pieces listed in added_tokens_decoder (all special)
    config: Mapping[str, Any]


@dataclass(frozen=True)
class _Entry:
    kind: TokenizerKind
    recipe: _ByteLevelRecipe | _SentencePieceRecipe


def _byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


def _split(regex: str, behavior: str, invert: bool) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": invert}


_BYTE_LEVEL_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
_SP_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_ALL_FILES = frozenset(_BYTE_LEVEL_FILES + _SP_FILES + ("special_tokens_map.json", "added_tokens.json"))

# Arcade100k's special tokens in id order from 100257 (tokenization_arcade100k.py).
_ARCADE100K_SPECIALS = (
    ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")
    + ("<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
       "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>",
       "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>")
    + ("<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>")
    + tuple(f"<|reg{i}|>" for i in range(8))
    + ("<|extra0|>",)
)

# Llama 2's trainer_spec (meta-llama/Llama-2-7b tokenizer.model, reused by TinyLlama); gemma's
# differs only where its recipe says (transformers convert_slow_tokenizer.py GemmaConverter quotes
# its split/whitespace/digit settings). One corpus-relative setting is scaled: Llama's
# character_coverage 0.99995 keeps every character of an 8k-character corpus, which would not fit
# 384 pieces; 0.99 leaves the rarest characters (CJK, emoji, rare symbols) to byte fallback, as
# the releases do with theirs.
_LLAMA_TRAINER_SPEC: Mapping[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.99,
    "split_by_unicode_script": True,
    "split_by_number": True,
    "split_by_whitespace": True,
    "treat_whitespace_as_suffix": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "byte_fallback": True,
    "max_sentencepiece_length": 16,
    "vocabulary_output_piece_score": True,
    "hard_vocab_limit": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "num_threads": 1,  # one thread: the same bytes on every run
    "minloglevel": 2,
}

_GEMMA_USER_DEFINED = ("<mask>", "<2mass>", "[@BOS@]", "<unused0>", "<unused1>", "<unused2>", "<unused3>",
                       "<start_of_turn>", "<end_of_turn>")

_KINDS: Registry[_Entry] = Registry("miniature tokenizer kind")

_KINDS.add("phi2", _Entry(
    TokenizerKind(
        name="phi2", source="microsoft/phi-2", hf_class="CodeGenTokenizer", hf_model_type="phi",
        hf_loaded_class="CodeGenTokenizer", ggml_model="gpt2", ggml_pre="phi-2",
        bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad=None, add_bos=False,
        factory_pad_unk="pad=unk", split_regex=GPT2_SPLIT_REGEX,
        files=_BYTE_LEVEL_FILES + ("special_tokens_map.json", "added_tokens.json"),
    ),
    _ByteLevelRecipe(
        normalizer=None,
        pre_tokenizer=_byte_level(False, True, True),
        post_processor=_byte_level(True, False, True),
        decoder=_byte_level(True, True, True),
        in_vocab=("<|endoftext|>",),
        added_special=(),
        added_plain=tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1)),
        config={"add_prefix_space": False, "clean_up_tokenization_spaces": True, "model_max_length": 2048,
                "tokenizer_class": "CodeGenTokenizer"},
    ),
))

_KINDS.add("qwen2", _Entry(
    TokenizerKind(
        name="qwen2", source="Qwen/Qwen2-0.5B", hf_class="Qwen2Tokenizer", hf_model_type="qwen2",
        hf_loaded_class="Qwen2Tokenizer", ggml_model="gpt2", ggml_pre="qwen2",
        bos=None, eos="<|endoftext|>", unk=None, pad="<|endoftext|>", add_bos=False,
        factory_pad_unk="unk=pad", split_regex=QWEN2_SPLIT_REGEX, files=_BYTE_LEVEL_FILES,
    ),
    _ByteLevelRecipe(
        normalizer={"type": "NFC"},
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            _split(QWEN2_SPLIT_REGEX, "Isolated", False), _byte_level(False, False, False)]},
        post_processor=_byte_level(False, False, False),
        decoder=_byte_level(False, False, False),
        in_vocab=(),
        added_special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added_plain=(),
        config={"add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
                "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer"},
    ),
))

_KINDS.add("stablelm2", _Entry(
    TokenizerKind(
        name="stablelm2", source="stabilityai/stablelm-2-zephyr-1_6b", hf_class="GPT2Tokenizer",
        hf_model_type="stablelm", hf_loaded_class="TokenizersBackend", ggml_model="gpt2",
        ggml_pre="stablelm2", bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>",
        pad="<|endoftext|>", add_bos=False, factory_pad_unk="keep", split_regex=ARCADE100K_SPLIT_REGEX,
        files=_BYTE_LEVEL_FILES + ("special_tokens_map.json",),
    ),
    _ByteLevelRecipe(
        normalizer=None,
        # Split with behaviour Removed and invert=true keeps exactly the regex matches (the
        # tiktoken conversion's spelling of Isolated for a regex that matches every character).
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            _split(ARCADE100K_SPLIT_REGEX, "Removed", True), _byte_level(False, True, False)]},
        post_processor=_byte_level(True, False, True),
        decoder=_byte_level(True, True, True),
        in_vocab=(),
        added_special=_ARCADE100K_SPECIALS,
        added_plain=(),
        config={"add_prefix_space": False, "chat_template": ZEPHYR_CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": True, "model_max_length": 4096,
                "tokenizer_class": "GPT2Tokenizer"},
    ),
))

_KINDS.add("tinyllama", _Entry(
    TokenizerKind(
        name="tinyllama", source="TinyLlama/TinyLlama-1.1B-Chat-v1.0", hf_class="LlamaTokenizer",
        hf_model_type="llama", hf_loaded_class="LlamaTokenizer", ggml_model="llama", ggml_pre="default",
        bos="<s>", eos="</s>", unk="<unk>", pad="</s>", add_bos=True, factory_pad_unk="pad=unk",
        split_regex=None, files=_SP_FILES,
    ),
    _SentencePieceRecipe(
        trainer={"add_dummy_prefix": True, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
                 "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>"},
        special_ids=("<unk>", "<s>", "</s>"),
        config={"add_bos_token": True, "add_eos_token": False, "chat_template": ZEPHYR_CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 2048,
                "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
                "use_default_system_prompt": False},
    ),
))

_KINDS.add("gemma", _Entry(
    TokenizerKind(
        name="gemma", source="google/gemma-2b", hf_class="GemmaTokenizer", hf_model_type="gemma",
        hf_loaded_class="GemmaTokenizer", ggml_model="llama", ggml_pre="default",
        bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", add_bos=True, factory_pad_unk="pad=unk",
        split_regex=None, files=_SP_FILES,
    ),
    _SentencePieceRecipe(
        trainer={"add_dummy_prefix": False, "pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3,
                 "pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>",
                 "user_defined_symbols": list(_GEMMA_USER_DEFINED)},
        special_ids=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        config={"add_bos_token": True, "add_eos_token": False,
                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
                "chat_template": GEMMA_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
                "legacy": None, "model_max_length": 1000000000000000019884624838656,
                "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
                "tokenizer_class": "GemmaTokenizer", "use_default_system_prompt": False},
    ),
))

TOKENIZER_KINDS: tuple[str, ...] = tuple(_KINDS)


def get_kind(name: str) -> TokenizerKind:
    """The facts about a kind; an unknown name raises TinyLlavaError listing the known ones."""
    return _KINDS.get(name).kind


def build_tokenizer(kind: str, out_dir: str | Path, vocab_size: int = 384) -> Path:
    """Train a miniature tokenizer of `kind` on `CORPUS` and write the released file set to `out_dir`.

    Deterministic: the same arguments give byte-identical files. The built-in corpus supports
    vocab_size from about 350 (SentencePiece kinds need their characters and 256 byte pieces)
    to about 890; outside that a TinyLlavaError says so. Tokenizer files of other kinds left in
    `out_dir` by an earlier build are removed; other files are left alone.
    """
    entry = _KINDS.get(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(entry.recipe, _ByteLevelRecipe):
        files = _byte_level_files(entry.kind, entry.recipe, vocab_size)
    else:
        files = _sentencepiece_files(entry.kind, entry.recipe, vocab_size)
    assert set(files) == set(entry.kind.files), (kind, sorted(files))
    for name in _ALL_FILES - set(files):
        (out / name).unlink(missing_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


# -- byte-level BPE ----------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (openai/gpt-2 src/encoder.py), in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _byte_level_files(kind: TokenizerKind, recipe: _ByteLevelRecipe, vocab_size: int) -> dict[str, bytes]:
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    alphabet = list(_bytes_to_unicode().values())
    n_trained = vocab_size - len(recipe.in_vocab)
    if n_trained <= len(alphabet):
        raise TinyLlavaError(
            f"vocab_size {vocab_size} is too small for a {kind.name} miniature: byte-level BPE needs more "
            f"than {len(alphabet) + len(recipe.in_vocab)} (256 bytes and {len(recipe.in_vocab)} special)"
        )
    # Train with the released normalizer and pre-tokenizer, then lay the vocabulary out as the
    # releases do: the 256 byte characters in GPT-2's order, each merge's result in merge order.
    tokenizer = Tokenizer.from_str(json.dumps(_tokenizer_json(recipe, {}, [], [])))
    trainer = trainers.BpeTrainer(vocab_size=n_trained, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if len(vocab) != n_trained:
        raise TinyLlavaError(
            f"vocab_size {vocab_size} is too large for a {kind.name} miniature: the built-in corpus "
            f"yields at most {len(vocab) + len(recipe.in_vocab)} tokens"
        )
    for token in recipe.in_vocab:
        vocab[token] = len(vocab)

    # Special tokens match the raw text; CodeGen's whitespace runs match the normalised text.
    added = [_added(vocab[t], t, special=True, normalized=False) for t in recipe.in_vocab]
    outside = {t: vocab_size + i for i, t in enumerate(recipe.added_special + recipe.added_plain)}
    added += [_added(outside[t], t, special=True, normalized=False) for t in recipe.added_special]
    added += [_added(outside[t], t, special=False, normalized=True) for t in recipe.added_plain]

    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
        "tokenizer.json": json.dumps(_tokenizer_json(recipe, vocab, merges, added), indent=2,
                                     ensure_ascii=False).encode(),
        "tokenizer_config.json": _json_file(_tokenizer_config(kind, recipe.config, added)),
    }
    if "special_tokens_map.json" in kind.files:
        files["special_tokens_map.json"] = _json_file(_special_tokens_map(kind, recipe.config))
    if "added_tokens.json" in kind.files:
        files["added_tokens.json"] = _json_file(outside)
    return files


def _tokenizer_json(recipe: _ByteLevelRecipe, vocab: dict[str, int], merges: list[tuple[str, ...]],
                    added: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": t["id"], "content": t["content"], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": t["normalized"], "special": t["special"]}
                         for t in added],
        "normalizer": recipe.normalizer,
        "pre_tokenizer": recipe.pre_tokenizer,
        "post_processor": recipe.post_processor,
        "decoder": recipe.decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [" ".join(m) for m in merges]},
    }


def _added(token_id: int, content: str, *, special: bool, normalized: bool) -> dict[str, Any]:
    return {"id": token_id, "content": content, "normalized": normalized, "special": special}


# -- SentencePiece -----------------------------------------------------------------------------

def _sentencepiece_files(kind: TokenizerKind, recipe: _SentencePieceRecipe, vocab_size: int) -> dict[str, bytes]:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                       vocab_size=vocab_size, **_LLAMA_TRAINER_SPEC, **recipe.trainer)
    except RuntimeError as err:  # sentencepiece reports a vocabulary the corpus cannot fill this way
        raise TinyLlavaError(f"cannot train a {kind.name} miniature with vocab_size {vocab_size}: {err}") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # User-defined pieces are matched whole by sentencepiece; listing them as (non-special) added
    # tokens makes the converted tokenizer.json match them whole too.
    user_defined = [p for p in recipe.trainer.get("user_defined_symbols", ()) if p not in recipe.special_ids]
    added = [_added(processor.piece_to_id(piece), piece, special=True, normalized=False)
             for piece in recipe.special_ids]
    added += [_added(processor.piece_to_id(piece), piece, special=False, normalized=False)
              for piece in user_defined]
    files = {
        "tokenizer.model": model.getvalue(),
        "tokenizer_config.json": _json_file(_tokenizer_config(kind, recipe.config, added)),
        "special_tokens_map.json": _json_file(_special_tokens_map(kind, recipe.config)),
    }
    # tokenizer.json is transformers' own conversion of tokenizer.model, made in a clean directory
    # so nothing already in out_dir (an older tokenizer.json, a config.json) takes part.
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        converted = AutoTokenizer.from_pretrained(tmp)
        if type(converted).__name__ != kind.hf_class:
            raise TinyLlavaError(f"transformers converted the {kind.name} miniature with "
                                 f"{type(converted).__name__}, expected {kind.hf_class}")
        files["tokenizer.json"] = converted.backend_tokenizer.to_str(pretty=True).encode()
    return files


# -- config files ------------------------------------------------------------------------------

def _tokenizer_config(kind: TokenizerKind, config: Mapping[str, Any], added: list[dict[str, Any]]) -> dict[str, Any]:
    decoder = {str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": t["normalized"],
                              "rstrip": False, "single_word": False, "special": t["special"]}
               for t in sorted(added, key=lambda t: t["id"])}
    return {**config, "added_tokens_decoder": decoder, "bos_token": kind.bos, "eos_token": kind.eos,
            "unk_token": kind.unk, "pad_token": kind.pad}


def _special_tokens_map(kind: TokenizerKind, config: Mapping[str, Any]) -> dict[str, Any]:
    names = {"bos_token": kind.bos, "eos_token": kind.eos, "unk_token": kind.unk, "pad_token": kind.pad}
    extra = {"additional_special_tokens": config["additional_special_tokens"]} \
        if "additional_special_tokens" in config else {}
    return {**extra, **{key: value for key, value in names.items() if value is not None}}


def _json_file(obj: Any) -> bytes:
    # transformers' save_pretrained layout: sorted keys, two-space indent, trailing newline.
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
