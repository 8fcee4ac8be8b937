"""Stored responses ended on the worker (the fold of a request's events), by the reaper when nobody else will, and
their retention (prune_logs)."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from core.generation import GenerationRequest
from inference.models import RequestLog
from inference.streams import TokenStream
from responses.models import StoredResponse
from responses.services import response_create, response_finish, responses_reap

pytestmark = pytest.mark.django_db(transaction=True)

LONG_AGO = timedelta(minutes=5)


def stored(name: str, *, log_status: str | None, ended: timedelta = LONG_AGO, **log) -> StoredResponse:
    """A response still in progress, created long ago, whose request is in `log_status` (None: no request row)."""
    row = response_create(response_id=f"resp_{name}", request_id=name, api_key=None, model="m", params={},
                          input_items=[], background=True)  # fmt: skip
    StoredResponse.objects.filter(pk=row.pk).update(created=timezone.now() - LONG_AGO, status="in_progress")
    if log_status is not None:
        finished = None if log_status in ("queued", "running") else timezone.now() - ended
        RequestLog.objects.create(request_id=name, endpoint="/v1/responses", status=log_status, finished=finished,
                                  **log)  # fmt: skip
    return row


def test_the_reaper_ends_responses_whose_worker_died_before_it_could_and_leaves_the_rest():
    stored("lost", log_status="failed", error_code="worker_lost", status_code=500)
    stored("cancelled", log_status="cancelled")
    stored("never_queued", log_status=None)
    stored("completed", log_status="completed")  # its worker died between the request's row and the response's
    stored("just_ended", log_status="completed", ended=timedelta(seconds=1))  # its worker records it now
    stored("running", log_status="running")
    responses_reap()
    rows = {row.request_id: row for row in StoredResponse.objects.all()}
    assert rows["lost"].status == "failed" and rows["lost"].error["code"] == "server_error"
    assert "worker_lost" in rows["lost"].error["message"]
    assert rows["cancelled"].status == "cancelled"
    assert rows["never_queued"].status == "failed" and rows["completed"].status == "failed"
    assert rows["just_ended"].status == "in_progress" and rows["running"].status == "in_progress"


def test_prune_logs_deletes_stored_responses_past_the_retention(settings):
    settings.LOG_RETENTION_DAYS = 30
    old, new = stored("old", log_status="completed"), stored("new", log_status="completed")
    StoredResponse.objects.filter(pk=old.pk).update(created=timezone.now() - timedelta(days=31))
    call_command("prune_logs")
    assert list(StoredResponse.objects.values_list("id", flat=True)) == [new.id]


def test_the_worker_folds_a_cancelled_requests_stream_into_what_it_had_written():
    stored("partial", log_status="cancelled", prompt_tokens=9, completion_tokens=2)
    stream = TokenStream("partial")
    stream.publish("accepted", worker="w")
    stream.publish("start", prompt_tokens=9, cached_tokens=0)
    stream.publish("token", index=0, text="Hel")
    stream.publish("token", index=0, text="lo")
    response_finish(request_id="partial", body=GenerationRequest(model="m", messages=[]))
    row = StoredResponse.objects.get(request_id="partial")
    assert row.status == "cancelled" and row.usage["output_tokens"] == 2
    assert [(item["type"], item["status"], item["content"][0]["text"]) for item in row.output] == [
        ("message", "incomplete", "Hello")
    ]


def test_a_finished_request_whose_stream_is_gone_fails_rather_than_guessing():
    stored("gone", log_status="completed")
    response_finish(request_id="gone", body=GenerationRequest(model="m", messages=[]))
    row = StoredResponse.objects.get(request_id="gone")
    assert row.status == "failed" and row.output == [] and row.error["code"] == "server_error"
