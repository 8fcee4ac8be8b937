"""/v1/messages and /v1/messages/count_tokens through the official `anthropic` client against a real `serve` with keys
required: Messages and their streams, tools and tool results, thinking, stop sequences, usage, and bad input in
Anthropic's error shape; raw SSE for the exact event order."""

import json

import anthropic
import httpx2 as httpx
import pytest

from inference.models import RequestLog
from tests.conftest import MODEL
from tests.test_faults import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
FORCED = {"type": "tool", "name": "get_weather"}
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n<think>\n"
)


GREEDY = {"temperature": 0}  # this SDK has no sampling arguments (newer Claude models take none); the API still does


def create(client, **kwargs):
    return client.messages.create(**{"model": MODEL, "max_tokens": 20, "messages": HELLO, "extra_body": GREEDY,
                                     **kwargs})  # fmt: skip


def test_it_answers_with_a_message(client):
    message = create(client)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL and message.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.stop_sequence is None
    usage = message.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 20
    assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens >= 0
    assert message._request_id.startswith("req_")


def test_a_streamed_message_adds_up_to_the_unstreamed_one(client):
    plain = create(client)
    with client.messages.stream(model=MODEL, max_tokens=20, messages=HELLO, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text == final.content[0].text
    assert final.id.startswith("msg_") and final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    total = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert total == plain.usage.input_tokens + plain.usage.cache_read_input_tokens


def test_the_prompt_cache_is_reported_as_cache_reads(client):
    ask = [{"role": "user", "content": "Tell me about the sea. " * 20}]
    first = create(client, messages=ask, max_tokens=4)
    again = create(client, messages=ask, max_tokens=4)
    assert again.usage.cache_read_input_tokens > 0
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total


def test_a_system_prompt_as_a_string_or_as_blocks_is_the_same_prompt(client):
    plain = create(client)
    as_string = create(client, system="You are a pirate. Say arr.")
    as_blocks = create(client, system=[{"type": "text", "text": "You are a pirate."},
                                       {"type": "text", "text": "Say arr."}])  # fmt: skip
    assert as_string.content[0].text != plain.content[0].text
    counted = client.messages.count_tokens(model=MODEL, messages=HELLO, system="You are a pirate.\n\nSay arr.")
    total = as_blocks.usage.input_tokens + as_blocks.usage.cache_read_input_tokens
    assert counted.input_tokens == total


def test_count_tokens_counts_the_prompt_a_generation_would_read_tools_included(client):
    counted = client.messages.count_tokens(model=MODEL, messages=HELLO)
    message = create(client, max_tokens=2)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    with_tools = client.messages.count_tokens(model=MODEL, messages=ASK, tools=[WEATHER])
    called = create(client, messages=ASK, tools=[WEATHER], max_tokens=2)
    assert with_tools.input_tokens == called.usage.input_tokens + called.usage.cache_read_input_tokens
    assert with_tools.input_tokens > client.messages.count_tokens(model=MODEL, messages=ASK).input_tokens


def test_max_tokens_ends_the_message_with_max_tokens(client):
    message = create(client, max_tokens=3, messages=[{"role": "user", "content": "Write a long story."}])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_max_tokens_zero_reads_the_prompt_into_the_cache_and_answers_nothing(client):
    ask = [{"role": "user", "content": "Tell me about the mountains. " * 20}]
    warmed = create(client, messages=ask, max_tokens=0)
    assert warmed.content == [] and warmed.stop_reason == "max_tokens" and warmed.usage.output_tokens == 0
    with client.messages.stream(model=MODEL, max_tokens=0, messages=ask) as stream:
        assert stream.get_final_message().content == []
    assert create(client, messages=ask, max_tokens=2).usage.cache_read_input_tokens > 0


def test_a_stop_sequence_ends_the_text_before_it_and_is_named(client):
    plain = create(client, max_tokens=30, messages=[{"role": "user", "content": "Write a long story."}])
    words = plain.content[0].text.split()
    stop = words[len(words) // 2]
    stopped = create(client, max_tokens=30, messages=[{"role": "user", "content": "Write a long story."}],
                     stop_sequences=[stop])  # fmt: skip
    before = plain.content[0].text[: plain.content[0].text.index(stop)]
    assert [block.text for block in stopped.content] == ([before] if before else [])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    story = [{"role": "user", "content": "Write a long story."}]
    with client.messages.stream(model=MODEL, max_tokens=30, stop_sequences=[stop], messages=story,
                                extra_body=GREEDY) as stream:  # fmt: skip
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_sampling_and_metadata_are_taken(client):
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 20}
    message = create(client, extra_body=sampling, metadata={"user_id": "someone"}, output_config={"effort": "low"},
                     extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})  # fmt: skip
    assert message.content and message.stop_reason


