"""What Redis keeps of a request's stream: every event or an explicit error, and not for long once it is over."""

import threading
import time

import pytest
from asgiref.sync import async_to_sync

from api.protocol import ChatCompletionRequest
from api.views import collect_answer
from core.errors import MinervaError
from core.redis import get_redis
from inference.models import RequestLog
from inference.run import request_run
from inference.streams import FINISHED_TTL_SECONDS, RedisStepIO, TokenStream
from tests.conftest import HELLO, MODEL

pytestmark = pytest.mark.django_db


def run(request_id: str, **params) -> tuple[RequestLog, ChatCompletionRequest]:
    body = ChatCompletionRequest(model=MODEL, messages=HELLO, temperature=0, **params)
    log = RequestLog.objects.create(request_id=request_id, endpoint="/v1/chat/completions", model=MODEL)
    payload = {"generation": body.to_generation().model_dump(mode="json")}
    request_run(log_id=log.pk, payload=payload)
    log.refresh_from_db()
    return log, body


def test_a_stream_longer_than_the_cap_ends_with_an_explicit_error_and_never_loses_its_beginning(smollm2, settings):
    settings.STREAM_MAXLEN = 100
    log, body = run("long", max_tokens=300, ignore_eos=True)
    with pytest.raises(MinervaError) as refused:  # what a batch line reads its answer with
        async_to_sync(collect_answer)("long", body)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "stream_too_long", "max_tokens")
    events = [fields["event"] for _id, fields in get_redis().xrange(TokenStream("long").key)]
    assert events[:3] == ["accepted", "start", "token"] and events[-1] == "error" and "done" not in events
    assert len(events) <= 100
    assert (log.status, log.status_code, log.error_code) == ("failed", 400, "stream_too_long")
    assert log.completion_tokens < 300  # the worker stopped generating


def test_an_answer_within_the_cap_is_read_whole(smollm2, settings):
    settings.STREAM_MAXLEN = 1000
    log, body = run("whole", max_tokens=300, ignore_eos=True)
    answer = async_to_sync(collect_answer)("whole", body)
    assert answer["usage"]["completion_tokens"] == 300 and answer["choices"][0]["finish_reason"] == "length"
    assert log.status == "completed"


def test_a_finished_stream_that_was_read_expires_within_a_minute(smollm2, settings):
    _, body = run("done", max_tokens=5)
    async_to_sync(collect_answer)("done", body)
    assert 0 < get_redis().ttl(TokenStream("done").key) <= FINISHED_TTL_SECONDS < settings.STREAM_TTL


def test_a_cancelled_requests_keys_expire_within_a_minute_once_its_worker_is_done(smollm2):
    get_redis().set(TokenStream("gone").cancel_key, "1")
    log, _ = run("gone", max_tokens=5)
    assert log.status == "cancelled"
    assert 0 < get_redis().ttl(TokenStream("gone").cancel_key) <= FINISHED_TTL_SECONDS


def test_a_reader_already_waiting_gets_a_requests_start_and_first_token_in_one_read():
    # Redis wakes a blocked XREAD after the command that fed its stream: published outside one MULTI/EXEC, the view
    # would read `start` alone and its first token a round trip later.
    class Started:
        key = "together"

    stream, replies = TokenStream("together"), []
    reader = threading.Thread(target=lambda: replies.append(get_redis().xread({stream.key: "0"}, block=10_000)))
    blocked = get_redis().info("clients")["blocked_clients"]
    reader.start()
    deadline = time.monotonic() + 10
    while get_redis().info("clients")["blocked_clients"] <= blocked and time.monotonic() < deadline:
        time.sleep(0.01)
    events = [(Started, "start", {"prompt_tokens": 3}), (Started, "token", {"index": 0, "text": "Hi"})]
    RedisStepIO().step(events, [Started])
    reader.join(10)
    assert [fields["event"] for _id, fields in replies[0][0][1]] == ["start", "token"]


@pytest.mark.parametrize("kind", ["generation", "embedding", "detached generation"])
def test_a_reader_whose_client_leaves_cancels_the_request_unless_it_is_detached(kind):
    import asyncio

    from core.generation import GenerationRequest
    from inference.serving import Embedding, Generation

    async def leaving():
        raise asyncio.CancelledError  # the client went away while the view waited
        yield

    async def read() -> None:
        if kind == "embedding":
            await Embedding(kind, leaving()).collect()
        else:
            generation = Generation(kind, GenerationRequest(model=MODEL, messages=HELLO), leaving())
            generation.detached = kind == "detached generation"
            await generation.collect()

    with pytest.raises(asyncio.CancelledError):
        async_to_sync(read)()
    assert get_redis().get(TokenStream(kind).cancel_key) == (None if kind == "detached generation" else "client")
