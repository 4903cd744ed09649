"""Our chat templates as Jinja, for `tokenizer.chat_template` in a GGUF.

llama.cpp front ends (llama-cpp-python's ``Jinja2ChatFormatter``, llama-server) render the
template stored in the file. The Jinja built here renders exactly what
:class:`tinyllava_edge.data.template.Template` renders for the same conversation (checked by
tests/test_export_gguf.py), including Factory's quirks: a first message that is not the user's is
skipped, turns alternate by position, a question holding ``<image>`` anywhere becomes the image
slot (every ``<image>`` removed, the rest stripped), the system text goes before the first
question only, and a prompt for generation ends with the template's generation prompt.

All text is emitted from string literals inside ``{{ }}``, so the environment's
``trim_blocks`` / ``lstrip_blocks`` (both on in transformers and llama-cpp-python) cannot touch it.

Engines that take OpenAI-style messages (transformers' processors, vLLM) may pass a message's
content as a list of parts; with ``openai_messages`` the template turns such a list into the string
Factory's templates take (an ``<image>`` per image part, then the text parts joined by newlines)
and takes leading system messages as tinyllava-serve does.
``bos`` and ``after_image`` let a template reproduce, when the engine tokenizes the rendered text
in one piece, the ids Factory's chunk-wise tokenization gives (see export/hf_llava.py).
"""

from __future__ import annotations

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
from tinyllava_edge.data.template import Template

_PLACEHOLDER = "{content}"  # Template slots' placeholder (tinyllava_edge.data.template._fill)


def jinja_literal(text: str) -> str:
    """A single-quoted Jinja string literal holding exactly `text`."""
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'")
               .replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))
    return f"'{escaped}'"


def _slot(slot: str, content: str) -> str:
    """Jinja expression for `slot` filled with the expression `content` (first placeholder only)."""
    if _PLACEHOLDER not in slot:
        return jinja_literal(slot)  # a constant slot ignores its content, as `_fill` does
    before, after = slot.split(_PLACEHOLDER, 1)
    return f"{jinja_literal(before)} + {content} + {jinja_literal(after)}"


def jinja_chat_template(template: Template, *, openai_messages: bool = False, bos: str = "",
                        after_image: str = "") -> str:
    """The Jinja text of `template` for `messages` with roles user / assistant (/ a leading system).

    `openai_messages`: messages as OpenAI-style APIs send them, rendered as tinyllava-serve renders
    them: a content may be a list of parts (``{"type": "image"}`` or ``"image_url"``,
    ``{"type": "text", "text": ...}``), and leading ``system`` / ``developer`` messages replace the
    template's system prompt (their text joined by newlines, stripped, then the template's separator;
    nothing when empty) instead of being skipped as in the Factory. `bos`: text put before everything
    (the tokenizer's bos token, for engines that tokenize the rendered text without adding it).
    `after_image`: text put right after ``<image>`` in the template's image slot.
    """
    image = jinja_literal(DEFAULT_IMAGE_TOKEN)
    stripped = f"(q | replace({image}, '') | trim)"
    image_slot = template.image_slot.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN + after_image)
    system = f"{{{{ {jinja_literal(template.system)} }}}}"
    if openai_messages:
        separator = template.system[len(template.system.rstrip()):] or " "
        head = "".join((
            "{%- set head = namespace(n=0, texts=[]) -%}",
            "{%- for message in messages -%}",
            "{%- if loop.index0 == head.n and message['role'] in ['system', 'developer'] -%}",
            "{%- set c = message['content'] -%}", _flatten_parts("c"),
            "{%- set head.texts = head.texts + [c] -%}{%- set head.n = head.n + 1 -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- set first = head.n -%}",
        ))
        system = ("{%- if head.n > 0 -%}{%- set s = head.texts | join('\\n') | trim -%}"
                  f"{{{{ (s + {jinja_literal(separator)}) if s else '' }}}}{{%- else -%}}{system}{{%- endif -%}}")
        # refused as tinyllava-serve refuses them (raise_exception: transformers' and vLLM's renderers)
        checks = (
            "{%- for message in messages -%}"
            "{%- if message['role'] not in ['system', 'developer', 'user', 'assistant'] -%}"
            "{{ raise_exception('a message has role ' + message['role'] + '; the model takes system, developer, "
            "user and assistant messages') }}"
            "{%- elif loop.index0 >= first and message['role'] in ['system', 'developer'] -%}"
            "{{ raise_exception('a ' + message['role'] + ' message comes after the conversation began; put it "
            "first') }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )
        head += checks
        content = "{%- set q = message['content'] -%}" + _flatten_parts("q")
        answer_content = content + "{%- set a = q -%}"
        answer = "a"
    else:
        head = "{%- set first = 1 if (messages | length > 0 and messages[0]['role'] != 'user') else 0 -%}"
        content = "{%- set q = message['content'] -%}"
        answer_content, answer = "", "message['content']"
    return "".join((
        f"{{{{ {jinja_literal(bos)} }}}}" if bos else "",
        head,
        "{%- for message in messages -%}",
        "{%- if loop.index0 >= first -%}",
        "{%- if (loop.index0 - first) % 2 == 0 -%}",
        f"{{%- if loop.index0 == first -%}}{system}{{%- endif -%}}",
        content,
        f"{{%- if {image} in q -%}}{{%- set q = ({_slot(image_slot, stripped)}) | trim -%}}{{%- endif -%}}",
        f"{{{{ {_slot(template.user_slot, 'q')} }}}}",
        "{%- else -%}",
        answer_content,
        f"{{{{ {_slot(template.assistant_slot, answer)} }}}}",
        "{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{ {jinja_literal(template.generation_prompt)} }}}}{{%- endif -%}}",
    ))


def _flatten_parts(var: str) -> str:
    """Jinja that turns `var`, when it is a list of content parts, into one string (images first)."""
    image = jinja_literal(DEFAULT_IMAGE_TOKEN)
    return "".join((
        f"{{%- if {var} is not string -%}}",
        "{%- set parts = namespace(images='', texts=[]) -%}",
        f"{{%- for part in {var} -%}}",
        "{%- if part['type'] in ['image', 'image_url'] -%}",
        f"{{%- set parts.images = parts.images + {image} -%}}",
        "{%- elif part['type'] == 'text' -%}",
        "{%- set parts.texts = parts.texts + [part['text']] -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        # an image part goes first, on its own line, as Factory's "<image>\n" + question
        f"{{%- set {var} = parts.images + ('\\n' if parts.images else '') + (parts.texts | join('\\n')) -%}}",
        "{%- endif -%}",
    ))
