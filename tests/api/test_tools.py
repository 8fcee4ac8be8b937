"""Tool calling through /v1/chat/completions, against the OpenAPI spec: the generic format (SmolLM2's own template
knows no tools) and the Hermes format (SmolLM2 with a Hermes/Qwen-style template, which shares its ChatML tokens)."""

import json
from pathlib import Path

import pytest

from api.protocol import ChatCompletionRequest
from inference.engine.template import ChatTemplate
from inference.run import _template_messages, _tool_format
from inference.tools import offered_tools
from tests.api.test_chat_completions import post, sse_events
from tests.conftest import MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES = (Path(__file__).parent.parent / "templates" / "hermes.jinja").read_text()
CALLED = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]  # fmt: skip


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


async def test_a_pydantic_tool_with_a_nested_model_is_called_with_arguments_that_validate(async_client, smollm2):
    import openai
    from pydantic import BaseModel

    class Address(BaseModel):
        city: str
        zip: str | None = None

    class Ship(BaseModel):
        to: Address
        count: int

    tool = openai.pydantic_function_tool(Ship)  # its parameters have $defs and "#/$defs/Address" refs
    assert "$defs" in json.dumps(tool)
    data = (await post(async_client, "/v1/chat/completions", body(tools=[tool], tool_choice="required"))).json()
    calls = data["choices"][0]["message"]["tool_calls"]
    assert calls and all(Ship.model_validate_json(call["function"]["arguments"]) for call in calls)


async def test_a_required_call_cut_off_before_its_name_leaves_no_text(async_client, smollm2):
    data = (await post(async_client, "/v1/chat/completions", body(tool_choice="required", max_tokens=3))).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None  # was '{"tool_calls'


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
    response = await post(async_client, "/v1/chat/completions", body(messages=CALLED, tool_choice="auto"))
    assert response.status_code == 200
    assert_schema("CreateChatCompletionResponse", response.json())


ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"],
          "additionalProperties": False}  # fmt: skip


@pytest.mark.parametrize("template", ["generic", "hermes"])
async def test_tools_with_a_response_format_answer_with_a_call_or_json_that_follows_the_schema(
    async_client, smollm2, template
):
    import jsonschema

    if template == "hermes":
        smollm2.chat_template_override = HERMES
        await smollm2.asave()
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    for question in ("What is the weather in Paris?", "Say hello. Answer in JSON."):
        ask = [{"role": "user", "content": question}]
        data = (await post(async_client, "/v1/chat/completions",
                           body(messages=ask, tool_choice="auto", response_format=response_format))).json()  # fmt: skip
        assert_schema("CreateChatCompletionResponse", data)
        message = data["choices"][0]["message"]
        if message.get("tool_calls"):
            assert data["choices"][0]["finish_reason"] == "tool_calls"
            for call in message["tool_calls"]:
                assert call["function"]["name"] in {"get_weather", "get_time"}
        else:
            jsonschema.validate(json.loads(message["content"]), ANSWER)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
    ],
    ids=["tool_choice without tools", "unknown tool", "arguments that are not an object"],
)
async def test_inconsistent_tool_requests_are_400s_naming_the_parameter(async_client, smollm2, extra, param):
    response = await post(async_client, "/v1/chat/completions", {**body(), **extra})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.fixture
def hermes(smollm2):
    smollm2.chat_template_override = HERMES
    smollm2.save()
    return smollm2


def stream_chunks(events: list[str]) -> list[dict]:
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_schema("CreateChatCompletionStreamResponse", chunk)
    return chunks


async def test_hermes_required_calls_are_forced_into_tool_call_tags_and_parsed(async_client, hermes):
    import jsonschema

    data = (await post(async_client, "/v1/chat/completions", body(tool_choice="required"))).json()
    assert_schema("CreateChatCompletionResponse", data)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    for call in choice["message"]["tool_calls"]:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


async def test_hermes_streamed_calls_arrive_as_they_are_written_equal_to_the_non_streamed_ones(async_client, hermes):
    request = body(tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    plain = (await post(async_client, "/v1/chat/completions", request)).json()
    chunks = stream_chunks(
        await sse_events(await post(async_client, "/v1/chat/completions", {**request, "stream": True}))
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert all(set(d) == {"tool_calls"} for d in deltas)  # no stray content: <tool_call> itself is not text
    head, *rest = [d["tool_calls"][0] for d in deltas]
    assert head == {"index": 0, "id": head["id"], "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    assert head["id"].startswith("call_") and rest and all(d.keys() == {"index", "function"} for d in rest)
    assert len(rest) > 3  # the arguments stream token by token, not as one piece at the end
    (expected,) = plain["choices"][0]["message"]["tool_calls"]
    assert "".join(d["function"]["arguments"] for d in rest) == expected["function"]["arguments"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls", "logprobs": None} or (
        chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    )


async def test_hermes_auto_answers_in_words_stream_as_they_are_generated(async_client, hermes):
    request = body(tool_choice="auto", messages=[{"role": "user", "content": "Tell me a joke."}], max_tokens=30)
    plain = (await post(async_client, "/v1/chat/completions", request)).json()
    message = plain["choices"][0]["message"]
    assert message["content"] and "tool_calls" not in message  # the tiny model chats; the lazy grammar never woke
    chunks = stream_chunks(
        await sse_events(await post(async_client, "/v1/chat/completions", {**request, "stream": True}))
    )
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]
    pieces = [p for p in pieces if p]
    assert len(pieces) > 5  # token by token, not one block at the end
    assert "".join(pieces) == message["content"]


def test_earlier_calls_and_results_render_into_a_native_template_as_objects():
    request = ChatCompletionRequest.model_validate(body(messages=CALLED)).to_generation()
    prompt = ChatTemplate(HERMES).render(_template_messages(request, "hermes"), tools=offered_tools(request))
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in prompt
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in prompt
    assert "You can call these tools" not in prompt  # the generic instruction is only for templates without tools


def test_the_generic_format_describes_tools_in_the_system_message_and_replays_calls_as_json():
    request = ChatCompletionRequest.model_validate(body(messages=CALLED)).to_generation()
    system, _, assistant, tool = _template_messages(request, "generic")
    assert system["role"] == "system" and "You can call these tools" in system["content"]
    assert json.loads(assistant["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert tool == {"role": "tool", "content": "Sunny, 21 C", "tool_call_id": "call_1"}


def test_an_admin_set_tool_format_overrides_the_templates(smollm2):
    class Engine:
        chat_template = ChatTemplate(HERMES)

    assert _tool_format(smollm2, Engine) == "hermes"
    smollm2.tool_format = "mistral"
    assert _tool_format(smollm2, Engine) == "mistral"
