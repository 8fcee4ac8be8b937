from celery import shared_task

from core.generation import GenerationRequest
from inference.models import RequestLog
from inference.run import request_run

from . import worker  # noqa: F401  (connects the worker's signals: the reaper)
from .services import response_events_keep, response_finish, response_started


@shared_task(name="minerva.run_response", ignore_result=True)
def run_response(log_id: int, payload: dict) -> None:
    """Run a stored response's generation on this worker, then record its outcome in the response, whether or not
    a client is still reading it."""
    request_id = RequestLog.objects.values_list("request_id", flat=True).get(pk=log_id)
    background = response_started(request_id=request_id)  # only a background response waits queued
    request_run(log_id=log_id, payload=payload)
    response_finish(request_id=request_id, body=GenerationRequest.model_validate(payload["generation"]))
    if background:
        response_events_keep(request_id=request_id)
