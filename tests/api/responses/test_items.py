"""/v1/responses in-process (Celery eager, the Redis Stream replays): reasoning in and out, what the input items
become, and refusals that leave nothing stored."""

import json

import pytest

from api.responses.protocol import conversation
from inference.models import RequestLog
from responses.models import StoredResponse
from tests.conftest import MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)

# SmolLM2's ChatML, opening a thought for the answer and showing an assistant turn's reasoning.
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
    "</think>{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n<think>\n"
)
REASONING_EVENTS = {
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.incomplete": "ResponseIncompleteEvent",
}  # fmt: skip


async def post(client, path: str, body: dict):
    return await client.post(path, json.dumps(body), content_type="application/json")


async def events_of(response) -> list[dict]:
    raw = b"".join([part async for part in response.streaming_content]).decode()
    frames = [f for f in raw.split("\n\n") if f and not f.startswith(":")]
    events = []
    for frame in frames:
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


async def test_a_model_that_thinks_answers_with_a_reasoning_item_streamed_as_reasoning_text(async_client, smollm2):
    smollm2.chat_template_override = THINKING
    await smollm2.asave()
    body = {"model": MODEL, "input": "Say hello.", "temperature": 0, "max_output_tokens": 12}
    plain = (await post(async_client, "/v1/responses", body)).json()
    assert_schema("Response", plain)
    reasoning = plain["output"][0]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_") and reasoning["summary"] == []
    assert reasoning["content"][0]["type"] == "reasoning_text" and reasoning["content"][0]["text"]
    assert plain["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    events = await events_of(await post(async_client, "/v1/responses", {**body, "stream": True}))
    for event in events:
        assert_schema(REASONING_EVENTS[event["type"]], event)
    types = [e["type"] for e in events]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""}
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert streamed == reasoning["content"][0]["text"] == events[-1]["response"]["output"][0]["content"][0]["text"]


async def test_a_reasoning_item_is_the_reasoning_of_the_assistant_turn_after_it(async_client, smollm2):
    smollm2.chat_template_override = THINKING
    await smollm2.asave()
    items = [{"role": "user", "content": "Hi."},
             {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "A greeting."}]},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye."}]  # fmt: skip
    response = await post(async_client, "/v1/responses", {"model": MODEL, "input": items, "max_output_tokens": 1})
    messages = [{"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
                {"role": "user", "content": "Bye."}]  # fmt: skip
    count = (await post(async_client, "/tokenize", {"model": MODEL, "messages": messages})).json()["count"]
    assert response.json()["usage"]["input_tokens"] == count
    listed = (await async_client.get(f"/v1/responses/{response.json()['id']}/input_items?order=asc")).json()
    assert_schema("ResponseItemList", listed)
    assert listed["data"][1]["id"] == "rs_1" and listed["data"][1]["summary"][0]["text"] == "A greeting."


def test_calls_after_an_assistant_message_are_one_turn_and_their_outputs_name_the_function():
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_b", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_b", "output": "noon"},
        {"type": "function_call_output", "call_id": "call_a", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Rain at noon."}]},
        {"type": "function_call", "call_id": "call_c", "name": "umbrella", "arguments": "{}"},
    ]
    messages = conversation(items, "Be brief.")
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."), ("user", "Weather?"), ("assistant", "Checking."), ("tool", "noon"),
        ("tool", "rain"), ("assistant", ""),
    ]  # fmt: skip
    assert [c.id for c in messages[2].tool_calls] == ["call_a", "call_b"]
    assert (messages[3].name, messages[3].tool_call_id, messages[4].name) == ("time", "call_b", "weather")
    assert messages[5].reasoning == "Rain at noon." and messages[5].tool_calls[0].name == "umbrella"


async def test_a_prompt_too_long_is_a_400_naming_input_and_stores_nothing(async_client, smollm2):
    response = await post(async_client, "/v1/responses", {"model": MODEL, "input": "Hi. " * 5000})
    assert response.status_code == 400
    assert_schema("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "input"
    assert not await StoredResponse.objects.aexists()
    assert await RequestLog.objects.filter(endpoint="/v1/responses").acount() == 1


async def test_each_response_is_logged_once_with_its_tokens(async_client, smollm2):
    body = {"model": MODEL, "input": "Hi.", "max_output_tokens": 4, "temperature": 0}
    created = await post(async_client, "/v1/responses", body)
    response_id = created.json()["id"]
    assert (await async_client.get(f"/v1/responses/{response_id}")).status_code == 200
    log = await RequestLog.objects.aget(request_id=response_id.removeprefix("resp_"))
    assert log.endpoint == "/v1/responses" and log.status == RequestLog.Status.COMPLETED
    assert log.completion_tokens == 4 == created.json()["usage"]["output_tokens"]
    assert await RequestLog.objects.filter(endpoint=f"/v1/responses/{response_id}", method="GET").acount() == 1
    assert await RequestLog.objects.acount() == 2


async def test_an_error_after_the_stream_began_is_a_last_response_failed_event_and_is_stored(async_client, smollm2,
                                                                                             settings):  # fmt: skip
    settings.STREAM_MAXLEN = 100  # the answer outgrows its stream: a 400 stream_too_long after the 200
    body = {"model": MODEL, "input": "Tell a long story.", "max_output_tokens": 400, "stream": True,
            "text": {"format": {"type": "json_schema", "name": "story", "schema": {
                "type": "object", "properties": {"story": {"type": "string", "minLength": 3000}},
                "required": ["story"], "additionalProperties": False}}}}  # fmt: skip
    events = await events_of(await post(async_client, "/v1/responses", body))
    assert events[-1]["type"] == "response.failed"
    assert_schema("ResponseFailedEvent", events[-1])
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_prompt"
    assert "MINERVA_STREAM_MAXLEN" in failed["error"]["message"] and failed["output"][0]["status"] == "incomplete"
    stored = (await async_client.get(f"/v1/responses/{failed['id']}")).json()
    assert stored["status"] == "failed" and stored["error"] == failed["error"]
