"""Chat templates: prompt strings, image-placeholder tokenisation and training label masks.

Reproduces TinyLLaVA_Factory's ``tinyllava/data/template`` (``base.py`` and one file per
template) string for string and mask for mask, so that models trained here and there see the
same tokens. A template is data (a frozen :class:`Template`), looked up by exact name in
:data:`TEMPLATES`; behaviour that differs between Factory templates (how labels account for a
tokenizer-added bos) is one field, not a subclass.

Every Factory chat template renders, for questions ``q1..qn`` and answers ``a1..an``::

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT: {a2}{eos}...

and for generation (Factory's ``mode="eval"``, where the last answer is ``None``) the text ends
with ``ASSISTANT:`` (no trailing space). A question that contains ``<image>`` anywhere has every
``<image>`` removed and one put in front: ``"<image>\\n" + question.strip()``.

Nothing here imports torch or transformers: the edge runtime renders prompts without them. The
``tokenizer`` arguments only need what Factory uses: ``tokenizer(text)["input_ids"]``,
``encode``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``model_max_length`` and, for
the ``llama`` template, ``legacy``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import DataError, TinyLlavaError
from tinyllava_edge.registry import Registry

logger = logging.getLogger(__name__)

# Factory's system prompt, shared by all its chat templates (phi_template.py and siblings).
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

# How the label mask accounts for the tokens a tokenizer adds (Factory's `_make_masks` variants):
#   "plain"   base.py: no bos; the end-of-answer string is len(tokenizer.encode(eos)) tokens.
#   "bos"     gemma_template.py: one bos at position 0; every round is counted without its bos.
#   "llama"   llama_template.py: as "bos", and rounds after the first count one token less when
#             the tokenizer has `legacy == False` (SentencePiece's prefix space, see _round_lengths).
#   "caption" pretrain_template.py: mask bos + image placeholder, learn everything after it.
LABEL_STYLES = ("plain", "bos", "llama", "caption")

Message = Mapping[str, Any]  # LLaVA format: {"from": "human" | "gpt", "value": str | None}


@dataclass(frozen=True)
class Template:
    """One chat template. Slots hold ``{content}`` where Factory's formatters put ``{{content}}``."""

    name: str
    system: str  # text before the first question
    image_slot: str  # how a question with an image is written
    user_slot: str  # one user turn
    assistant_slot: str  # one assistant turn, ending with `eos`
    separator: str  # splits a round into instruction and answer (Factory `separator[0]`)
    eos: str  # ends every answer; rounds are split on it (Factory `separator[1]`)
    generation_prompt: str  # what ends a prompt for generation
    stop: tuple[str, ...]  # strings that end generation for runtimes
    label_style: str = "plain"

    def __post_init__(self) -> None:
        if self.label_style not in LABEL_STYLES:
            raise TinyLlavaError(
                f"template {self.name!r} has label_style {self.label_style!r}; "
                f"expected one of {', '.join(LABEL_STYLES)}"
            )
        object.__setattr__(self, "stop", tuple(self.stop))

    # ---- rendering -------------------------------------------------------------------------

    def render(self, messages: Sequence[Message]) -> str:
        """The training text of a whole conversation (every answer followed by ``eos``)."""
        questions, answers = split_turns(messages)
        if any(a is None for a in answers):
            raise DataError("a conversation to render for training has an answer that is None")
        return self._render(questions, answers)

    def render_prompt(self, question_or_messages: str | Sequence[Message]) -> str:
        """The text a model continues: earlier turns, then the last question and ``ASSISTANT:``.

        Takes a question string or LLaVA messages ending with a human turn (or with a gpt turn
        whose value is ``None``, as Factory's ``Message`` builds them). ``<image>`` is not added
        for you: pass ``"<image>\\n" + question`` when an image goes with it, as Factory's
        ``run_tiny_llava.py`` does.
        """
        questions, answers = split_turns(_as_generation_messages(question_or_messages))
        return self._render(questions, answers)

    def _render(self, questions: list[str], answers: list[str | None]) -> str:
        # Factory base.py `Template._prompt`.
        text = ""
        for i, (question, answer) in enumerate(zip(questions, answers)):
            if i == 0:
                text += self.system
            if DEFAULT_IMAGE_TOKEN in question:
                question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
                question = _fill(self.image_slot, question).strip()
            text += _fill(self.user_slot, question)
            text += self.generation_prompt if answer is None else _fill(self.assistant_slot, answer)
        return text

    # ---- tokenisation ----------------------------------------------------------------------

    def encode(self, messages: Sequence[Message], tokenizer: Any, mode: str = "train") -> dict:
        """Token ids (with ``IMAGE_TOKEN_INDEX`` for ``<image>``), labels and the prompt text.

        ``mode="train"``: every answer is given; ``labels`` masks everything but the answers and
        their ``eos`` with ``IGNORE_INDEX`` (Factory ``make_labels``). ``mode="eval"``: the last
        answer is missing or ``None``; the prompt ends with ``ASSISTANT:`` and ``labels`` is None.
        Returns ``dict(input_ids=list[int], labels=list[int] | None, prompt=str)``.
        """
        if mode == "train":
            prompt = self.render(messages)
            input_ids = tokenizer_image_token(prompt, tokenizer)
            labels = self.make_labels(input_ids, prompt, tokenizer)
            return {"input_ids": input_ids, "labels": labels, "prompt": prompt}
        if mode == "eval":
            prompt = self.render_prompt(messages)
            return {"input_ids": tokenizer_image_token(prompt, tokenizer), "labels": None, "prompt": prompt}
        raise TinyLlavaError(f"encode mode {mode!r} is not supported; expected 'train' or 'eval'")

    def make_labels(self, input_ids: Sequence[int], prompt: str, tokenizer: Any) -> list[int]:
        """Factory's ``make_labels``: ``input_ids`` with instructions masked by ``IGNORE_INDEX``.

        The mask is computed from token counts of each round tokenized on its own, not from the
        ids themselves. When those counts do not add up to the length of ``input_ids`` (Factory's
        "tokenization mismatch", e.g. an answer containing the separator or a tokenizer whose
        tokens merge across the round boundary), the whole sample is masked and a warning logged,
        as Factory does (Factory also prints the sample and sleeps 5 s; we only log). The check is
        skipped, as in Factory, once the counted length reaches ``tokenizer.model_max_length``.
        """
        labels = list(input_ids)
        if self.label_style == "caption":
            # pretrain_template.py: mask what "<image>" alone tokenizes to (bos if any, then -200).
            # Only the first turn's: in a multi-turn caption sample the later -200 stay in the
            # labels, as in Factory (its model gives image positions IGNORE_INDEX anyway).
            n = len(tokenizer_image_token(DEFAULT_IMAGE_TOKEN, tokenizer))
            _mask(labels, 0, n)
            return labels

        pad_id = tokenizer.pad_token_id
        # Factory counts the tokens that are not the pad id. Where pad == eos (phi-2, Qwen2 base)
        # the eos tokens of the answers were not counted, so it adds them back from the text.
        total_len = sum(1 for t in input_ids if t != pad_id) if pad_id is not None else len(input_ids)
        if pad_id is not None and pad_id == tokenizer.eos_token_id:
            total_len += prompt.count(self.eos)

        rounds = prompt.split(self.eos)
        if self.label_style == "plain":
            cur_len = 0
            eos_len = len(tokenizer.encode(self.eos))
        else:
            cur_len = 1  # the bos the tokenizer put in front of the whole prompt
            eos_len = 1
            _mask(labels, 0, 1)
        for i, rnd in enumerate(rounds):
            if rnd == "":
                break
            parts = rnd.split(self.separator)
            if len(parts) != 2:
                break
            round_len, instruction_len = self._round_lengths(i, rnd, parts[0] + self.separator, eos_len, tokenizer)
            _mask(labels, cur_len, cur_len + instruction_len)
            cur_len += round_len
        _mask(labels, cur_len, None)

        if cur_len < getattr(tokenizer, "model_max_length", float("inf")) and cur_len != total_len:
            logger.warning(
                "tokenization mismatch in template %r: the rounds count %d tokens, the sample has %d;"
                " the whole sample is masked (as TinyLLaVA_Factory does)",
                self.name, cur_len, total_len,
            )
            labels = [IGNORE_INDEX] * len(labels)
        return labels

    def _round_lengths(self, i: int, rnd: str, instruction: str, eos_len: int, tokenizer: Any) -> tuple[int, int]:
        """(tokens the round spans in the prompt, tokens of its instruction to mask).

        The instruction ends with the separator's trailing space, which BPE merges into the
        answer's first token in the full text, hence Factory's ``- 1``. Templates for tokenizers
        that add a bos count each round without it (``- 1`` once more); the round's ``eos`` is
        one token there.
        """
        round_len = len(tokenizer_image_token(rnd, tokenizer)) + eos_len
        instruction_len = len(tokenizer_image_token(instruction, tokenizer)) - 1
        if self.label_style == "plain":
            return round_len, instruction_len
        round_len -= 1
        instruction_len -= 1
        # llama_template.py: a non-legacy SentencePiece tokenizer prepends "▁" to a round
        # tokenized alone but not after "</s>" in the full prompt, so later rounds are one token
        # shorter in place. Factory also requires tokenizers >= 0.14, which transformers 5 does.
        # A tokenizer without `legacy` (Factory would raise) is taken as legacy: no adjustment.
        if self.label_style == "llama" and i != 0 and not getattr(tokenizer, "legacy", True):
            round_len -= 1
            instruction_len -= 1
        return round_len, instruction_len

    # ---- manifest ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Template":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(n for n in names - set(d) if n != "label_style")
        if unknown or missing:
            raise TinyLlavaError(
                f"a template record must have the keys {sorted(names)}; "
                f"unknown: {unknown or 'none'}, missing: {missing or 'none'}"
            )
        return cls(**dict(d))


