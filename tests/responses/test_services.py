"""Stored responses that nobody else will end (the reaper) and their retention (prune_logs)."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from inference.models import RequestLog
from responses.models import StoredResponse
from responses.services import response_create, responses_reap

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
