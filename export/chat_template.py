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


def jinja_chat_template(template: Template) -> str:
    """The Jinja text of `template` for `messages` with roles user / assistant (/ a leading system)."""
    image = jinja_literal(DEFAULT_IMAGE_TOKEN)
    stripped = f"(q | replace({image}, '') | trim)"
    return "".join((
        "{%- set first = 1 if (messages | length > 0 and messages[0]['role'] != 'user') else 0 -%}",
        "{%- for message in messages -%}",
        "{%- if loop.index0 >= first -%}",
        "{%- if (loop.index0 - first) % 2 == 0 -%}",
        f"{{%- if loop.index0 == first -%}}{{{{ {jinja_literal(template.system)} }}}}{{%- endif -%}}",
        "{%- set q = message['content'] -%}",
        f"{{%- if {image} in q -%}}{{%- set q = ({_slot(template.image_slot, stripped)}) | trim -%}}{{%- endif -%}}",
        f"{{{{ {_slot(template.user_slot, 'q')} }}}}",
        "{%- else -%}",
        f"{{{{ {_slot(template.assistant_slot, 'message[' + jinja_literal('content') + ']')} }}}}",
        "{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{ {jinja_literal(template.generation_prompt)} }}}}{{%- endif -%}}",
    ))
