"""A tiny byte-level BPE tokenizer for the shapes dataset, so the model's embedding stays small.

Trained with the ``tokenizers`` library (GPT-2 style: ByteLevel pre-tokenizer with its regex,
ByteLevel decoder) on every question and answer the generator can produce, sampled captions and
the chat-template words. The 256-symbol byte alphabet is always in the vocabulary, so any text
round-trips, including text the generator never makes.

Special tokens sit where Llama-family models expect them: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``<pad>`` 3; ``<image>`` is 4. Encoding puts ``<s>`` in front, as Llama's tokenizers do: the
Factory's ``llama`` template counts that BOS when it masks the rounds of a multi-turn sample, and
the GGUF export writes ``add_bos``. ``</s>`` comes from the chat template.

The directory written loads offline with ``transformers.AutoTokenizer.from_pretrained(dir)``.
``tokenizers`` (and, to load, ``transformers``) come with the ``torch`` extra; both are imported
inside the functions so that importing this module stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
from tinyllava_edge.data.shapes import ANSWERS, all_questions, sample_captions
from tinyllava_edge.errors import DataError
from tinyllava_edge.tokenizer_json import write_legacy_merges

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, DEFAULT_IMAGE_TOKEN)  # ids 0..4
BYTE_ALPHABET_SIZE = 256
# 256 bytes + 5 specials + ~250 merges: enough for every word the generator uses to become one
# token (measured by tests/test_shapes_tokenizer.py), while the embedding stays 512 rows.
DEFAULT_VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 2048

# The TinyLLaVA_Factory "main" template (tinyllava/data/template/); see docs/architecture.md, facts.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _chat(question: str, answer: str) -> str:
    return f"{SYSTEM_PROMPT} USER: {question} ASSISTANT: {answer}"


def tokenizer_corpus(seed: int = 0, n_captions: int = 2000) -> list[str]:
    """The training text: generator text as it appears in records and in the chat template."""
    questions = all_questions()
    captions = sample_captions(n_captions, seed)
    corpus = [f"{DEFAULT_IMAGE_TOKEN}\n{q}" for q in questions]
    corpus += [_chat(DEFAULT_IMAGE_TOKEN, c) for c in captions]
    # Answers as they appear after "ASSISTANT:" (with a leading space) and on their own; the
    # repeats make every answer common enough to become a single token.
    corpus += [_chat(f"{DEFAULT_IMAGE_TOKEN}\n{q}", a) for q in questions[:100] for a in ANSWERS]
    corpus += list(ANSWERS) * 200
    return corpus


def check_vocab_size(vocab_size: int) -> None:
    """Raise :class:`DataError` unless the byte alphabet and the special tokens fit."""
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise DataError(
            f"shapes tokenizer vocab_size must be at least {minimum} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )


def train_shapes_tokenizer(
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Path:
    """Train the tokenizer and save it to ``out_dir`` (tokenizer.json + tokenizer_config.json).

    Returns ``out_dir``. Training is deterministic: the same arguments give the same files.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError as err:
        raise DataError(
            "training the shapes tokenizer needs the tokenizers package; "
            "install tinyllava-edge[torch]"
        ) from err
    check_vocab_size(vocab_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"tokenizer output {out} is a file; expected a directory")

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                      special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))]),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "extra_special_tokens": {"image_token": DEFAULT_IMAGE_TOKEN},
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out / "tokenizer.json"))
        write_legacy_merges(out / "tokenizer.json")  # TinyLLaVA_Factory's tokenizers 0.19 reads it too
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    except OSError as err:
        reason = err.strerror or err
        raise DataError(f"cannot write the shapes tokenizer to {out}: {reason}") from err
    return out