def _fill(slot: str, content: str) -> str:
    # Factory's StringFormatter replaces the first placeholder only; a slot without one is
    # constant (EmptyFormatter).
    if not isinstance(content, str):
        raise DataError(f"a message value must be a string, got {type(content).__name__}: {content!r}")
    return slot.replace("{content}", content, 1)


def _mask(labels: list[int], start: int, stop: int | None) -> None:
    # Python slice semantics, which are torch's for `labels[a:b] = IGNORE_INDEX` in Factory.
    labels[start:stop] = [IGNORE_INDEX] * len(labels[start:stop])


def split_turns(messages: Sequence[Message]) -> tuple[list[str], list[str | None]]:
    """Questions and answers of LLaVA messages, as Factory's ``_get_list_from_message`` pairs them.

    A first message that is not from ``human`` is skipped; after that, messages alternate
    question, answer by position (their ``from`` is not checked again).
    """
    questions: list[str] = []
    answers: list[str | None] = []
    skip_first = bool(messages) and messages[0].get("from") != "human"
    for i, message in enumerate(messages):
        if i == 0 and skip_first:
            continue
        if "value" not in message:
            raise DataError(f"message {i} has no 'value': {dict(message)!r}")
        (questions if i % 2 == int(skip_first) else answers).append(message["value"])
    if len(questions) != len(answers):
        raise DataError(
            f"a conversation needs one answer per question; got {len(questions)} questions "
            f"and {len(answers)} answers"
        )
    return questions, answers


