"""Bad input gets the OpenAI error object with the right status, and is logged exactly once."""

import json

import pytest

from inference.engine import llama as engine_llama
from inference.models import RequestLog
from tests.conftest import HELLO, MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
LONG = "hello " * 9000  # ~9000 tokens: more than SmolLM2's 8192-token context

# (name, method, path, raw body, status, error type, code, param)
CASES = [
    ("malformed JSON", "post", CHAT, b'{"model": ', 400, "invalid_request_error", None, None),
    ("not an object", "post", CHAT, b"[1, 2]", 400, "invalid_request_error", None, None),
    ("invalid UTF-8", "post", CHAT, b'{"model": "\xff"}', 400, "invalid_request_error", None, None),
    ("missing messages", "post", CHAT, {"model": MODEL}, 400, "invalid_request_error", None, "messages"),
    ("missing model", "post", CHAT, {"messages": HELLO}, 400, "invalid_request_error", None, "model"),
    ("empty messages", "post", CHAT, {"model": MODEL, "messages": []}, 400, "invalid_request_error", None, "messages"),
    ("bad role", "post", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     400, "invalid_request_error", None, "messages[0].role"),
    ("string temperature", "post", CHAT, {"model": MODEL, "messages": HELLO, "temperature": "0.5"},
     400, "invalid_request_error", None, "temperature"),
    ("temperature too high", "post", CHAT, {"model": MODEL, "messages": HELLO, "temperature": 3},
     400, "invalid_request_error", None, "temperature"),
    ("zero max_tokens", "post", CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 0},
     400, "invalid_request_error", None, "max_tokens"),
    ("float max_tokens", "post", CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 1.5},
     400, "invalid_request_error", None, "max_tokens"),
    ("stream not a bool", "post", CHAT, {"model": MODEL, "messages": HELLO, "stream": "yes"},
     400, "invalid_request_error", None, "stream"),
    ("empty stop", "post", CHAT, {"model": MODEL, "messages": HELLO, "stop": [""]},
     400, "invalid_request_error", None, "stop"),
    ("image input", "post", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, "invalid_request_error", None, "messages[0].content[0]"),
    ("lone surrogate", "post", CHAT, b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", '
     b'"content": "\\ud800"}]}', 400, "invalid_request_error", None, None),
    ("deep nesting", "post", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_request_error", None, None),
    ("unknown model", "post", CHAT, {"model": "no-such-model", "messages": HELLO},
     404, "invalid_request_error", "model_not_found", "model"),
    ("NUL in model", "post", CHAT, {"model": "a\u0000b", "messages": HELLO},
     404, "invalid_request_error", "model_not_found", "model"),
    ("unknown model retrieved", "get", "/v1/models/nope", None, 404, "invalid_request_error", "model_not_found",
     "model"),
    ("GET on a POST endpoint", "get", CHAT, None, 405, "invalid_request_error", "method_not_allowed", None),
    ("DELETE on models", "delete", "/v1/models", None, 405, "invalid_request_error", "method_not_allowed", None),
    ("unknown /v1 path", "post", "/v1/nope", {}, 404, "invalid_request_error", "not_found", None),
    ("unknown /minerva/api path", "get", "/minerva/api/models", None, 404, "invalid_request_error", "not_found", None),
    ("NUL in the path", "options", "/v1/%00/x%F8", None, 404, "invalid_request_error", "not_found", None),
    ("trailing slash", "post", CHAT + "/", {"model": MODEL, "messages": HELLO},
     404, "invalid_request_error", "not_found", None),
    ("prompt over the context", "post", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG}]},
     400, "invalid_request_error", "context_length_exceeded", "messages"),
    ("prompt over the context, streaming", "post", CHAT,
     {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": LONG}]},
     400, "invalid_request_error", "context_length_exceeded", "messages"),
    ("completion prompt over the context", "post", "/v1/completions", {"model": MODEL, "prompt": LONG},
     400, "invalid_request_error", "context_length_exceeded", "prompt"),
    ("several prompts", "post", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]},
     400, "invalid_request_error", None, "prompt"),
    ("bad keep_alive", "post", CHAT, {"model": MODEL, "messages": HELLO, "keep_alive": "soon"},
     400, "invalid_request_error", None, "keep_alive"),
    ("bad logit_bias key", "post", CHAT, {"model": MODEL, "messages": HELLO, "logit_bias": {"hello": 1}},
     400, "invalid_request_error", None, "logit_bias"),
    ("logit_bias outside the vocabulary", "post", CHAT,
     {"model": MODEL, "messages": HELLO, "logit_bias": {"49152": -100}},
     400, "invalid_request_error", None, "logit_bias"),
    ("json_schema format without its schema", "post", CHAT,
     {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_schema"}},
     400, "invalid_request_error", None, "response_format.json_schema"),
    ("stream_options without stream", "post", CHAT,
     {"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}},
     400, "invalid_request_error", None, "stream_options"),
    ("top_logprobs without logprobs", "post", CHAT, {"model": MODEL, "messages": HELLO, "top_logprobs": 2},
     400, "invalid_request_error", None, "top_logprobs"),
    ("n over the slots", "post", CHAT, {"model": MODEL, "messages": HELLO, "n": 9},
     400, "invalid_request_error", None, "n"),
    ("unsupported schema keyword", "post", CHAT, {"model": MODEL, "messages": HELLO, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}},
     400, "invalid_request_error", None, "response_format.json_schema"),
    ("unknown response_format type", "post", CHAT, {"model": MODEL, "messages": HELLO,
     "response_format": {"type": "yaml"}}, 400, "invalid_request_error", None, "response_format.type"),
    ("echo", "post", "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True},
     400, "invalid_request_error", None, "echo"),
    ("token id outside the vocabulary", "post", "/v1/completions", {"model": MODEL, "prompt": [10**9]},
     400, "invalid_request_error", None, "prompt"),
]  # fmt: skip