def test_output_config_format_holds_the_answer_to_its_json_schema(client):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    ask = [{"role": "user", "content": "Name a city in France."}]
    message = create(client, max_tokens=40, messages=ask, extra_body=GREEDY,
                     output_config={"format": {"type": "json_schema", "schema": schema}})  # fmt: skip
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), schema)
    with pytest.raises(anthropic.BadRequestError) as refused:  # a keyword a grammar cannot hold
        create(
            client,
            max_tokens=40,
            messages=ask,
            output_config={"format": {"type": "json_schema", "schema": {"type": "integer", "multipleOf": 3}}},
        )
    assert "multipleOf" in str(refused.value)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_and_its_result_make_a_two_step_loop(client, stream):
    if stream:
        with client.messages.stream(model=MODEL, max_tokens=60, messages=ASK, tools=[WEATHER], tool_choice=FORCED,
                                    extra_body=GREEDY) as events:  # fmt: skip
            first = events.get_final_message()
    else:
        first = create(client, max_tokens=60, messages=ASK, tools=[WEATHER], tool_choice=FORCED)
    assert first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.id.startswith("toolu_") and call.name == "get_weather"
    assert isinstance(call.input, dict) and isinstance(call.input["city"], str)
    history = [*ASK, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "Sunny, 21 C"}]}]  # fmt: skip
    answer = {"max_tokens": 30, "messages": history, "tools": [WEATHER], "tool_choice": {"type": "none"}}
    if stream:
        with client.messages.stream(model=MODEL, extra_body=GREEDY, **answer) as events:
            second = events.get_final_message()
    else:
        second = create(client, **answer)
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in second.content] == ["text"] and second.content[0].text


def test_tool_results_as_blocks_or_errors_and_any_with_one_call_are_taken(client):
    history = [*ASK, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "The weather service is down."}]},
            {"type": "text", "text": "Try again."}]}]  # fmt: skip
    message = create(client, max_tokens=60, messages=history, tools=[WEATHER],
                     tool_choice={"type": "any", "disable_parallel_tool_use": True})  # fmt: skip
    calls = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(calls) == 1 and calls[0].name == "get_weather"


