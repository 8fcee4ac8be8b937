"""An error after an Anthropic stream began is an `event: error` after the events already sent: the worker's stream
overflows the cap mid-answer (run in-process on the real model, then rendered from its events)."""

import json

import pytest
from asgiref.sync import async_to_sync

from api.anthropic.protocol import MessageCreateRequest
from api.anthropic.views import _events, _frames
from inference.models import RequestLog
from inference.run import request_run
from inference.serving import generation_replay
from tests.conftest import HELLO, MODEL

pytestmark = pytest.mark.django_db


async def _collect(frames) -> list[tuple[str, dict]]:
    events = []
    async for frame in frames:
        name, data = frame.removesuffix("\n\n").split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_an_error_after_the_stream_began_is_an_error_event(smollm2, settings):
    settings.STREAM_MAXLEN = 100
    body = MessageCreateRequest(model=MODEL, max_tokens=300, messages=HELLO, stream=True)
    neutral = body.to_generation().model_copy(update={"ignore_eos": True})  # a long answer, whatever the model says
    log = RequestLog.objects.create(request_id="overflow", endpoint="/v1/messages", model=MODEL)
    request_run(log_id=log.pk, payload={"generation": neutral.model_dump(mode="json")})
    generation = generation_replay("overflow", neutral)
    events = async_to_sync(_collect)(_frames(generation.stream, "req_overflow", _events(generation, body)))
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert names[-1] == "error" and "message_stop" not in names
    error = events[-1][1]
    assert error["type"] == "error" and error["request_id"] == "req_overflow"
    assert error["error"]["type"] == "invalid_request_error" and "MINERVA_STREAM_MAXLEN" in error["error"]["message"]
