"""The official openai SDK against a real `manage.py serve`: daphne, a Celery worker process, Redis, SmolLM2."""

import json
import re
import time
from pathlib import Path

import httpx2 as httpx
import openai
import psutil
import pytest

from inference.models import RequestLog
from models_app.services import default_model_path, model_register
from tests.conftest import HELLO, MODEL, Server
from tests.openapi import assert_schema

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def client(minerva_server, smollm2):
    with openai.OpenAI(base_url=minerva_server.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_it_lists_and_retrieves_models_including_ids_with_slashes_and_colons(client, minerva_server):
    model_register(name="org/smollm2:q4_1", path=default_model_path())
    listed = client.models.list()
    assert_schema("ListModelsResponse", listed.model_dump(exclude_unset=True))
    assert {MODEL, "org/smollm2:q4_1"} <= {m.id for m in listed.data}
    model = client.models.retrieve("org/smollm2:q4_1")
    assert model.id == "org/smollm2:q4_1" and model.owned_by == "minerva"
    assert model.model_extra["context_length"] == 8192  # its trained context


def test_it_chats_without_streaming(client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=20)
    assert_schema("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_it_streams_with_usage_and_matches_the_non_streamed_text(client):
    params = {"model": MODEL, "messages": HELLO, "temperature": 0, "seed": 42, "max_tokens": 30}
    plain = client.chat.completions.create(**params).choices[0].message.content
    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        assert_schema("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain


def test_it_completes_text_and_honours_stop(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12)
    text = full.choices[0].text
    assert " 6" in text, text
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=" 6")
    assert stopped.choices[0].text == text[: text.index(" 6")]
    assert stopped.choices[0].finish_reason == "stop"


def test_bad_input_through_the_sdk_raises_the_right_errors(client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 9000}], stream=True)
    assert too_long.value.code == "context_length_exceeded"


def test_closing_a_stream_early_stops_the_worker_and_logs_cancelled(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=3000, temperature=1.0, stream=True,
    )  # fmt: skip
    first = [next(stream) for _ in range(3)]
    request_id = first[0].id.removeprefix("chatcmpl-")
    stream.close()
    deadline = time.monotonic() + 15
    row = None
    while time.monotonic() < deadline:
        row = RequestLog.objects.filter(request_id=request_id).first()
        if row and row.status == "cancelled":
            break
        time.sleep(0.2)
    assert row is not None and row.status == "cancelled", row and row.status
    assert 0 < row.completion_tokens < 3000
    # The worker's single slot is free again.
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"


def test_every_response_carries_a_request_id(minerva_server, smollm2):
    response = httpx.get(f"{minerva_server.base_url}/models")
    assert response.headers["x-request-id"].startswith("req_")
    assert httpx.get(f"{minerva_server.base_url}/nope").headers["x-request-id"].startswith("req_")


def test_sigterm_stops_serve_and_every_child_within_ten_seconds(django_db_setup, tmp_path):
    server = Server(tmp_path)
    children = server.children
    assert {c.name() for c in children} >= {"redis-server"} and len(children) >= 3
    socket = tmp_path / "redis.sock"
    assert socket.exists()
    assert server.stop() < 10
    assert server.process.returncode == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not socket.exists()


def test_a_seeded_request_repeats_itself_and_concurrent_requests_never_cross(client):
    def ask(i: int, max_tokens: int, **extra) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me a fact about the number {i}."}],
            temperature=0.9, seed=100 + i, max_tokens=max_tokens, **extra,
        )  # fmt: skip
        return reply.choices[0].message.content

    assert ask(1, 20) == ask(1, 20)  # the second run comes from the prompt cache: same numerics, same draws
    # Batched together, llama.cpp's kernels may round differently than alone (so free text can drift, as it does
    # under llama-server); answers held by a grammar show that each request gets exactly its own tokens.
    from concurrent.futures import ThreadPoolExecutor

    def forced(i: int) -> str:
        schema = {"type": "object", "properties": {"n": {"const": f"number {i} " * (i + 2)}}, "required": ["n"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
        return ask(i, 60, response_format=fmt)

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(forced, range(4)))
    assert [json.loads(t)["n"] for t in together] == [f"number {i} " * (i + 2) for i in range(4)]


def test_v1_models_reports_which_models_a_worker_has_loaded(client):
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    entry = next(m for m in client.models.list().data if m.id == MODEL)
    assert entry.model_extra["meta"]["loaded"] is True


def test_the_sdks_parse_returns_a_validated_pydantic_object(client):
    from pydantic import BaseModel, Field

    class Color(BaseModel):
        name: str = Field(max_length=20)
        hex: str = Field(pattern="^#[0-9a-f]{6}$")

    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Name a color and its hex code."}], response_format=Color,
        temperature=0, max_tokens=60,
    )  # fmt: skip
    # (The raw response's shape is checked against the spec in the other tests; parse() adds client-side fields.)
    assert isinstance(completion.choices[0].message.parsed, Color)
    assert completion.choices[0].message.parsed.hex.startswith("#")


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                               "required": ["city"]}}}  # fmt: skip