async def send(client, method: str, path: str, body):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body)
    if method == "post":
        return await client.post(path, data, content_type="application/json")
    return await getattr(client, method)(path)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "type_", "code", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_bad_input_gets_an_openai_error(async_client, smollm2, method, path, body, status, type_, code, param):
    response = await send(async_client, method, path, body)
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    error = response.json()
    assert_schema("ErrorResponse", error)
    assert (error["error"]["type"], error["error"]["code"], error["error"]["param"]) == (type_, code, param)
    assert error["error"]["message"]
    request_id = response["x-request-id"].removeprefix("req_")
    rows = [row async for row in RequestLog.objects.filter(request_id=request_id)]
    assert [(r.status, r.status_code) for r in rows] == [("failed", status)]


async def test_context_length_error_says_the_limit(async_client, smollm2):
    response = await send(async_client, "post", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG}]})
    assert response.json()["error"]["message"].startswith("This model's maximum context length is 8192 tokens.")


async def test_a_body_over_the_limit_is_413(async_client, smollm2, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = await send(async_client, "post", CHAT, {"model": MODEL, "messages": HELLO, "user": "x" * 2000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_max_tokens_beyond_the_context_is_clamped_not_refused(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 10**12, "temperature": 0}
    response = await send(async_client, "post", CHAT, body)
    assert response.status_code == 200


async def test_an_internal_error_is_a_generic_500_and_the_worker_lives_on(async_client, smollm2, monkeypatch):
    def explode(self, messages):
        raise RuntimeError("secret detail /home/someone/model.gguf")

    monkeypatch.setattr(engine_llama.LoadedModel, "chat_prompt", explode)
    response = await send(async_client, "post", CHAT, {"model": MODEL, "messages": HELLO})
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "secret" not in response.content.decode() and "Traceback" not in response.content.decode()
    monkeypatch.undo()
    again = await send(async_client, "post", CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert again.status_code == 200


async def test_unknown_fields_are_ignored(async_client, smollm2):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "some_future_field": {"a": 1}}
    assert (await send(async_client, "post", CHAT, body)).status_code == 200


async def test_nul_characters_are_dropped_from_the_log_not_refused(async_client, smollm2, settings):
    settings.LOG_CONTENT = True  # PostgreSQL's text and jsonb cannot hold U+0000; SQLite can: both must log the same
    body = {"model": MODEL, "prompt": "a\u0000b", "max_tokens": 1, "stop": ["\u0000"], "user": "x\u0000y"}
    response = await send(async_client, "post", "/v1/completions", body)
    assert response.status_code == 200, response.content
    row = await RequestLog.objects.aget(request_id=response["x-request-id"].removeprefix("req_"))
    assert (row.prompt, row.request["stop"], row.request["user"]) == ("ab", [""], "xy")


async def test_listing_models_is_logged_once(async_client, smollm2):
    response = await async_client.get("/v1/models")
    assert response.status_code == 200
    request_id = response["x-request-id"].removeprefix("req_")
    assert await RequestLog.objects.filter(request_id=request_id, status_code=200).acount() == 1


@pytest.mark.parametrize(
    ("part", "what"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "images"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ],
    ids=["image", "audio"],
)
async def test_images_and_audio_are_refused_saying_what_the_model_lacks(async_client, smollm2, part, what):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    response = await send(async_client, "post", CHAT, {"model": MODEL, "messages": messages})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"The model {MODEL} does not support {what}."
    assert response.json()["error"]["param"] == "messages[0].content[1]"


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 10**9 }}",
        "{{ raise_exception.__globals__ }}",
        "{% for i in range(10**9) %}{% endfor %}",
        "{% set s = 'x' * 1000000 %}{{ s" + " ~ s" * 99 + " }}",
        "{{ 'x' | center(100000000) }}",
        "{{ '{:>100000000}'.format('x') }}",
    ],
    ids=["huge string", "globals", "huge loop", "~", "|center", "str.format"],
)
async def test_a_hostile_chat_template_is_a_400_and_the_worker_keeps_serving(async_client, smollm2, template):
    smollm2.chat_template_override = template
    await smollm2.asave()
    response = await send(async_client, "post", CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("The chat template")
    smollm2.chat_template_override = ""
    await smollm2.asave()
    response = await send(async_client, "post", CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert response.status_code == 200


@pytest.mark.parametrize("surface", ["chat", "completions", "embeddings", "ollama chat", "ollama generate",
                                     "ollama embed", "ollama embeddings"])  # fmt: skip
def test_every_request_that_takes_keep_alive_reads_durations_and_refuses_other_words(surface):
    from pydantic import ValidationError

    from api import protocol
    from api.ollama import protocol as ollama

    request, body = {
        "chat": (protocol.ChatCompletionRequest, {"model": MODEL, "messages": HELLO}),
        "completions": (protocol.CompletionRequest, {"model": MODEL, "prompt": "Hi"}),
        "embeddings": (protocol.CreateEmbeddingRequest, {"model": MODEL, "input": "Hi"}),
        "ollama chat": (ollama.ChatRequest, {"model": MODEL, "messages": HELLO}),
        "ollama generate": (ollama.GenerateRequest, {"model": MODEL, "prompt": "Hi"}),
        "ollama embed": (ollama.EmbedRequest, {"model": MODEL, "input": "Hi"}),
        "ollama embeddings": (ollama.EmbeddingsRequest, {"model": MODEL, "prompt": "Hi"}),
    }[surface]
    for duration in ("5m", " 1h ", "90", 300, -1, 0, None):
        assert request.model_validate(body | {"keep_alive": duration}).keep_alive == duration
    with pytest.raises(ValidationError) as refused:
        request.model_validate(body | {"keep_alive": "soon"})
    assert refused.value.errors()[0]["loc"] == ("keep_alive",) and "'5m'" in str(refused.value)
