"""A chat-completions request body -> a checked :class:`ChatRequest`, or one ApiError sentence.

What is taken (OpenAI's Chat Completions names):

* ``messages``: ``system`` / ``developer`` messages first (their text replaces the template's
  system prompt), then ``user`` and ``assistant`` messages, ending with a ``user`` one. Content is
  a string or a list of parts: ``{"type": "text", "text": ...}`` and ``{"type": "image_url",
  "image_url": {"url": ...}}`` (or ``"image_url": "<url>"``, the bare form some clients send).
  One image per user turn, in any turn: the chat template places it before the turn's text, as
  ``VLM.chat()`` does. Consecutive messages of one role are one turn (texts joined by a newline).
* ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (0..2, default 1 as OpenAI's),
  ``top_p``, ``seed``, ``stop`` (a string or a list), ``stream``,
  ``stream_options.include_usage``; and vLLM's ``ignore_eos`` (decode ``max_tokens`` tokens
  whatever the model says: what benchmarks time).
* Refused with 400: what the server does not do (``n`` > 1, ``logprobs``, ``tools``, penalties,
  a JSON response format, audio...). Fields it does not know are ignored, as OpenAI does.

Image URLs are checked and their bytes taken here (apps/serve/images.py); the worker decodes them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from tinyllava_edge.apps.serve.errors import bad_request, unknown_model
from tinyllava_edge.apps.serve.images import ImagePolicy, RequestImage, load_request_image
from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.runtime.sampling import sampling_params

MAX_IMAGES = 8  # per request: each one costs a decode and a vision-encoder run on a worker
MAX_STOP = 16  # stop strings per request
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0..2
SYSTEM_ROLES = ("system", "developer")
# Fields of features the server does not have, and the value each may take that asks for nothing.
_UNSUPPORTED = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,),
}


@dataclass(frozen=True)
class Turn:
    question: str
    image: RequestImage | None
    answer: str | None  # None for the last question, the one to answer


@dataclass(frozen=True)
class ChatRequest:
    model: str
    turns: tuple[Turn, ...]
    system: str | None  # replaces the template's system prompt when given
    max_tokens: int | None  # None: as many as the context leaves, up to the server's default
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False

    @property
    def images(self) -> list[RequestImage]:
        return [t.image for t in self.turns if t.image is not None]

    @property
    def affinity(self) -> str:
        """Requests with the same key share a KV prefix (system prompt + first image, or the first
        question of a text-only chat): the pool sends them to the worker that holds it."""
        head = self.turns[0]
        digest = hashlib.blake2b(digest_size=16)
        digest.update((self.system or "").encode() + b"\0")
        first_image = next((t.image for t in self.turns if t.image is not None), None)
        digest.update(first_image.digest.encode() if first_image is not None else head.question.encode())
        return digest.hexdigest()


def parse_chat_request(body: Any, policy: ImagePolicy, served_model: str) -> ChatRequest:
    """Check the JSON body of POST /v1/chat/completions (image bytes taken last, the costly part);
    ApiError for the first problem: 404 for a model other than `served_model`, else 400 or 413."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must name the served model (GET /v1/models lists it)", "model")
    if model != served_model:
        raise unknown_model(model, served_model)
    _refuse_unsupported(body)
    max_tokens = _max_tokens(body)
    temperature = _number(body, "temperature", 1.0)
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise bad_request(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature!r}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    seed = body.get("seed")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    stream, ignore_eos = _flag(body, "stream"), _flag(body, "ignore_eos")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    for name, value in (("top_p", top_p), ("seed", seed), ("stop", stop)):
        try:  # the runtime's own checks and sentences, one field at a time so `param` is right
            sampling_params(1, temperature, **{name: value})
        except TinyLlavaError as err:
            raise bad_request(str(err), name) from None
    params = sampling_params(1, temperature, top_p, seed, stop)
    system, turns = _turns(body.get("messages"), policy)
    return ChatRequest(model, tuple(turns), system, max_tokens, params.temperature, params.top_p, params.seed,
                       params.stop, stream, include_usage, ignore_eos)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise bad_request(f"n must be 1: the server returns one choice per request, got {n!r}", "n")
    for name, harmless in _UNSUPPORTED.items():
        if name in body and not any(body[name] == h and type(body[name]) is type(h) for h in harmless):
            raise bad_request(f"{name!r} is not supported by this server", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_request("response_format must be {'type': 'text'}: the server does not constrain output to JSON",
                          "response_format", "unsupported_parameter")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad_request("modalities must be ['text']: the server answers with text only", "modalities",
                          "unsupported_parameter")


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins, as in OpenAI's API
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"{name} must be an integer of at least 1, got {value!r}", name)
        return value
    return None


