"""Tool calling (generic format, grammar-forced) through /v1/chat/completions, against the OpenAPI spec."""

import json

import pytest

from tests.api.test_chat_completions import post, sse_events
from tests.conftest import MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def body(**extra) -> dict:
    return {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 80, **extra}


async def test_required_tool_choice_always_returns_a_valid_call(async_client, smollm2):
    data = (await post(async_client, "/v1/chat/completions", body(tool_choice="required"))).json()
    assert_schema("CreateChatCompletionResponse", data)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert calls and all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert {c["function"]["name"] for c in calls} <= {"get_weather", "get_time"}
    for call in calls:
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


async def test_a_named_tool_choice_calls_that_tool_once_with_schema_valid_arguments(async_client, smollm2):
    import jsonschema

    choice = {"type": "function", "function": {"name": "get_weather"}}
    data = (
        await post(async_client, "/v1/chat/completions", body(tool_choice=choice, parallel_tool_calls=False))
    ).json()
    (call,) = data["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])


async def test_streamed_tool_calls_arrive_as_openai_deltas_equal_to_the_non_streamed_call(async_client, smollm2):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plain = (await post(async_client, "/v1/chat/completions", body(tool_choice=choice))).json()
    events = await sse_events(await post(async_client, "/v1/chat/completions", body(tool_choice=choice, stream=True)))
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_schema("CreateChatCompletionStreamResponse", chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    first, rest = deltas[0]["tool_calls"][0], [d["tool_calls"][0] for d in deltas[1:]]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    arguments = "".join(d["function"]["arguments"] for d in rest)
    assert json.loads(arguments) == json.loads(plain["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_auto_may_answer_in_words_and_none_offers_no_tools(async_client, smollm2):
    data = (await post(async_client, "/v1/chat/completions", body(tool_choice="auto"))).json()
    message = data["choices"][0]["message"]
    assert (message["content"] is None) != (message.get("tool_calls") is None)  # one or the other
    plain = (await post(async_client, "/v1/chat/completions", body(tool_choice="none"))).json()
    assert "tool_calls" not in plain["choices"][0]["message"] and plain["choices"][0]["message"]["content"]


async def test_a_tool_result_turn_renders_and_gets_an_answer(async_client, smollm2):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]  # fmt: skip
    response = await post(async_client, "/v1/chat/completions", body(messages=messages, tool_choice="auto"))
    assert response.status_code == 200
    assert_schema("CreateChatCompletionResponse", response.json())


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
    ids=["tool_choice without tools", "unknown tool", "tools with response_format"],
)
async def test_inconsistent_tool_requests_are_400s_naming_the_parameter(async_client, smollm2, extra, param):
    response = await post(async_client, "/v1/chat/completions", {**body(), **extra})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