def test_thinking_comes_as_a_signed_block_first_and_can_be_sent_back(client, smollm2):
    smollm2.chat_template_override = THINKING_TEMPLATE  # opens a thought, as a thinking model's template does
    smollm2.save()
    message = create(client, max_tokens=12)
    assert [block.type for block in message.content] == ["thinking"]
    assert message.content[0].thinking and "</think>" not in message.content[0].thinking
    assert message.content[0].signature
    with client.messages.stream(model=MODEL, max_tokens=12, messages=HELLO, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == message.content[0].thinking and final.content[0].signature
    history = [*HELLO, {"role": "assistant", "content": [*message.content, {"type": "text", "text": "Hello!"}]},
               {"role": "user", "content": "Again."}]  # fmt: skip
    assert create(client, max_tokens=4, messages=history, thinking={"type": "disabled"}).content


def test_thinking_with_a_budget_is_taken(client):
    # The core cannot stop a thought at a budget: it picks the template's reasoning_effort (README).
    message = create(client, max_tokens=1025, thinking={"type": "enabled", "budget_tokens": 1024})
    assert message.content and message.stop_reason == "end_turn"


def test_a_request_shaped_like_claude_codes_is_taken(client):
    # What Claude Code 2.1 sends beyond the basics: a system message inside messages (a beta), tool schemas with
    # propertyNames, a maxLength of 524288 and an untyped property, adaptive thinking, output_config's effort,
    # context_management, cache_control marks, a JSON user id, and ?beta=true.
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"command": {"type": "string", "maxLength": 524288},
                             "env": {"type": "object", "propertyNames": {"type": "string"},
                                     "additionalProperties": {"type": "string"}},
                             "args": {"description": "Any JSON value."}},
              "required": ["command"], "additionalProperties": False}  # fmt: skip
    bash = {"name": "Bash", "description": "Run a command", "input_schema": schema}
    ephemeral = {"type": "ephemeral"}
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>Today is a day.</system-reminder>"},
        {"type": "text", "text": "Run: echo hi", "cache_control": ephemeral}]},
        {"role": "system", "content": "Agents available: none."}]  # fmt: skip
    extra = {"temperature": 0, "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}
    system = [{"type": "text", "text": "You are a CLI.", "cache_control": ephemeral}]
    user_id = json.dumps({"device_id": "d" * 64, "session_id": "s"})
    with client.messages.stream(model=MODEL, max_tokens=32000, messages=messages, tools=[bash], system=system,
                                tool_choice={"type": "any"}, thinking={"type": "adaptive"},
                                output_config={"effort": "high"}, metadata={"user_id": user_id}, extra_body=extra,
                                extra_query={"beta": "true"}) as stream:  # fmt: skip
        final = stream.get_final_message()
    call = final.content[-1]
    assert final.stop_reason == "tool_use" and call.name == "Bash" and isinstance(call.input["command"], str)
    strict = {**bash, "strict": True, "input_schema": {**schema, "properties": {"env": schema["properties"]["env"]}}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client, messages=messages, tools=[strict])
    assert_error(caught, 400, "invalid_request_error", "propertyNames")


def test_keys_go_as_x_api_key_or_as_a_bearer_token_and_a_bad_one_is_a_401(anthropic_server, api_key):
    base_url = f"http://127.0.0.1:{anthropic_server.port}"
    with anthropic.Anthropic(base_url=base_url, auth_token=api_key, api_key=None, max_retries=0) as bearer:
        assert create(bearer, max_tokens=2).content is not None
    for bad in (
        anthropic.Anthropic(base_url=base_url, api_key="sk-mnrv-wrong", max_retries=0),
        anthropic.Anthropic(base_url=base_url, auth_token="sk-mnrv-wrong", api_key=None, max_retries=0),
    ):
        with bad, pytest.raises(anthropic.AuthenticationError) as caught:
            create(bad, max_tokens=2)
        assert caught.value.status_code == 401
        assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "authentication_error"
        assert caught.value.body["request_id"].startswith("req_")


# -- bad input: Anthropic's {"type": "error", "error": {"type", "message"}, "request_id"} with its status


def raw_post(client, body: dict):
    return client.post("/v1/messages", cast_to=httpx.Response, body=body)


def assert_error(caught, status: int, kind: str, words: str):
    error = caught.value
    assert error.status_code == status, error.body
    assert error.body["type"] == "error" and error.body["error"]["type"] == kind
    assert words in error.body["error"]["message"], error.body
    assert error.body["request_id"] == error.response.headers["request-id"]


def test_max_tokens_is_required_as_anthropic_requires_it(client):
    with pytest.raises(anthropic.BadRequestError) as caught:
        raw_post(client, {"model": MODEL, "messages": HELLO})
    assert_error(caught, 400, "invalid_request_error", "max_tokens")


@pytest.mark.parametrize(
    ("fields", "words"),
    [({"temperature": "hot"}, "temperature"), ({"temperature": 1.5}, "temperature"),
     ({"max_tokens": "20"}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"), ({"messages": []}, "messages"),
     ({"stop_sequences": [""]}, "stop_sequences"), ({"stop_sequences": ["x"] * 17}, "stop_sequences"),
     ({"system": [{"type": "image"}]}, "system"), ({"metadata": {"user_id": "u" * 300}}, "metadata.user_id"),
     ({"messages": [{"role": "tool", "content": "hi"}]}, "role"), ({"top_k": -1}, "top_k"),
     ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
     ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "budget_tokens"),
     ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "less than max_tokens"),
     ({"tool_choice": FORCED}, "tool_choice"),
     ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}}, "other"),
     ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
     ({"tools": [{"name": "t", "strict": True, "input_schema": {"type": "object", "not": {}}}]}, "not"),
     ({"messages": [{"role": "system", "content": [{"type": "image"}]}]}, "image"),
     ({"tools": [{"name": "t", "input_schema": {"type": "string", "pattern": "(a?){0,100000}" * 40}}]}, "tools"),
     ({"tools": [{"name": f"t{i}", "input_schema": {"type": "object", "properties": {"x": {"enum": list(range(600))}}}}
                 for i in range(2)]}, "all tools together"),
     ({"tools": [{**WEATHER, "name": "has space"}]}, "tools[0].name"),
     ({"tools": [{"name": "t", "input_schema": {"type": "string"}}]}, "type object")],
)  # fmt: skip
def test_bad_input_is_a_400_invalid_request_error_naming_the_field(client, fields, words):
    with pytest.raises(anthropic.BadRequestError) as caught:
        raw_post(client, {"model": MODEL, "max_tokens": 20, "messages": HELLO, **fields})
    assert_error(caught, 400, "invalid_request_error", words)


def test_images_and_documents_are_a_clear_400_while_no_multimodal_model_is_loaded(client):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A memo."}}
    for block, words in ((image, "images"), (document, "documents")):
        with pytest.raises(anthropic.BadRequestError) as caught:
            create(client, messages=[{"role": "user", "content": [block, {"type": "text", "text": "What is it?"}]}])
        assert_error(caught, 400, "invalid_request_error", f"does not support {words}")
    history = [*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [image]}]}]  # fmt: skip
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client, messages=history, tools=[WEATHER])
    assert_error(caught, 400, "invalid_request_error", "images or documents in tool results")


