"""Stored responses: created with their request, ended once by whoever sees the end first (the view that streams
the answer, or the worker that ran it, which folds the request's events into the row whether or not a client is
still there), cancelled, deleted, reaped when their worker died, pruned with the request log.

A stored response's generation runs as `minerva.run_response` (tasks.py): the ordinary `request_run`, then
`response_finish` on the same worker thread. So a background response needs no client and no web process: it
survives a daphne restart, and it is as durable as any queued request (Celery's acks_late)."""

import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError

from access.models import ApiKey
from core.errors import InvalidRequest, MinervaError, ServerError
from core.generation import GenerationRequest
from core.redis import get_redis
from inference.models import RequestLog
from inference.services import request_create
from inference.serving import Generation
from inference.streams import CANCEL_CLIENT, TokenStream

from .models import StoredResponse
from .output import OutputBuilder, response_error, response_object

logger = logging.getLogger(__name__)

RUN_RESPONSE = "minerva.run_response"  # the Celery task of a stored response's generation (tasks.py)
# How long after its request ended a response may stay unfinished before the reaper ends it: its worker's own
# fold takes milliseconds, so one still open a minute later lost its worker in between.
REAP_AFTER = timedelta(seconds=60)

Status = StoredResponse.Status


def response_create(*, response_id: str, request_id: str, api_key: ApiKey | None, model: str, params: dict,
                    input_items: list[dict], background: bool) -> StoredResponse:  # fmt: skip
    """Record a response about to be generated (its request is queued next, as `RUN_RESPONSE`)."""
    return StoredResponse.objects.create(
        id=response_id, request_id=request_id, api_key_prefix=api_key.prefix if api_key is not None else "",
        model=model[:255], status=Status.QUEUED if background else Status.IN_PROGRESS, background=background,
        previous_response_id=params.get("previous_response_id") or "", params=params, input_items=input_items,
    )  # fmt: skip


def response_queue(*, response_id: str, request_id: str, endpoint: str, body: GenerationRequest,
                   api_key: ApiKey | None, audit: dict, params: dict,
                   input_items: list[dict]) -> StoredResponse:  # fmt: skip
    """A background response: its row, then its request queued to run with no client waiting (a refusal, such as
    a full queue or an unknown model, leaves no row)."""
    row = response_create(response_id=response_id, request_id=request_id, api_key=api_key, model=body.model,
                          params=params, input_items=input_items, background=True)  # fmt: skip
    try:
        request_create(request_id=request_id, endpoint=endpoint, body=body, api_key=api_key, audit=audit,
                       task=RUN_RESPONSE)  # fmt: skip
    except BaseException:
        row.delete()
        raise
    return row


def response_discard(*, response_id: str) -> None:
    """Remove a response whose request was refused before any output (context length, a full queue): none was made."""
    StoredResponse.objects.filter(pk=response_id).delete()


def response_record(*, response_id: str, result: dict) -> bool:
    """Write a response's outcome (OutputBuilder.result() or .failed()) unless another writer already ended it;
    whether this call did."""
    return bool(StoredResponse.objects.filter(pk=response_id, status__in=StoredResponse.ACTIVE).update(
        **result, completed_at=timezone.now()
    ))  # fmt: skip


def response_started(*, request_id: str) -> bool:
    """A worker took the response's request: a queued (background) response is in progress. Whether it was one."""
    return bool(StoredResponse.objects.filter(request_id=request_id, status=Status.QUEUED).update(
        status=Status.IN_PROGRESS))  # fmt: skip


def response_events_keep(*, request_id: str) -> None:
    """Keep a background response's events for MINERVA_STREAM_TTL after it ended (not the minute other requests'
    keep), so that its client can stream it again (GET /v1/responses/{id}?stream=true)."""
    try:
        TokenStream(request_id).finished(keep=settings.STREAM_TTL)
    except RedisError:
        logger.warning("could not keep the events of request %s", request_id, exc_info=True)


def response_finish(*, request_id: str, body: GenerationRequest) -> None:
    """On the worker, once its request has ended: fold the request's events into its response, if nobody has ended
    it yet. The stream holds every event by now, so this reads it at once and never waits."""
    row = StoredResponse.objects.filter(request_id=request_id, status__in=StoredResponse.ACTIVE).first()
    log = RequestLog.objects.filter(request_id=request_id).first()
    if row is None or log is None or log.status in (RequestLog.Status.QUEUED, RequestLog.Status.RUNNING):
        return  # ended already, or not ended here (a redelivered message): its own worker or the reaper ends it
    try:
        events = TokenStream(request_id).events()
    except RedisError:
        logger.warning("could not read the events of response %s", row.id, exc_info=True)
        events = []
    response_record(response_id=row.id, result=async_to_sync(_fold)(row.id, body, events, log))


