"""The Responses API with the official openai SDK against a real `manage.py serve` (daphne, a Celery worker, Redis,
SmolLM2); every body and streamed event is checked against the official OpenAPI spec."""

import json

import httpx2 as httpx
import openai
import pytest
from pydantic import BaseModel

from access.services import key_create
from inference.models import RequestLog
from responses.models import StoredResponse
from tests.conftest import MODEL
from tests.openapi import assert_schema
from tests.test_faults import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}  # fmt: skip
# A forced answer of thousands of characters: generation that is still running when the test acts on it.
LONG = {"format": {"type": "json_schema", "name": "story", "strict": True,
                   "schema": {"type": "object", "properties": {"story": {"type": "string", "minLength": 6000}},
                              "required": ["story"], "additionalProperties": False}}}  # fmt: skip
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent", "response.queued": "ResponseQueuedEvent",
}  # fmt: skip


@pytest.fixture
def client(minerva_server, smollm2):
    with openai.OpenAI(base_url=minerva_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def sdk(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def as_sent(obj) -> dict:
    """An SDK object as it came over the wire (the SDK's own conveniences, such as output_text, left out)."""
    return obj.model_dump(exclude_unset=True, by_alias=True)


def chat_tokens(server, messages: list[dict], **extra) -> int:
    """The prompt tokens of a chat request with these messages, counted by the worker's own template."""
    response = httpx.post(f"http://127.0.0.1:{server.port}/tokenize", json={"model": MODEL, "messages": messages,
                                                                            **extra}, timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["count"]


def finished(client: openai.OpenAI, response_id: str):
    return wait_for(lambda: (r := client.responses.retrieve(response_id)).status not in ("queued", "in_progress")
                    and r, 120, f"response {response_id} did not finish")  # fmt: skip


def test_a_string_input_with_instructions_is_one_system_and_one_user_message(client, minerva_server):
    response = client.responses.create(model=MODEL, instructions="Answer in one short sentence.",
                                       input="What is the capital of France?", temperature=0,
                                       max_output_tokens=40)  # fmt: skip
    assert_schema("Response", as_sent(response))
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.output[0].type == "message" and response.output[0].id.startswith("msg_")
    assert response.instructions == "Answer in one short sentence." and response.store is True
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
    assert response.usage.input_tokens == chat_tokens(minerva_server, messages)
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.output_tokens > 0


def test_input_items_with_and_without_a_type_are_the_same_conversation_as_chat_messages(client, minerva_server):
    items = [
        {"role": "developer", "content": "Answer with one word."},
        {"role": "user", "content": [{"type": "input_text", "text": "What color is the sky?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
        {"type": "message", "role": "user", "content": "And grass?"},
    ]
    response = client.responses.create(model=MODEL, input=items, temperature=0, max_output_tokens=10)
    assert_schema("Response", as_sent(response))
    messages = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And grass?"}]  # fmt: skip
    assert response.usage.input_tokens == chat_tokens(minerva_server, messages)
    listed = client.responses.input_items.list(response.id, order="asc")
    assert [item.role for item in listed.data] == ["developer", "user", "assistant", "user"]
    assert {item.type for item in listed.data} == {"message"}


def test_max_output_tokens_cuts_the_answer_and_says_so(client):
    response = client.responses.create(model=MODEL, input="Tell me a long story.", temperature=0,
                                       max_output_tokens=3)  # fmt: skip
    assert_schema("Response", as_sent(response))
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"


def test_a_stream_sends_typed_numbered_events_in_order_each_valid_against_the_spec(client):
    params = {"model": MODEL, "input": "Say hello.", "temperature": 0, "max_output_tokens": 30}
    events = list(client.responses.create(**params, stream=True))
    for event in events:
        assert_schema(EVENT_SCHEMAS[event.type], as_sent(event))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas > 1
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     types[-1]]  # fmt: skip
    assert types[-1] in ("response.completed", "response.incomplete")
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text == events[-4].text
    assert final.usage.output_tokens > 0 and len({e.response.id for e in events if hasattr(e, "response")}) == 1
    plain = client.responses.create(**params)
    assert plain.output_text == text
    assert as_sent(client.responses.retrieve(final.id))["output"] == as_sent(final)["output"]


def test_the_sdks_stream_helper_ends_with_the_final_response(client):
    with client.responses.stream(model=MODEL, input="Name a fruit.", temperature=0, max_output_tokens=200) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text and final.status == "completed"


def test_a_forced_function_call_and_its_output_make_a_tool_loop(client):
    first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=0)  # fmt: skip
    assert_schema("Response", as_sent(first))
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].status == "completed"
    assert calls[0].id.startswith("fc_") and calls[0].call_id.startswith("call_")
    assert set(json.loads(calls[0].arguments)) == {"city"}
    assert first.tool_choice.name == "get_weather" and first.tools[0].name == "get_weather"
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], tool_choice="none", temperature=0,
        max_output_tokens=40,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "22 C and sunny"}],
    )  # fmt: skip
    assert_schema("Response", as_sent(second))
    assert second.output_text and second.previous_response_id == first.id
    listed = client.responses.input_items.list(second.id, order="asc")
    assert_schema("ResponseItemList", as_sent(listed))
    assert [item.type for item in listed.data] == ["message", "function_call", "function_call_output"]
    assert listed.data[1].call_id == calls[0].call_id