def _turns(messages: Any, policy: ImagePolicy) -> tuple[str | None, list[Turn]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of chat messages", "messages")
    systems: list[str] = []
    # (role, texts, images) per run of messages of one role
    runs: list[tuple[str, list[str], list[RequestImage]]] = []
    images = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role in SYSTEM_ROLES:
            if runs:
                raise bad_request(f"{where} is a {role} message after the conversation began; put it first", where)
            text, found = _content(message.get("content"), f"{where}.content", policy, allow_images=False)
            systems.append(text)
            continue
        if role not in ("user", "assistant"):
            raise bad_request(f"{where} has role {role!r}; the server takes system, developer, user and assistant "
                              "messages", f"{where}.role")
        if role == "assistant" and message.get("tool_calls"):
            raise bad_request(f"{where} has tool_calls; this server does not use tools", f"{where}.tool_calls",
                              "unsupported_parameter")
        text, found = _content(message.get("content"), f"{where}.content", policy, allow_images=role == "user",
                               budget=MAX_IMAGES - images)
        images += len(found)
        if runs and runs[-1][0] == role:
            runs[-1][1].append(text)
            runs[-1][2].extend(found)
        else:
            runs.append((role, [text], list(found)))
        if len(runs[-1][2]) > 1:
            raise bad_request(f"{where} brings a second image into one user turn; the chat template places one "
                              "image per turn, so send each image with its own question", f"{where}.content")
    if not runs or runs[0][0] != "user":
        raise bad_request("the conversation must begin with a user message (after any system messages)", "messages")
    if runs[-1][0] != "user":
        raise bad_request("the last message must be from the user: the server answers the last question",
                          "messages")
    turns = []
    for k in range(0, len(runs), 2):
        _, texts, found = runs[k]
        question = "\n".join(t for t in texts if t)
        if not question.strip():
            raise bad_request("a user turn has no text; ask a question with the image", "messages")
        answer = "\n".join(runs[k + 1][1]) if k + 1 < len(runs) else None
        turns.append(Turn(question, found[0] if found else None, answer))
    return ("\n".join(systems) if systems else None), turns


def _content(content: Any, where: str, policy: ImagePolicy, *, allow_images: bool,
             budget: int = 0) -> tuple[str, list[RequestImage]]:
    """(text, images) of a message's content: a string or a list of text / image_url parts."""
    if isinstance(content, str):
        return _text(content, where), []
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", where)
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at} is a text part without a 'text' string", at)
            texts.append(_text(part["text"], at))
        elif kind == "image_url":
            if not allow_images:
                raise bad_request(f"{at} is an image; images go in user messages", at)
            if len(images) >= budget:
                raise bad_request(f"the request has more than {MAX_IMAGES} images", at)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append(load_request_image(url, policy, f"{at}.image_url"))
        else:
            raise bad_request(f"{at} has type {kind!r}; the server takes 'text' and 'image_url' parts", at)
    return "\n".join(texts), images


def _text(text: str, where: str) -> str:
    if DEFAULT_IMAGE_TOKEN in text:
        raise bad_request(f"{where} contains {DEFAULT_IMAGE_TOKEN!r}; send images as image_url parts and the server "
                          "places them", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate (\ud800) survives JSON parsing
        raise bad_request(f"{where} is not valid UTF-8 text (character {err.start})", where) from None
    return text

