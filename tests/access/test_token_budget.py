"""Tokens per minute are reserved when a request is admitted (its prompt estimate plus max_tokens) and settled to
what it really used when it ends, so concurrent requests cannot together pass a key's limit."""

import threading
import time

import httpx2 as httpx
import pytest

from access.services import key_create
from api.protocol import ChatCompletionRequest, CompletionRequest, CreateEmbeddingRequest
from core.redis import get_redis
from inference.models import RequestLog
from inference.services import embedding_token_budget, request_token_budget
from tests.conftest import HELLO, MODEL
from tests.test_faults import get_redis_for, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def bearer(raw: str) -> dict:
    return {"Authorization": f"Bearer {raw}"}


def window(redis, prefix: str) -> int:
    """The key's token count in the minute its requests were admitted in (the only token window it has)."""
    (key,) = redis.keys(f"minerva:rl:{prefix}:tok:*")
    return int(redis.get(key))


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_concurrent_requests_that_together_pass_a_keys_tpm_are_refused_at_admission(minerva_server):
    key, raw = key_create(name="budget", tpm=200)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    # Each reserves its prompt estimate plus 120 tokens, more than half of 200: only one fits, before and after
    # it settles (ignore_eos: it really uses about as much as it reserved).
    assert request_token_budget(body=ChatCompletionRequest(**body).to_generation(), n_ctx=4096) > 100
    replies: list[httpx.Response] = []
    start = threading.Barrier(6)

    def send() -> None:
        start.wait()
        replies.append(httpx.post(f"{minerva_server.base_url}/chat/completions", json=body, headers=bearer(raw),
                                  timeout=300))  # fmt: skip

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(r.status_code for r in replies) == [200] + [429] * 5, [r.text for r in replies]
    for refused in (r for r in replies if r.status_code == 429):
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["Retry-After"]) > 0
        assert refused.headers["x-ratelimit-limit-tokens"] == "200"
        assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 100  # the running request's reservation
    (ok,) = (r for r in replies if r.status_code == 200)
    row = wait_for(lambda: RequestLog.objects.filter(request_id=ok.headers["x-request-id"][4:], status="completed")
                   .first(), 30, "the admitted request's row was not finished")  # fmt: skip
    used = row.prompt_tokens + row.completion_tokens
    assert wait_for(lambda: window(get_redis_for(minerva_server), key.prefix) == used, 30, "not settled")


def test_after_completion_a_keys_minute_holds_the_tokens_used_not_the_reservation(client, smollm2):
    key, raw = key_create(name="settled", tpm=100_000)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 500, "temperature": 0}  # it stops long before 500
    reply = client.post("/v1/chat/completions", body, content_type="application/json", headers=bearer(raw))
    assert reply.status_code == 200
    usage = reply.json()["usage"]
    assert usage["completion_tokens"] < 500
    assert window(get_redis(), key.prefix) == usage["total_tokens"]


def test_a_running_requests_reservation_is_its_exact_prompt_not_the_views_byte_estimate(client, smollm2, monkeypatch):
    from inference import run

    settled: list[int] = []
    settle = run.tokens_settle
    monkeypatch.setattr(run, "tokens_settle", lambda *, reservation, tokens: settled.append(tokens) or settle(
        reservation=reservation, tokens=tokens))  # fmt: skip
    key, raw = key_create(name="exact", tpm=100_000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500, "temperature": 0}
    estimate = request_token_budget(body=ChatCompletionRequest(**body).to_generation(), n_ctx=4096)
    reply = client.post("/v1/chat/completions", body, content_type="application/json", headers=bearer(raw))
    usage = reply.json()["usage"]
    # "hi" is 2 bytes, but the template adds SmolLM2's system prompt and each message's markers: ~30 tokens.
    assert usage["prompt_tokens"] > estimate - 500 + 10
    assert settled == [usage["prompt_tokens"] + 500, usage["total_tokens"]]  # while it ran, then when it ended
    assert window(get_redis(), key.prefix) == usage["total_tokens"]


def test_a_successful_requests_remaining_tokens_header_counts_the_request_itself(client, smollm2):
    _, raw = key_create(name="remaining", tpm=100_000)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0}
    if time.time() % 60 > 50:  # the header counts the minute it is made in: start the request well inside one
        time.sleep(60.5 - time.time() % 60)
    first = client.post("/v1/chat/completions", body, content_type="application/json", headers=bearer(raw))
    # Tests run tasks in the view's thread: the request has ended and settled by the time its headers are made.
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100_000 - first.json()["usage"]["total_tokens"]


def test_a_request_without_max_tokens_reserves_the_models_context(smollm2):
    assert (
        request_token_budget(body=ChatCompletionRequest(model=MODEL, messages=HELLO).to_generation(), n_ctx=4096)
        == 4096
    )
    two = ChatCompletionRequest(model=MODEL, messages=HELLO, max_tokens=10, n=2).to_generation()
    assert request_token_budget(body=two, n_ctx=4096) == request_token_budget(body=two.model_copy(update={"n": 1}),
                                                                               n_ctx=4096) + 10  # fmt: skip
    assert (
        request_token_budget(
            body=CompletionRequest(model=MODEL, prompt=[1, 2, 3], max_tokens=4).to_generation(), n_ctx=4096
        )
        == 7
    )
    huge = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x" * 100_000}], max_tokens=1)
    huge = huge.to_generation()
    assert request_token_budget(body=huge, n_ctx=4096) == 4097  # the prompt cannot pass the context


def test_embedding_requests_reserve_their_inputs_tokens_and_settle_to_the_count(client, smollm2):
    key, raw = key_create(name="embedder", tpm=100)
    small = {"model": "all-minilm-l6-v2", "input": ["a few words", "hi"]}
    reply = client.post("/v1/embeddings", small, content_type="application/json", headers=bearer(raw))
    assert reply.status_code == 200, reply.json()
    assert window(get_redis(), key.prefix) == reply.json()["usage"]["prompt_tokens"] == 5 + 3
    big = {"model": "all-minilm-l6-v2", "input": ["word " * 100]}  # ~170 tokens estimated: more than is left
    assert embedding_token_budget(body=CreateEmbeddingRequest(**big).to_embedding(), n_ctx=512) > 100
    refused = client.post("/v1/embeddings", big, content_type="application/json", headers=bearer(raw))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert window(get_redis(), key.prefix) == 8
