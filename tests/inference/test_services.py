"""request_run on its own: what the worker does with a request it is handed."""

import base64
import json

import pytest

from api.protocol import ChatCompletionRequest
from core.redis import get_redis
from inference.models import RequestLog
from inference.run import _model_row, request_run
from inference.streams import TokenStream
from tests.conftest import HELLO, MODEL

pytestmark = pytest.mark.django_db


def queued(request_id: str) -> tuple[RequestLog, dict]:
    body = ChatCompletionRequest(model=MODEL, messages=HELLO, max_tokens=5)
    log = RequestLog.objects.create(request_id=request_id, endpoint="/v1/chat/completions", model=MODEL)
    return log, {"generation": body.to_generation().model_dump(mode="json")}


def events(request_id: str) -> list[str]:
    return [fields["event"] for _id, fields in get_redis().xrange(TokenStream(request_id).key)]


def test_a_request_cancelled_while_queued_never_runs(smollm2):
    log, payload = queued("q1")
    get_redis().set(TokenStream("q1").cancel_key, "1")
    request_run(log_id=log.pk, payload=payload)
    log.refresh_from_db()
    assert (log.status, log.status_code, log.completion_tokens) == ("cancelled", 499, 0)
    assert events("q1") == []


def test_a_request_delivered_twice_runs_once(smollm2):
    log, payload = queued("q2")
    request_run(log_id=log.pk, payload=payload)
    first = events("q2")
    assert first[:2] == ["accepted", "start"] and first[-1] == "done"
    request_run(log_id=log.pk, payload=payload)
    assert events("q2") == first


def test_the_stream_expires_after_the_ttl(smollm2, settings):
    log, payload = queued("q3")
    request_run(log_id=log.pk, payload=payload)
    assert 0 < get_redis().ttl(TokenStream("q3").key) <= settings.STREAM_TTL


def test_the_worker_reuses_a_models_row_while_its_version_is_the_one_the_view_saw(smollm2, django_assert_num_queries):
    first = _model_row(MODEL, smollm2.updated.isoformat())
    with django_assert_num_queries(0):
        assert _model_row(MODEL, smollm2.updated.isoformat()) is first
    smollm2.default_params = {"temperature": 0.25}
    smollm2.save()  # every change moves `updated`: the view queues the next request with the new version
    with django_assert_num_queries(1):
        changed = _model_row(MODEL, smollm2.updated.isoformat())
    assert changed.default_params == {"temperature": 0.25}
    with django_assert_num_queries(1):  # without a version (a message queued by an older view): always read
        assert _model_row(MODEL).default_params == {"temperature": 0.25}


def test_a_queued_message_carries_the_body_but_its_headers_name_only_the_row(
    smollm2, monkeypatch, django_capture_on_commit_callbacks
):
    """Monitoring and worker logs show a task's argsrepr: it must not repeat the prompt."""
    from celery import current_app

    from inference import services

    monkeypatch.setitem(current_app.conf, "task_always_eager", False)
    monkeypatch.setattr(services, "model_servable_check", lambda model: None)  # no worker: the message stays queued
    body = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "a secret prompt"}])
    with django_capture_on_commit_callbacks(execute=True):
        log = services.request_create(request_id="q5", endpoint="/v1/chat/completions", body=body.to_generation())
    [raw] = get_redis().lrange(smollm2.queue, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["argsrepr"] == f"[{log.pk}, {{...}}]"
    assert "a secret prompt" not in json.dumps(message["headers"])
    assert "a secret prompt" in base64.b64decode(message["body"]).decode()
