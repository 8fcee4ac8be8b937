"""/v1/chat/completions and /v1/completions in-process: Celery runs eagerly, the Redis Stream replays."""

import json

import pytest

from inference.models import RequestLog
from tests.conftest import HELLO, MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)


async def post(client, path: str, body: dict):
    return await client.post(path, json.dumps(body), content_type="application/json")


async def sse_events(response) -> list:
    raw = b"".join([part async for part in response.streaming_content]).decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), raw
    return [f.removeprefix("data: ") for f in frames]


def assert_completion_chunk(chunk: dict) -> None:
    """The spec says streamed completions share CreateCompletionResponse, whose `finish_reason` is not nullable;
    OpenAI (and llama-server) send null until the last chunk, as we do. Validate everything else."""
    assert all(c["finish_reason"] in (None, "stop", "length") for c in chunk["choices"])
    choices = [dict(c, finish_reason=c["finish_reason"] or "stop") for c in chunk["choices"]]
    assert_schema("CreateCompletionResponse", dict(chunk, choices=choices))


async def test_it_answers_a_chat_completion_with_usage(async_client, smollm2):
    response = await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert_schema("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response["x-request-id"].startswith("req_")


async def test_it_streams_role_first_then_text_then_finish_usage_and_done(async_client, smollm2):
    response = await post(
        async_client,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": HELLO,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    events = await sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_schema("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1


async def test_streamed_text_equals_non_streamed_text_at_temperature_zero(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "seed": 7, "max_tokens": 40}
    plain = (await post(async_client, "/v1/chat/completions", body)).json()["choices"][0]["message"]["content"]
    events = await sse_events(await post(async_client, "/v1/chat/completions", {**body, "stream": True}))
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == plain


async def test_it_stops_at_a_stop_sequence_and_leaves_it_out(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 40}
    full = (await post(async_client, "/v1/chat/completions", body)).json()["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    stopped = (await post(async_client, "/v1/chat/completions", {**body, "stop": [stop]})).json()
    assert stopped["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


async def test_max_tokens_ends_with_finish_reason_length(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_completion_tokens": 3}
    response = (await post(async_client, "/v1/chat/completions", body)).json()
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 3


async def test_it_answers_a_text_completion(async_client, smollm2):
    body = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 5}
    response = await post(async_client, "/v1/completions", body)
    assert response.status_code == 200
    data = response.json()
    assert_schema("CreateCompletionResponse", data)
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] and data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5


async def test_it_streams_a_text_completion(async_client, smollm2):
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = await sse_events(await post(async_client, "/v1/completions", body))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_completion_chunk(chunk)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    plain = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
    plain = (await post(async_client, "/v1/completions", plain)).json()
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == plain["choices"][0]["text"]


async def test_token_id_prompts_are_accepted(async_client, smollm2):
    body = {"model": MODEL, "prompt": [504, 3458, 282], "temperature": 0, "max_tokens": 2}
    response = await post(async_client, "/v1/completions", body)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 3


async def test_every_request_writes_exactly_one_log_row(async_client, smollm2):
    response = await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 4})
    request_id = response["x-request-id"].removeprefix("req_")
    rows = [row async for row in RequestLog.objects.filter(request_id=request_id)]
    assert len(rows) == 1
    row = rows[0]
    assert (row.status, row.status_code, row.model, row.endpoint) == ("completed", 200, MODEL, "/v1/chat/completions")
    assert row.completion_tokens == response.json()["usage"]["completion_tokens"]
    assert row.prompt_tokens == response.json()["usage"]["prompt_tokens"]
    assert row.ttft_ms is not None and row.latency_ms >= row.ttft_ms
    assert "messages" not in row.request and row.request["max_tokens"] == 4


async def test_without_log_content_a_rows_tools_are_their_names_not_their_descriptions(async_client, smollm2):
    who = {"type": "object", "properties": {"who": {"type": "string", "description": "a name"}}}
    tool = {"type": "function", "function": {"name": "lookup", "description": "Ask HR (salaries)", "parameters": who}}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "tools": [tool]}
    response = await post(async_client, "/v1/chat/completions", body)
    row = await RequestLog.objects.aget(request_id=response["x-request-id"].removeprefix("req_"))
    assert row.request["tools"] == [{"name": "lookup"}] and row.prompt is None


