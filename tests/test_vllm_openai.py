"""The OpenAI SDK against a served HF LLaVA export (scripts/test-vllm.sh starts vLLM for it).

Runs when TINYLLAVA_API_BASE_URL names a server (TINYLLAVA_API_MODEL the model, default the first
listed; TINYLLAVA_API_KEY sent when set); skips otherwise, as in the main suite. What it checks is
what an app moving from a laptop to a cluster relies on: the model is listed, an image goes in as
a data URL with the question, greedy answers repeat, a streamed answer equals the plain one, and
a follow-up question carries the conversation.
"""

import base64
import io
import os

import pytest

openai = pytest.importorskip("openai")
BASE_URL = os.environ.get("TINYLLAVA_API_BASE_URL")
pytestmark = pytest.mark.skipif(not BASE_URL, reason="TINYLLAVA_API_BASE_URL is not set (scripts/test-vllm.sh sets it)")


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("TINYLLAVA_API_KEY", "none"), max_retries=0,
                         timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return os.environ.get("TINYLLAVA_API_MODEL") or client.models.list().data[0].id


def _image_url() -> str:
    """The first picture of the shapes test split (48 px, as the default model was trained on)."""
    from tinyllava_edge.data.shapes import ShapesConfig, scenes

    image = next(scenes(ShapesConfig(image_size=48), "test", 1)).image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url()}},
                                         {"type": "text", "text": question}]}]


def test_the_model_is_listed(client, model):
    assert model in [m.id for m in client.models.list().data]


def test_an_image_question_is_answered_and_repeats_greedily(client, model):
    answers = []
    for _ in range(2):
        reply = client.chat.completions.create(model=model, messages=_messages("How many objects are there?"),
                                               temperature=0, max_tokens=8)
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
        # the image rows count as prompt tokens: more than the question's text alone
        assert reply.usage.prompt_tokens > 20 and 0 < reply.usage.completion_tokens <= 8
        answers.append(choice.message.content)
    assert answers[0] == answers[1]


def test_a_streamed_answer_equals_the_plain_one(client, model):
    messages = _messages("How many objects are there?")
    plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8, stream=True)
              if chunk.choices]
    assert "".join(pieces) == plain.choices[0].message.content


def test_a_follow_up_without_an_image(client, model):
    messages = _messages("How many objects are there?")
    first = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Is there a red circle in the image?"}]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    # the earlier turn and its image are part of the prompt
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
