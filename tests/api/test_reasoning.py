"""<think>...</think> goes to reasoning_content, whatever the cuts between deltas."""

import pytest

from inference.reasoning import ReasoningSplitter

TEXT = "<think>\nThe user greets me.\n</think>\nHello there!"


def split(pieces, **kwargs):
    splitter = ReasoningSplitter(**kwargs)
    reasoning = content = ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, len(TEXT)])
def test_thinking_is_split_from_the_answer_at_any_cut(size):
    pieces = [TEXT[i : i + size] for i in range(0, len(TEXT), size)]
    assert split(pieces) == ("\nThe user greets me.\n", "Hello there!")


def test_text_without_thinking_is_all_content():
    assert split(["<thi", "s is not a tag> hi"]) == ("", "<this is not a tag> hi")


def test_a_template_that_opens_the_thought_starts_inside_it():
    assert split(["I should greet.</th", "ink>Hi!"], thinking=True) == ("I should greet.", "Hi!")


def test_an_unclosed_thought_stays_reasoning():
    assert split(["<think>still thinking"]) == ("still thinking", "")


async def _thinking_template(smollm2) -> dict:
    """SmolLM2 with a template that opens a thought, and a request whose 12 tokens all stay inside it."""
    from tests.conftest import HELLO, MODEL

    smollm2.chat_template_override = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n<think>\n"
    )
    await smollm2.asave()
    return {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 12, "ignore_eos": True,
            "logit_bias": {"28": -100}}  # fmt: skip


@pytest.mark.django_db(transaction=True)
async def test_a_template_that_opens_a_thought_puts_the_output_in_reasoning_content(async_client, smollm2):
    import json

    from tests.api.test_chat_completions import post, sse_events
    from tests.openapi import assert_schema

    body = await _thinking_template(smollm2)
    data = (await post(async_client, "/v1/chat/completions", body)).json()
    assert_schema("CreateChatCompletionResponse", data)
    message = data["choices"][0]["message"]
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    assert "</think>" not in message["reasoning_content"]
    # Every token went to the unclosed thought: all of them are reasoning tokens.
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == data["usage"]["completion_tokens"] == 12
    events = await sse_events(await post(async_client, "/v1/chat/completions", {**body, "stream": True}))
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1] if json.loads(e)["choices"]]
    streamed = "".join(d.get("reasoning_content", "") for d in deltas)
    assert streamed == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]


@pytest.mark.django_db(transaction=True)
async def test_reasoning_format_none_leaves_the_thought_in_the_content(async_client, smollm2):
    from core.generation import default_params_check
    from tests.api.test_chat_completions import post

    body = await _thinking_template(smollm2)
    raw = (await post(async_client, "/v1/chat/completions", {**body, "reasoning_format": "none"})).json()
    split = (await post(async_client, "/v1/chat/completions", body)).json()
    thought = split["choices"][0]["message"]["reasoning_content"]
    assert thought and split["usage"]["completion_tokens_details"]["reasoning_tokens"] == 12
    message = raw["choices"][0]["message"]
    assert message["content"] == thought and "reasoning_content" not in message
    assert raw["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    # Per model: the admin's default_params preset it like a sampling parameter; a request may still ask for "auto".
    default_params_check({"reasoning_format": "none"})
    smollm2.default_params = {"reasoning_format": "none"}
    await smollm2.asave()
    message = (await post(async_client, "/v1/chat/completions", body)).json()["choices"][0]["message"]
    assert message["content"] == thought and "reasoning_content" not in message
    auto = (await post(async_client, "/v1/chat/completions", {**body, "reasoning_format": "auto"})).json()
    assert auto["choices"][0]["message"]["reasoning_content"] == thought