async def test_a_resent_conversation_reports_cached_prompt_tokens(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 8}
    first = (await post(async_client, "/v1/chat/completions", body)).json()
    second = (await post(async_client, "/v1/chat/completions", body)).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < second["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == second["usage"]["prompt_tokens"] - 1


async def test_ignore_eos_and_logit_bias_are_honoured(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 50, "ignore_eos": True}
    response = (await post(async_client, "/v1/chat/completions", body)).json()
    assert (response["choices"][0]["finish_reason"], response["usage"]["completion_tokens"]) == ("length", 50)
    count = {"model": MODEL, "prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 1}
    plain = (await post(async_client, "/v1/completions", count)).json()
    banned = {"504": -100, "28": -100, "216": -100}  # " 4", "4", " ": the likely next tokens
    biased = (await post(async_client, "/v1/completions", {**count, "logit_bias": banned})).json()
    assert plain["choices"][0]["text"] != biased["choices"][0]["text"]


async def test_a_model_that_does_not_fit_the_memory_budget_is_503_and_others_keep_working(
    async_client, smollm2, monkeypatch
):
    from inference import run
    from inference.engine import ModelCache

    monkeypatch.setattr(run, "_cache", ModelCache(budget_bytes=1000))
    response = await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO})
    assert response.status_code == 503
    assert (
        response.json()["error"]["code"] == "model_unavailable"
        and "memory budget" in response.json()["error"]["message"]
    )
    assert response["Retry-After"]
    run._cache.close()
    monkeypatch.undo()
    ok = await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert ok.status_code == 200


async def test_a_full_queue_is_503_with_retry_after(async_client, smollm2, settings):
    from core.redis import get_redis

    settings.MAX_QUEUE = 2
    get_redis().rpush(smollm2.queue, "a", "b")
    response = await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_full"
    assert response["Retry-After"] == "1"


async def test_n_choices_come_back_with_their_own_text_and_usage_counts_them_all(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "n": 3, "temperature": 1.0, "seed": 3, "max_tokens": 10}
    data = (await post(async_client, "/v1/chat/completions", body)).json()
    assert_schema("CreateChatCompletionResponse", data)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in data["choices"]}) > 1
    assert data["usage"]["completion_tokens"] <= 30 and data["usage"]["completion_tokens"] >= 3
    events = await sse_events(await post(async_client, "/v1/chat/completions", {**body, "stream": True}))
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_schema("CreateChatCompletionStreamResponse", chunk)
    streamed = {i: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i)
                for i in range(3)}  # fmt: skip
    assert streamed == {i: c["message"]["content"] for i, c in enumerate(data["choices"])}
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1, 2]


async def test_chat_logprobs_list_every_token_with_its_alternatives(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    data = (await post(async_client, "/v1/chat/completions", body)).json()
    assert_schema("CreateChatCompletionResponse", data)
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"]
    assert "".join(entry["token"] for entry in content) == data["choices"][0]["message"]["content"]
    assert all(len(entry["top_logprobs"]) == 2 and entry["logprob"] <= 0 for entry in content)
    events = await sse_events(await post(async_client, "/v1/chat/completions", {**body, "stream": True}))
    streamed = [entry for e in events[:-1] for entry in
                ((json.loads(e)["choices"][0].get("logprobs") or {}).get("content") or [])]  # fmt: skip
    assert streamed == content
    for e in events[:-1]:
        assert_schema("CreateChatCompletionStreamResponse", json.loads(e))


async def test_completion_logprobs_use_the_legacy_shape(async_client, smollm2):
    body = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 4, "logprobs": 2}
    data = (await post(async_client, "/v1/completions", body)).json()
    assert_schema("CreateCompletionResponse", data)
    logprobs = data["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == data["choices"][0]["text"]
    assert len(logprobs["token_logprobs"]) == 4 and all(len(t) == 2 for t in logprobs["top_logprobs"])
    tokens = logprobs["tokens"]
    assert logprobs["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    events = await sse_events(await post(async_client, "/v1/completions", {**body, "stream": True}))
    streamed = [json.loads(e)["choices"][0]["logprobs"] for e in events[:-1] if json.loads(e)["choices"][0]["logprobs"]]
    # each chunk's offsets count from the start of the whole text, as OpenAI's do (they were [0] in every chunk)
    assert [offset for chunk in streamed for offset in chunk["text_offset"]] == logprobs["text_offset"]


async def test_a_models_default_params_fill_what_the_request_leaves_out(async_client, smollm2):
    smollm2.default_params = {"max_tokens": 3, "temperature": 0}
    await smollm2.asave()
    data = (
        await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "ignore_eos": True})
    ).json()
    assert data["usage"]["completion_tokens"] == 3
    data = (await post(async_client, "/v1/chat/completions",
                       {"model": MODEL, "messages": HELLO, "ignore_eos": True, "max_tokens": 5})).json()  # fmt: skip
    assert data["usage"]["completion_tokens"] == 5  # the request wins