async def _fold(response_id: str, body: GenerationRequest, events: list[tuple[str, dict]], log: RequestLog) -> dict:
    builder = OutputBuilder(response_id)
    if not any(event in ("done", "error") for event, _ in events):
        if log.status != RequestLog.Status.CANCELLED:  # its stream is gone (Redis restarted, or it expired)
            return builder.failed(_lost(log))
        # A cancelled generation publishes nothing more: end what it wrote as the client's end would have.
        events = [*events, ("done", {"index": 0, "finish_reason": "cancelled", "prompt_tokens": log.prompt_tokens,
                                     "completion_tokens": log.completion_tokens,
                                     "cached_tokens": log.cached_tokens})]  # fmt: skip
    generation = Generation(log.request_id, body, _replay(events))
    try:
        async for delta in generation.deltas():
            builder.feed(delta)
    except MinervaError as exc:
        return builder.failed(exc)
    builder.finish()
    return builder.result(generation.usage)


async def _replay(events: list[tuple[str, dict]]) -> AsyncIterator[tuple[str, dict]]:
    for event in events:
        yield event


def _lost(log: RequestLog) -> MinervaError:
    if log.status == RequestLog.Status.FAILED and log.error_code:
        error = MinervaError(f"The response's generation failed ({log.error_code}).", code=log.error_code)
        error.status = log.status_code if log.status_code and log.status_code >= 400 else 500
        return error
    return ServerError("The response's output was lost before it was recorded; create it again.")


def response_cancel(*, response: StoredResponse) -> StoredResponse:
    """Cancel a background response: it ends `cancelled` now, and its worker stops at its next token (or never
    starts it)."""
    if not response.background:
        raise InvalidRequest("Only a response created with background: true can be cancelled.", param="response_id")
    if response.status in StoredResponse.ACTIVE:
        _stop(response)
        StoredResponse.objects.filter(pk=response.pk, status__in=StoredResponse.ACTIVE).update(
            status=Status.CANCELLED, completed_at=timezone.now()
        )
        response.refresh_from_db()
    elif response.status != Status.CANCELLED:
        raise InvalidRequest(f"Cannot cancel a response that is {response.status}.", param="response_id")
    return response


def response_delete(*, response: StoredResponse) -> None:
    """Delete a stored response; one still running is stopped first."""
    if response.status in StoredResponse.ACTIVE:
        _stop(response)
    response.delete()


def _stop(response: StoredResponse) -> None:
    # The cancel flag a disconnecting client sets: the worker drops the request at its next step, or before it runs.
    get_redis().set(TokenStream(response.request_id).cancel_key, CANCEL_CLIENT, ex=settings.STREAM_TTL, nx=True)


def response_json(response: StoredResponse) -> dict:
    """The Response object of a stored response."""
    return response_object(
        response_id=response.id, created_at=_unix(response.created), model=response.model, params=response.params,
        status=response.status, output=response.output, usage=response.usage, error=response.error,
        incomplete_reason=response.incomplete_reason, completed_at=_unix(response.completed_at),
    )  # fmt: skip


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def responses_reap() -> None:
    """Run by every worker every few seconds: end the responses that nobody will end. A response whose request
    ended a minute ago without it (its worker died between the two), or whose request was never recorded (its view
    died before queueing it), fails; one whose request was cancelled is cancelled."""
    stale = timezone.now() - REAP_AFTER
    for row in StoredResponse.objects.filter(status__in=StoredResponse.ACTIVE, created__lt=stale).only(
        "id", "request_id"
    ):
        log = RequestLog.objects.filter(request_id=row.request_id).only("status", "finished", "error_code",
                                                                        "status_code").first()  # fmt: skip
        if log is not None and (log.finished is None or log.finished > stale):
            continue
        if log is not None and log.status == RequestLog.Status.CANCELLED:
            result = {"status": Status.CANCELLED}
        else:
            error = _lost(log) if log is not None else ServerError("The response's request was never queued.")
            result = {"status": Status.FAILED, "error": response_error(error)}
        if response_record(response_id=row.id, result=result):
            logger.warning("response %s ended by the reaper: %s", row.id, result["status"])


def responses_prune(*, cutoff: datetime, **kwargs) -> int:
    """Delete stored responses created before `cutoff` (the request log's retention); return how many went."""
    deleted, _ = StoredResponse.objects.filter(created__lt=cutoff).delete()
    if deleted:
        logger.info("pruned %d stored responses", deleted)
    return deleted