def test_an_unknown_model_is_a_404_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        create(client, model="claude-made-up-model")
    assert_error(caught, 404, "not_found_error", "claude-made-up-model")
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.count_tokens(model="claude-made-up-model", messages=HELLO)
    assert_error(caught, 404, "not_found_error", "claude-made-up-model")


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_a_400_naming_the_sizes(client, stream):
    long = [{"role": "user", "content": "hello " * 9000}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=20, messages=long) as events:
                events.get_final_message()
        else:
            create(client, messages=long)
    assert_error(caught, 400, "invalid_request_error", "maximum context length is 8192 tokens")


def test_each_request_is_logged_once_with_its_tokens(client):
    message = create(client, max_tokens=5)
    counted = client.messages.count_tokens(model=MODEL, messages=HELLO)
    with pytest.raises(anthropic.BadRequestError) as caught:
        raw_post(client, {"model": MODEL, "messages": HELLO})
    for request_id, status in ((message._request_id, 200), (counted._request_id, 200),
                               (caught.value.body["request_id"], 400)):  # fmt: skip
        request_id = request_id.removeprefix("req_")
        # The worker publishes the answer before it writes the row: wait for the row.
        wait_for(lambda r=request_id: RequestLog.objects.exclude(status__in=("queued", "running"))
                 .filter(request_id=r).exists(), 30, "the request's row was not finished")  # fmt: skip
        rows = list(RequestLog.objects.filter(request_id=request_id))
        assert len(rows) == 1 and rows[0].status_code == status and rows[0].endpoint.startswith("/v1/messages")
    row = RequestLog.objects.get(request_id=message._request_id.removeprefix("req_"))
    assert row.prompt_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert row.completion_tokens == message.usage.output_tokens and row.api_key_prefix


# -- the stream's exact framing


def sse(response) -> list[tuple[str, dict]]:
    """The events of a raw SSE body: (event line, data JSON), checking that each names its own type."""
    events = []
    for frame in response.text.split("\n\n"):
        if not frame:
            continue
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, data = lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


def stream_raw(server, api_key: str, body: dict):
    headers = {"x-api-key": api_key, "anthropic-version": "2023-06-01", "Host": "127.0.0.1"}
    url = f"http://127.0.0.1:{server.port}/v1/messages"
    response = httpx.post(url, json={"model": MODEL, "stream": True, "temperature": 0, **body}, headers=headers,
                          timeout=120)  # fmt: skip
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return sse(response)


def test_a_raw_stream_follows_anthropics_event_order(anthropic_server, api_key):
    events = [(name, data) for name, data in stream_raw(anthropic_server, api_key, {"max_tokens": 20,
                                                                                    "messages": HELLO})
              if name != "ping"]  # fmt: skip
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    assert set(names[2:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] > 0
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(data["index"] == 0 and data["delta"]["type"] == "text_delta" for _, data in events[2:-3])
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["usage"]["output_tokens"] > 0


def test_a_raw_streamed_tool_call_is_a_tool_use_block_with_its_input_as_json_deltas(anthropic_server, api_key):
    body = {"max_tokens": 60, "messages": ASK, "tools": [WEATHER], "tool_choice": FORCED}
    events = [(name, data) for name, data in stream_raw(anthropic_server, api_key, body) if name != "ping"]
    starts = [data for name, data in events if name == "content_block_start"]
    tool = starts[-1]["content_block"]
    assert tool["type"] == "tool_use" and tool["id"].startswith("toolu_") and tool["input"] == {}
    index = starts[-1]["index"]
    pieces = [data["delta"]["partial_json"] for name, data in events
              if name == "content_block_delta" and data["index"] == index]  # fmt: skip
    assert pieces and isinstance(json.loads("".join(pieces))["city"], str)
    names = [name for name, _ in events]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_raw_streamed_thought_is_signed_before_its_block_stops(anthropic_server, api_key, smollm2):
    smollm2.chat_template_override = THINKING_TEMPLATE
    smollm2.save()
    events = [(name, data) for name, data in stream_raw(anthropic_server, api_key, {"max_tokens": 12,
                                                                                    "messages": HELLO})
              if name != "ping"]  # fmt: skip
    assert events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    stop = next(i for i, (name, _) in enumerate(events) if name == "content_block_stop")
    assert events[stop - 1][1]["delta"]["type"] == "signature_delta" and events[stop - 1][1]["delta"]["signature"]
    assert {data["delta"]["type"] for _, data in events[2 : stop - 1]} == {"thinking_delta"}