async def test_a_chat_template_override_replaces_the_files_template(async_client, smollm2):
    smollm2.chat_template_override = "{% for m in messages %}{{ m['content'] }}{% endfor %} =>"
    await smollm2.asave()
    data = (
        await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 1})
    ).json()
    assert data["usage"]["prompt_tokens"] <= 6  # "Say hello. =>" without any <|im_start|> scaffolding


async def test_json_object_output_always_parses(async_client, smollm2):
    question = 'Give a JSON object with the key "color" set to a color.'
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 100}  # fmt: skip
    data = (await post(async_client, "/v1/chat/completions", body)).json()
    assert data["choices"][0]["finish_reason"] == "stop", data
    assert isinstance(json.loads(data["choices"][0]["message"]["content"]), dict)


async def test_json_schema_output_validates_against_the_schema(async_client, smollm2):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}  # fmt: skip
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Invent a person."}], "max_tokens": 150,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                       "strict": True}}}  # fmt: skip
    for seed in range(3):
        data = (await post(async_client, "/v1/chat/completions", {**body, "seed": seed, "temperature": 1.0})).json()
        assert data["choices"][0]["finish_reason"] == "stop", data
        jsonschema.validate(json.loads(data["choices"][0]["message"]["content"]), schema)


async def test_an_integers_bounds_hold_in_the_answer(async_client, smollm2):
    # The converter ignored them: {"minimum": 5, "maximum": 7} gave 2008480212.
    bounds = {"a": {"minimum": 5, "maximum": 7}, "b": {"exclusiveMinimum": -4, "maximum": -1},
              "c": {"minimum": 1000}, "d": {"maximum": -20}}  # fmt: skip
    schema = {"type": "object", "properties": {k: {"type": "integer", **v} for k, v in bounds.items()},
              "required": list(bounds), "additionalProperties": False}  # fmt: skip
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give four numbers as JSON."}],
        "max_tokens": 80,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
    }
    for seed in range(3):
        data = (await post(async_client, "/v1/chat/completions", {**body, "seed": seed, "temperature": 1.0})).json()
        answer = json.loads(data["choices"][0]["message"]["content"])
        assert 5 <= answer["a"] <= 7 and -4 < answer["b"] <= -1 and answer["c"] >= 1000 and answer["d"] <= -20


async def test_an_integer_with_no_value_between_its_bounds_is_a_400(async_client, smollm2):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 3}}}
    body = {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_schema",
            "json_schema": {"name": "n", "schema": schema}}}  # fmt: skip
    response = await post(async_client, "/v1/chat/completions", body)
    assert response.status_code == 400, response.content
    assert "no integer" in response.json()["error"]["message"]


async def test_a_stream_waiting_in_the_queue_gets_pings_then_a_timeout_frame(async_client, smollm2, settings,
                                                                             monkeypatch):  # fmt: skip
    from inference import tasks

    monkeypatch.setattr(tasks.run_request, "apply_async", lambda *args, **kwargs: None)  # no worker picks it up
    settings.SSE_PING_SECONDS, settings.REQUEST_TIMEOUT = 1, 3
    response = await post(async_client, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True})
    assert response.status_code == 200
    raw = b"".join([part async for part in response.streaming_content]).decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert frames.count(": ping") >= 1
    assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "timeout"
    assert frames[-1] == "data: [DONE]"