def test_the_sdk_gets_tool_calls_streamed_and_not(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = {"model": MODEL, "messages": ask, "tools": [WEATHER_TOOL], "tool_choice": "required", "temperature": 0,
              "max_tokens": 60}  # fmt: skip
    reply = client.chat.completions.create(**params)
    assert_schema("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    assert reply.choices[0].finish_reason == "tool_calls"

    chunks = list(client.chat.completions.create(**params, stream=True))
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == "" and all(tc.id is None and tc.function.name is None for tc in calls[1:])
    assert json.loads("".join(tc.function.arguments for tc in calls)) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_sdk_gets_a_json_object_that_parses(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=80,
    )  # fmt: skip
    assert_schema("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))
    if reply.choices[0].finish_reason == "stop":  # cut off by max_tokens, the JSON would be incomplete
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")


TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}}  # fmt: skip
HERMES = (Path(__file__).parent / "templates" / "hermes.jinja").read_text()


@pytest.fixture
def hermes(smollm2):
    """SmolLM2 with a Hermes/Qwen-style template (it shares their ChatML tokens): a format with several calls."""
    smollm2.chat_template_override = HERMES
    smollm2.save()  # the worker reads the row per request and reloads the model when its template changed
    return smollm2


@pytest.mark.timeout(300)  # five requests, three under a grammar
def test_the_sdk_gets_several_calls_in_one_turn_streamed_as_written_then_an_answer_to_their_results(client, hermes):
    ask = [{"role": "user", "content": "What is the weather in Paris and in London?"}]
    params = {"model": MODEL, "messages": ask, "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required",
              "parallel_tool_calls": True, "temperature": 0, "seed": 1, "max_tokens": 120}  # fmt: skip
    reply = client.chat.completions.create(**params)
    assert_schema("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    assert all(c.id.startswith("call_") and c.function.name in ("get_weather", "get_time") for c in calls)
    assert {json.loads(c.function.arguments)["city"] for c in calls} == {"Paris", "London"}

    chunks = list(client.chat.completions.create(**params, stream=True))
    for chunk in chunks:
        assert_schema("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    streamed: dict[int, dict] = {}  # index -> the call its deltas add up to, as the SDK's users assemble it
    for delta in deltas:
        if delta.index not in streamed:  # a call's head: its id and name, before any argument
            assert delta.id.startswith("call_") and delta.type == "function" and delta.function.arguments == ""
            streamed[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
        else:
            assert delta.id is None and delta.function.name is None
            streamed[delta.index]["arguments"] += delta.function.arguments
    assert list(streamed) == list(range(len(calls)))  # the calls open in order, each once
    assert len({c["id"] for c in streamed.values()}) == len(calls)
    assert len(deltas) > 2 * len(calls)  # arguments stream in pieces, not whole at the end
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    results = [{"role": "tool", "tool_call_id": c.id, "content": f"Sunny, {20 + i} C"} for i, c in enumerate(calls)]
    history = [*ask, reply.choices[0].message.model_dump(exclude_none=True), *results]
    answer = client.chat.completions.create(**{**params, "messages": history, "tool_choice": "auto", "max_tokens": 60})
    assert_schema("CreateChatCompletionResponse", answer.model_dump(exclude_unset=True))
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens > reply.usage.prompt_tokens + 20  # both calls and results were rendered


def test_a_draft_model_set_in_the_registry_drafts_for_its_model_and_the_text_stays_the_same(client, smollm2):
    # SmolLM2 registered a second time is a draft model with its tokenizer (a smaller sibling in real use).
    prompt = "Colours, in order, over and over: " + "red, green, blue, yellow, purple, orange, " * 12
    params = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 60}
    plain = client.completions.create(**params)
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0  # no drafting by default
    smollm2.draft_model = model_register(name="smollm2-draft", path=default_model_path())
    smollm2.save()  # the worker reloads the model with its draft model at the next request
    drafted = client.completions.create(**params)
    assert drafted.choices[0].text == plain.choices[0].text
    details = drafted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 30 and details.rejected_prediction_tokens >= 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
                                          max_tokens=40)  # fmt: skip
    kept = chat.usage.completion_tokens_details.accepted_prediction_tokens
    assert kept > 0
    # operators see the acceptance rate in /metrics: what the two drafted requests drafted and kept
    metrics = httpx.get(client.base_url.join("/metrics"), timeout=10).text
    accepted = re.search(rf'^minerva_tokens_total{{kind="draft_accepted",model="{MODEL}"}} (\S+)$', metrics, re.M)
    assert float(accepted.group(1)) == details.accepted_prediction_tokens + kept
    assert re.search(rf'^minerva_tokens_total{{kind="drafted",model="{MODEL}"}} ', metrics, re.M)
