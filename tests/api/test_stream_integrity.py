"""Streams lose nothing: multi-byte characters split across tokens, and readers that attach after the fact."""

import json

import pytest

from inference.streams import TokenStream
from tests.api.test_chat_completions import post, sse_events
from tests.conftest import MODEL

pytestmark = pytest.mark.django_db(transaction=True)

# Accents, CJK, an emoji with a skin-tone modifier, a flag: SmolLM2 spells these with byte tokens, so characters
# are split across tokens (and across stream chunks) and must be reassembled exactly.
TEXT = "héllo wörld ñ 世界 👋🏽 🇫🇷 ça va"


@pytest.mark.parametrize("text", [TEXT, 'a "quoted" back\\slash\nand a new line'], ids=["multi-byte", "escapes"])
async def test_text_forced_by_a_grammar_streams_identical_to_the_non_streamed_answer(async_client, smollm2, text):
    schema = {"type": "object", "properties": {"text": {"const": text}}, "required": ["text"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0,
            "max_tokens": 100, "response_format": response_format}  # fmt: skip
    plain = (await post(async_client, "/v1/chat/completions", body)).json()["choices"][0]["message"]["content"]
    events = await sse_events(await post(async_client, "/v1/chat/completions", {**body, "stream": True}))
    pieces = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1] if json.loads(e)["choices"]]
    streamed = "".join(p for p in pieces if p)
    assert json.loads(plain) == {"text": text}
    assert streamed == plain and "\ufffd" not in streamed
    assert sum(1 for p in pieces if p) > 5  # it really came in pieces


async def test_a_reader_that_attaches_after_the_request_finished_replays_every_event(async_client, smollm2):
    body = {"model": MODEL, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    response = await post(async_client, "/v1/chat/completions", body)
    request_id = response["x-request-id"].removeprefix("req_")
    replay = [event async for event in TokenStream(request_id).read()]
    kinds = [kind for kind, _ in replay]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    text = "".join(data["text"] for kind, data in replay if kind == "token")
    assert text == response.json()["choices"][0]["message"]["content"]