def test_a_streamed_function_call_is_an_item_with_its_arguments_streamed(client):
    events = list(client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER], temperature=0,
                                          tool_choice="required", stream=True))  # fmt: skip
    for event in events:
        assert_schema(EVENT_SCHEMAS[event.type], as_sent(event))
    types = [e.type for e in events]
    start = types.index("response.output_item.added")
    end = types.index("response.function_call_arguments.done")
    deltas = events[start + 1 : end]
    assert {e.type for e in deltas} == {"response.function_call_arguments.delta"}
    assert len(deltas) > 2  # the arguments stream as the model writes them, not in one piece at the end
    assert types[end : end + 2] == ["response.function_call_arguments.done", "response.output_item.done"]
    assert types[-1] == "response.completed"
    added, done, item_done = events[start], events[end], events[end + 1]
    assert added.item.type == "function_call" and added.item.arguments == "" and added.item.name == "get_weather"
    arguments = "".join(e.delta for e in deltas)
    assert arguments == done.arguments == item_done.item.arguments == events[-1].response.output[0].arguments
    assert done.name == "get_weather" and item_done.item.call_id == added.item.call_id


SHELL = {"type": "function", "name": "shell", "description": "Runs a shell command.", "strict": False,
         "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                        "required": ["command"], "additionalProperties": False}}  # fmt: skip


def test_a_codex_shaped_conversation_streams_and_takes_its_own_items_back(client):
    """What Codex sends: long instructions, developer and user items with input_text parts, function tools with
    strict false, reasoning and include options, store false, streaming; the next turn resends every item."""
    params = {"model": MODEL, "instructions": "You are a coding agent. " * 50, "tools": [SHELL], "tool_choice": "auto",
              "parallel_tool_calls": False, "reasoning": {"effort": "medium", "summary": "auto"}, "store": False,
              "include": ["reasoning.encrypted_content"], "prompt_cache_key": "session-1", "temperature": 0,
              "max_output_tokens": 60}  # fmt: skip
    history = [{"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}
               for role, text in (("developer", "Sandbox: none."), ("user", "List the files."))]  # fmt: skip
    events = list(client.responses.create(**params, input=history, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    items = [event.item for event in events if event.type == "response.output_item.done"]
    assert items and items == events[-1].response.output
    history += [item.model_dump(exclude_none=True) for item in items]
    history += [{"type": "function_call_output", "call_id": item.call_id, "output": "README.md"}
                for item in items if item.type == "function_call"]  # fmt: skip
    history.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks."}]})
    events = list(client.responses.create(**params, input=history, stream=True))
    final = events[-1].response
    assert final.status in ("completed", "incomplete") and final.store is False
    # The instructions and the first turn are the start of the second prompt: its slot still holds them.
    assert final.usage.input_tokens_details.cached_tokens > 200


def test_previous_response_id_continues_the_conversation_from_the_prompt_cache(client, minerva_server):
    first = client.responses.create(model=MODEL, input="My name is Ada.", temperature=0, max_output_tokens=20)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="What is my name?",
                                     temperature=0, max_output_tokens=20)  # fmt: skip
    assert_schema("Response", as_sent(second))
    messages = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "What is my name?"}]  # fmt: skip
    assert second.usage.input_tokens == chat_tokens(minerva_server, messages)
    # The first request's prompt and answer are the start of the second's prompt: its slot still holds them.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    listed = client.responses.input_items.list(second.id, order="asc")
    assert [item.id for item in listed.data][1] == first.output[0].id


def test_a_stored_response_is_retrieved_listed_by_page_and_deleted(client):
    response = client.responses.create(model=MODEL, input=[{"role": "user", "content": "One."},
                                                           {"role": "assistant", "content": "Two."},
                                                           {"role": "user", "content": "Three?"}],
                                       max_output_tokens=5, metadata={"ticket": "42"})  # fmt: skip
    retrieved = client.responses.retrieve(response.id)
    assert_schema("Response", as_sent(retrieved))
    assert retrieved.output == response.output and retrieved.metadata == {"ticket": "42"}
    newest = client.responses.input_items.list(response.id, limit=2)
    assert_schema("ResponseItemList", as_sent(newest))
    assert [i.content[0].text for i in newest.data] == ["Three?", "Two."] and newest.has_more
    assert newest.first_id == newest.data[0].id and newest.last_id == newest.data[1].id
    rest = client.responses.input_items.list(response.id, limit=2, after=newest.last_id)
    assert [i.content[0].text for i in rest.data] == ["One."] and not rest.has_more
    deleted = client.responses.with_raw_response.delete(response.id).http_response.json()
    assert deleted == {"id": response.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(response.id), lambda: client.responses.delete(response.id),
                 lambda: client.responses.input_items.list(response.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()


def test_store_false_keeps_nothing(client):
    response = client.responses.create(model=MODEL, input="Hi.", store=False, max_output_tokens=5)
    assert response.store is False and response.output_text is not None
    assert not StoredResponse.objects.filter(pk=response.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_a_background_response_returns_at_once_and_is_finished_by_the_worker(client):
    queued = client.responses.create(model=MODEL, input="Say hello.", background=True, temperature=0,
                                     max_output_tokens=20)  # fmt: skip
    assert_schema("Response", as_sent(queued))
    assert queued.status in ("queued", "in_progress") and queued.background is True and queued.output == []
    done = finished(client, queued.id)
    assert_schema("Response", as_sent(done))
    assert done.status in ("completed", "incomplete") and done.output_text and done.usage.output_tokens > 0
    log = RequestLog.objects.get(request_id=queued.id.removeprefix("resp_"))
    assert log.endpoint == "/v1/responses" and log.status == RequestLog.Status.COMPLETED
    with pytest.raises(openai.BadRequestError):  # it has ended
        client.responses.cancel(queued.id)


def test_a_background_response_outlives_a_restart_of_the_web_process(client, minerva_server):
    queued = client.responses.create(model=MODEL, input="Tell a story.", background=True, text=LONG,
                                     max_output_tokens=300)  # fmt: skip
    wait_for(lambda: client.responses.retrieve(queued.id).status == "in_progress", 120, "it never started")
    daphne = minerva_server.child("daphne")
    daphne.kill()
    daphne.wait(10)
    wait_for(lambda: _answers(minerva_server), 60, "serve did not start daphne again")
    done = finished(client, queued.id)
    assert done.status == "incomplete" and done.usage.output_tokens == 300
    assert done.output[0].content[0].text.startswith("{")


def _answers(server) -> bool:
    try:
        return httpx.get(f"{server.base_url}/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_cancelling_a_background_response_stops_its_worker(client):
    queued = client.responses.create(model=MODEL, input="Tell a story.", background=True, text=LONG,
                                     max_output_tokens=4000)  # fmt: skip
    wait_for(lambda: client.responses.retrieve(queued.id).status == "in_progress", 120, "it never started")
    cancelled = client.responses.cancel(queued.id)
    assert_schema("Response", as_sent(cancelled))
    assert cancelled.status == "cancelled"
    log = wait_for(lambda: RequestLog.objects.filter(request_id=queued.id.removeprefix("resp_"),
                                                     status=RequestLog.Status.CANCELLED).first(),
                   60, "the worker did not stop")  # fmt: skip
    assert log.completion_tokens < 4000
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # again: the same answer


def test_leaving_a_background_responses_stream_stops_nothing(client):
    seen = []
    with client.responses.create(model=MODEL, input="Tell a story.", background=True, text=LONG,
                                 max_output_tokens=300, stream=True) as stream:  # fmt: skip
        for event in stream:
            assert_schema(EVENT_SCHEMAS[event.type], as_sent(event))
            seen.append(event)
            if event.type == "response.output_text.delta":
                break  # the client goes away
    heads = [(e.type, e.sequence_number, e.response.status) for e in seen[:3]]
    assert heads == [("response.created", 0, "queued"), ("response.queued", 1, "queued"),
                     ("response.in_progress", 2, "in_progress")]  # fmt: skip
    done = finished(client, seen[0].response.id)
    assert done.status == "incomplete" and done.usage.output_tokens == 300  # not cancelled: it ran to its limit


def test_a_background_responses_stream_ends_when_the_response_is_cancelled(client):
    with client.responses.create(model=MODEL, input="Tell a story.", background=True, text=LONG,
                                 max_output_tokens=4000, stream=True) as stream:  # fmt: skip
        events = []
        for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) == 6:
                client.responses.cancel(events[0].response.id)
    last = events[-1]
    assert_schema(EVENT_SCHEMAS[last.type], as_sent(last))
    assert last.type == "response.incomplete" and last.response.status == "cancelled"
    assert 0 < last.response.usage.output_tokens < 4000
    assert client.responses.retrieve(last.response.id).status == "cancelled"


def test_a_background_response_streams_again_from_the_start_or_after_a_sequence_number(client, minerva_server):
    events = list(client.responses.create(model=MODEL, input="Say hello.", background=True, stream=True,
                                          temperature=0, max_output_tokens=12))  # fmt: skip
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_id = events[0].response.id

    def wire(event) -> dict:  # what must come again alike: all but the snapshots' completion times
        sent = as_sent(event)
        sent.get("response", {}).pop("completed_at", None)
        return sent

    again = list(client.responses.retrieve(response_id, stream=True))
    assert [wire(e) for e in again] == [wire(e) for e in events]
    after = list(client.responses.retrieve(response_id, stream=True, starting_after=3))
    assert [wire(e) for e in after] == [wire(e) for e in events[4:]]
    for bad in ("x", "-1", "²", "9" * 5000):
        refused = httpx.get(f"{minerva_server.base_url}/responses/{response_id}",
                            params={"stream": "true", "starting_after": bad}, timeout=30)  # fmt: skip
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "starting_after", bad


def test_a_client_that_leaves_a_stored_stream_finds_the_response_cancelled(client):
    with client.responses.create(model=MODEL, input="Tell a story.", text=LONG, max_output_tokens=4000,
                                 stream=True) as stream:  # fmt: skip
        response_id = next(iter(stream)).response.id
        for event in stream:
            if event.type == "response.output_text.delta":
                break
    done = finished(client, response_id)
    assert_schema("Response", as_sent(done))
    assert done.status == "cancelled" and done.output[0].status == "incomplete"
    assert done.output[0].content[0].text.startswith("{")


def test_responses_belong_to_the_key_that_made_them(minerva_server, smollm2):
    key, a = key_create(name="a")
    _, b = key_create(name="b")
    _, staff = key_create(name="ops", staff=True)
    with sdk(minerva_server, a) as mine, sdk(minerva_server, b) as theirs, sdk(minerva_server) as keyless:
        response = mine.responses.create(model=MODEL, input="Hi.", max_output_tokens=5)
        for other in (theirs, keyless):
            for call in (lambda c=other: c.responses.retrieve(response.id),
                         lambda c=other: c.responses.input_items.list(response.id),
                         lambda c=other: c.responses.cancel(response.id),
                         lambda c=other: c.responses.delete(response.id)):  # fmt: skip
                with pytest.raises(openai.NotFoundError):
                    call()
            with pytest.raises(openai.NotFoundError) as foreign:
                other.responses.create(model=MODEL, previous_response_id=response.id, input="And?")
            assert foreign.value.body["param"] == "previous_response_id"
        assert mine.responses.retrieve(response.id).id == response.id
        with sdk(minerva_server, staff) as operator:
            assert operator.responses.retrieve(response.id).id == response.id
        unowned = keyless.responses.create(model=MODEL, input="Hi.", max_output_tokens=5)
        assert keyless.responses.retrieve(unowned.id).id == unowned.id
        with pytest.raises(openai.NotFoundError):
            mine.responses.retrieve(unowned.id)
    assert StoredResponse.objects.get(pk=response.id).api_key_prefix == key.prefix


class Person(BaseModel):
    name: str
    age: int


def test_a_json_schema_text_format_constrains_the_answer(client):
    response = client.responses.parse(model=MODEL, input="Invent a person.", text_format=Person, temperature=0,
                                      max_output_tokens=200)  # fmt: skip
    assert_schema("Response", as_sent(response))
    assert isinstance(response.output_parsed, Person)
    assert response.text.format.type == "json_schema" and response.text.format.name == "Person"
    plain = client.responses.create(model=MODEL, input="Describe a cat as JSON.", temperature=0,
                                    max_output_tokens=10, text={"format": {"type": "json_object"}})  # fmt: skip
    assert plain.text.format.type == "json_object" and plain.output_text.startswith("{")  # (the tiny model rambles)


def test_bad_input_is_refused_in_openais_shape_naming_the_parameter(client, minerva_server):
    cases = [
        ({"input": "Hi.", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"input": "Hi.", "temperature": "hot"}, 400, "temperature"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, 400,
         "input[0].content[0]"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, 400, "input[0].type"),
        ({"input": "Hi.", "tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, 400, "tool_choice"),
        ({"input": "Hi.", "background": True, "store": False}, 400, "background"),
        ({"input": "Hi.", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
        ({}, 400, "input"),
        ({"input": "Hi.", "model": "no-such-model"}, 404, "model"),
        ({"input": "Hi. " * 5000}, 400, "input"),
        ({"input": "Hi.", "tools": [{"type": "function", "name": "x", "parameters": {"type": "string"}}]}, 400,
         "tools[0].parameters"),
    ]  # fmt: skip
    for extra, status, param in cases:
        response = httpx.post(f"{minerva_server.base_url}/responses", json={"model": MODEL, **extra}, timeout=120)
        assert response.status_code == status, (extra, response.text)
        assert_schema("ErrorResponse", response.json())
        assert response.json()["error"]["param"] == param, (extra, response.text)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi.", tools=[{"type": "web_search"}])
    assert "function tools" in refused.value.message
    unknown = httpx.get(f"{minerva_server.base_url}/responses/resp_nope", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "response_id"
    stored = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as again:
        client.responses.retrieve(stored.id, stream=True)
    assert again.value.body["param"] == "stream"
    for query in ("order=up", "limit=0", "limit=101", "after=msg_nope"):
        listed = httpx.get(f"{minerva_server.base_url}/responses/{stored.id}/input_items?{query}", timeout=30)
        assert listed.status_code == 400 and listed.json()["error"]["param"] == query.split("=")[0], listed.text
