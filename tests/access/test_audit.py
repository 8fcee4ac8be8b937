"""The request history: what a log row records (and never records), the admin's totals and CSV, the history
API for staff keys, retention."""

import json
from datetime import timedelta

import pytest
from celery.signals import task_prerun
from django.core import serializers
from django.core.management import call_command
from django.utils import timezone

from access.models import ApiKey
from access.services import key_create
from core.redis import get_redis
from inference.models import RequestLog
from tests.conftest import HELLO, MODEL

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 0}


def bearer(raw: str) -> dict:
    return {"Authorization": f"Bearer {raw}"}


def test_a_log_row_has_exact_token_counts_and_who_asked_but_no_content_by_default(client, smollm2, settings):
    settings.AUTH = "on"
    key, raw = key_create(name="ci")
    response = client.post("/v1/chat/completions", CHAT, content_type="application/json",
                           headers=bearer(raw) | {"User-Agent": "OpenAI/Python 3.51", "X-Stainless-Retry-Count": "2"},
                           REMOTE_ADDR="10.1.2.3")  # fmt: skip
    usage = response.json()["usage"]
    row = RequestLog.objects.get(request_id=response["x-request-id"].removeprefix("req_"))
    assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert row.cached_tokens == usage["prompt_tokens_details"]["cached_tokens"]
    assert row.finish_reason == response.json()["choices"][0]["finish_reason"]
    assert (row.api_key_prefix, row.client_ip, row.user_agent, row.retry_count) == (
        key.prefix, "10.1.2.3", "OpenAI/Python 3.51", 2)  # fmt: skip
    assert row.request["max_tokens"] == 5 and "messages" not in row.request
    assert row.prompt is None and row.completion is None


def test_content_is_stored_only_with_log_content_on(client, smollm2, settings):
    settings.LOG_CONTENT = True
    response = client.post("/v1/chat/completions", CHAT, content_type="application/json")
    row = RequestLog.objects.get(request_id=response["x-request-id"].removeprefix("req_"))
    assert row.prompt == HELLO
    assert row.completion == [response.json()["choices"][0]["message"]["content"]]


def test_a_canary_key_never_appears_outside_its_hash(client, smollm2, settings):
    settings.AUTH, settings.LOG_CONTENT = "on", True
    _, canary = key_create(name="canary")
    task_args = []

    def remember(sender=None, args=None, kwargs=None, **_):
        task_args.append(json.dumps([args, kwargs], default=str))

    task_prerun.connect(remember)
    try:
        for body in (CHAT, {**CHAT, "stream": True}):
            response = client.post(
                "/v1/chat/completions", body, content_type="application/json", headers=bearer(canary)
            )
            assert response.status_code == 200
            assert b"[DONE]" in b"".join(response) if body.get("stream") else response.json()["usage"]
        client.get("/v1/models", headers=bearer(canary))
        client.get("/v1/models", headers=bearer(canary[:-2]))  # a wrong key is not logged either
    finally:
        task_prerun.disconnect(remember)
    assert len(task_args) == 2 and not any(canary in a or canary[:-2] in a for a in task_args)
    rows = serializers.serialize("json", [*RequestLog.objects.all(), *ApiKey.objects.all()])
    assert canary not in rows and canary[:-2] not in rows
    redis = get_redis()
    readers = {"string": redis.get, "hash": redis.hgetall, "stream": redis.xrange, "set": redis.smembers,
               "list": lambda name: redis.lrange(name, 0, -1),
               "zset": lambda name: redis.zrange(name, 0, -1)}  # fmt: skip
    for name in redis.scan_iter("*"):
        dump = readers[redis.type(name)](name)
        assert canary not in f"{name}{dump}" and canary[:-2] not in f"{name}{dump}"


def test_the_admin_shows_totals_per_model_and_key_and_exports_csv(admin_client):
    for i, prefix in enumerate(["sk-mnrv-aaaa1111", "sk-mnrv-aaaa1111", "sk-mnrv-bbbb2222"]):
        RequestLog.objects.create(request_id=f"r{i}", endpoint="/v1/chat/completions", model=MODEL, status_code=200,
                                  api_key_prefix=prefix, prompt_tokens=10, completion_tokens=i + 1)  # fmt: skip
    page = admin_client.get("/admin/inference/requestlog/?api_key_prefix=sk-mnrv-aaaa1111").content.decode()
    assert f'<tr class="total-model"><td>{MODEL}</td><td>2</td><td>20</td><td>3</td></tr>' in page
    assert '<tr class="total-key"><td>sk-mnrv-aaaa1111</td><td>2</td><td>20</td><td>3</td></tr>' in page
    assert "sk-mnrv-bbbb2222</td>" not in page
    pks = list(RequestLog.objects.values_list("pk", flat=True))
    response = admin_client.post("/admin/inference/requestlog/", {"action": "export_csv", "_selected_action": pks})
    lines = response.content.decode().splitlines()
    assert response["Content-Type"] == "text/csv" and len(lines) == 4
    assert lines[0].startswith("created,request_id,endpoint") and any(",r2,/v1/chat/completions," in x for x in lines)


def test_the_history_api_is_for_staff_keys_only(client):
    _, staff = key_create(name="ops", staff=True)
    _, plain = key_create(name="app")
    RequestLog.objects.create(request_id="abc", endpoint="/v1/completions", model=MODEL, status_code=200,
                              api_key_prefix="sk-mnrv-aaaa1111", prompt_tokens=7, completion_tokens=3)  # fmt: skip
    RequestLog.objects.create(request_id="def", endpoint="/v1/models", model="", status_code=200)
    for path in ("/minerva/api/requests", "/minerva/api/requests/abc", "/minerva/api/usage", "/minerva/api/schema"):
        assert client.get(path).status_code == 401, path
        denied = client.get(path, headers=bearer(plain))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "staff_key_required", path
    listing = client.get("/minerva/api/requests?model=" + MODEL, headers=bearer(staff)).json()
    assert listing["count"] == 1 and listing["results"][0]["request_id"] == "abc"
    assert client.get("/minerva/api/requests?limit=1", headers=bearer(staff)).json()["next"]
    assert client.get("/minerva/api/requests/req_abc", headers=bearer(staff)).json()["prompt_tokens"] == 7
    assert client.get("/minerva/api/requests/nope", headers=bearer(staff)).json()["error"]["code"] == "not_found"
    usage = client.get("/minerva/api/usage", headers=bearer(staff)).json()
    assert {"day": str(timezone.now().date()), "api_key": "sk-mnrv-aaaa1111", "model": MODEL, "requests": 1,
            "prompt_tokens": 7, "completion_tokens": 3} in usage  # fmt: skip
    schema = client.get("/minerva/api/schema?format=json", headers=bearer(staff)).json()
    assert {"/minerva/api/requests", "/minerva/api/requests/{request_id}", "/minerva/api/usage"} <= set(schema["paths"])


def test_prune_logs_deletes_rows_past_the_retention(settings):
    settings.LOG_RETENTION_DAYS = 30
    old = RequestLog.objects.create(request_id="old", endpoint="/v1/models", status_code=200)
    RequestLog.objects.filter(pk=old.pk).update(created=timezone.now() - timedelta(days=31))
    RequestLog.objects.create(request_id="new", endpoint="/v1/models", status_code=200)
    call_command("prune_logs")
    assert list(RequestLog.objects.values_list("request_id", flat=True)) == ["new"]