def _as_generation_messages(question_or_messages: str | Sequence[Message]) -> list[dict]:
    if isinstance(question_or_messages, str):
        return [{"from": "human", "value": question_or_messages}, {"from": "gpt", "value": None}]
    messages = [dict(m) for m in question_or_messages]
    if messages and messages[-1].get("from") == "human":
        messages.append({"from": "gpt", "value": None})
    if not messages or messages[-1].get("value") is not None:
        raise DataError("a generation prompt needs messages that end with a question")
    return messages


def tokenizer_image_token(prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Token ids of ``prompt`` with ``image_token_index`` in place of each ``<image>``.

    Factory's ``tokenizer_image_token``: the text is split at ``<image>`` and each chunk tokenized
    on its own. If the first chunk starts with the bos id, that bos is kept once and the first
    token of *every* chunk is dropped (it is each chunk's own bos; it is dropped whatever it is).
    A tokenizer that adds no bos keeps all chunk tokens. An empty first chunk of a bos tokenizer
    is just ``[bos]``, so ``"<image>..."`` gives ``[bos, -200, ...]``.
    """
    chunks = [list(tokenizer(chunk)["input_ids"]) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(chunk[offset:])
    return ids


# ---- the registry ------------------------------------------------------------------------------

TEMPLATES: Registry[Template] = Registry("chat template")


def _chat(name: str, eos: str, label_style: str) -> Template:
    return Template(
        name=name,
        system=SYSTEM_PROMPT + " ",
        image_slot=DEFAULT_IMAGE_TOKEN + "\n{content}",
        user_slot="USER: {content} ",
        assistant_slot="ASSISTANT: {content}" + eos,
        separator=" ASSISTANT: ",
        eos=eos,
        generation_prompt="ASSISTANT:",
        stop=(eos,),
        label_style=label_style,
    )


# The end-of-answer strings are Factory's (phi_template.py, llama_template.py, gemma_template.py,
# qwen2_base_template.py, qwen2_instruct_template.py); each is that family's EOS token.
TEMPLATES.add("phi", _chat("phi", "<|endoftext|>", "plain"))
TEMPLATES.add("llama", _chat("llama", "</s>", "llama"))
TEMPLATES.add("gemma", _chat("gemma", "<eos>", "bos"))
TEMPLATES.add("qwen2_base", _chat("qwen2_base", "<|endoftext|>", "plain"))
TEMPLATES.add("qwen2_instruct", _chat("qwen2_instruct", "<|im_end|>", "plain"))
# pretrain_template.py: "<image>" + caption + "\n"; the question is dropped and no EOS is appended.
# Factory's eval prompt for it is "<image>{{content}}\n:" (its formatter cutting the slot at ":");
# we give "<image>", which is what the captions were trained to follow. Captions end with "\n",
# so that is the stop string.
TEMPLATES.add(
    "pretrain",
    Template(
        name="pretrain",
        system="",
        image_slot="",
        user_slot=DEFAULT_IMAGE_TOKEN,
        assistant_slot="{content}\n",
        separator="",
        eos="",
        generation_prompt="",
        stop=("\n",),
        label_style="caption",
    ),
)


def get_template(name: str) -> Template:
    """The template registered under exactly ``name`` (raises TinyLlavaError listing the known ones)."""
    return TEMPLATES.get(name)


# Default chat template per LLM family (`text_config.model_type`), from Factory's scripts:
# train_phi.sh (phi), train_tinyllama.sh (TinyLlama -> llama), gemma/train_gemma.sh (gemma),
# qwen2/train_qwen2_base.sh (Qwen2-0.5B -> qwen2_base: the released TinyLLaVA-Qwen2-0.5B-SigLIP is
# that base model; Qwen2-0.5B-Instruct would use qwen2_instruct), train_stablelm.sh ("chat
# template for stablelm is the same as that for phi").
FAMILY_TEMPLATES: Mapping[str, str] = MappingProxyType(
    {
        "phi": "phi",
        "llama": "llama",
        "gemma": "gemma",
        "qwen2": "qwen2_base",
        "stablelm": "phi",
    }
)


def default_template_for_family(model_type: str) -> str:
    """The chat template name Factory's scripts use for an LLM ``model_type`` (exact match)."""
    try:
        return FAMILY_TEMPLATES[model_type]
    except KeyError:
        raise TinyLlavaError(
            f"no default chat template for LLM family {model_type!r}; known: {', '.join(sorted(FAMILY_TEMPLATES))}"
        ) from None
