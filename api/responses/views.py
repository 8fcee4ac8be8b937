"""The OpenAI Responses API (/v1/responses): thin async views like the chat ones. Creating a response parses the
request, builds the conversation (a previous response's items and output, then the new input), hands the neutral
request to inference.serving, and renders its deltas with responses.output's builder: one Response object, or typed
server-sent events (`event: response.output_text.delta` + `data: {..., "sequence_number": n}`). A stored response
is recorded by this view when it ends here, and by its worker in any case (responses/services.py)."""

import json
import logging
import time
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from access.models import ApiKey
from core.errors import InvalidRequest, MinervaError
from core.generation import GenerationRequest
from inference.serving import Generation, generation_start
from inference.streams import TokenStream
from responses.models import StoredResponse
from responses.output import OutputBuilder, response_object
from responses.selectors import response_get, response_input_items
from responses.services import (
    RUN_RESPONSE,
    response_cancel,
    response_create,
    response_delete,
    response_discard,
    response_json,
    response_queue,
    response_record,
)

from ..decorators import openai_view, parse_body
from ..sse import PING
from .protocol import CreateResponse, conversation

logger = logging.getLogger(__name__)


@openai_view(methods=("POST",))
async def create_response(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, CreateResponse)
    body.check()
    response_id = f"resp_{request.request_id}"
    items, generation_body = await sync_to_async(_conversation)(body, request.api_key)
    answer = _Answer(response_id, body)
    if body.background:
        row = await sync_to_async(response_queue)(
            response_id=response_id, request_id=request.request_id, endpoint=request.path, body=generation_body,
            api_key=request.api_key, audit=request.audit, params=answer.params, input_items=items,
        )  # fmt: skip
        request.request_logged = True  # from here on the worker owns the log row
        return JsonResponse(response_json(row))
    if body.kept:
        row = await sync_to_async(response_create)(response_id=response_id, request_id=request.request_id,
                                                   api_key=request.api_key, model=body.model, params=answer.params,
                                                   input_items=items, background=False)  # fmt: skip
        answer.created = int(row.created.timestamp())  # what retrieving it shows

    def queued() -> None:
        request.request_logged = True  # from here on the worker owns the log row

    try:
        generation = await generation_start(
            request_id=request.request_id, endpoint=request.path, body=generation_body, api_key=request.api_key,
            audit=request.audit, on_queued=queued, task=RUN_RESPONSE if body.kept else "minerva.run_request",
        )  # fmt: skip
    except BaseException as exc:
        if body.kept:  # refused before any output (context length, a full queue, ...): no response was made
            await sync_to_async(response_discard)(response_id=response_id)
        if isinstance(exc, MinervaError) and exc.param == "messages":  # the worker's name for the conversation
            exc.param = "input"
        raise
    if body.stream:
        return _sse_response(generation.stream, answer.events(generation))
    return JsonResponse(await answer.collect(generation))


def _conversation(body: CreateResponse, api_key: ApiKey | None) -> tuple[list[dict], GenerationRequest]:
    """The response's input items (a previous response's items and output, then this request's input) and the
    neutral request they make."""
    items: list[dict] = []
    if body.previous_response_id:
        previous = response_get(body.previous_response_id, api_key=api_key, param="previous_response_id")
        if previous.status in StoredResponse.ACTIVE:
            raise InvalidRequest(f"Response {previous.id} is still {previous.status}; continue it once it has ended.",
                                 param="previous_response_id")  # fmt: skip
        items = previous.input_items + previous.output
    items += body.input_items()
    if not items:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    return items, body.to_generation(conversation(items, body.instructions))


class _Answer:
    """One response being generated: its Response object as it grows, streamed or folded, and, when it is
    stored, its outcome recorded as soon as it is known (its worker records the same, whichever comes first)."""

    def __init__(self, response_id: str, body: CreateResponse):
        self.id, self.model, self.kept = response_id, body.model, body.kept
        self.params = body.echo()
        self.created = int(time.time())
        self.builder = OutputBuilder(response_id)

    def snapshot(self, status: str = "in_progress", **outcome) -> dict:
        completed = int(time.time()) if status == "completed" else None
        return response_object(response_id=self.id, created_at=self.created, model=self.model, params=self.params,
                               status=status, completed_at=completed, **outcome)  # fmt: skip

    async def collect(self, generation: Generation) -> dict:
        try:
            async for delta in generation.deltas():
                if not delta.ping:
                    self.builder.feed(delta)
        except MinervaError as exc:
            await self._record(self.builder.failed(exc))
            raise
        self.builder.finish()
        result = self.builder.result(generation.usage)
        await self._record(result)
        return self.snapshot(**result)

    async def events(self, generation: Generation) -> AsyncIterator[dict | str]:
        yield {"type": "response.created", "response": self.snapshot()}
        yield {"type": "response.in_progress", "response": self.snapshot()}
        try:
            async for delta in generation.deltas():
                if delta.ping:
                    yield PING
                    continue
                for event in self.builder.feed(delta):
                    yield event
        except MinervaError as exc:  # the 200 has gone out: the failure is the stream's last event
            result = self.builder.failed(exc)
            await self._record(result)
            yield {"type": "response.failed", "response": self.snapshot(**result)}
            return
        for event in self.builder.finish():
            yield event
        result = self.builder.result(generation.usage)
        await self._record(result)  # before the last event: a client continuing from it finds the response stored
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}[result["status"]]
        yield {"type": kind, "response": self.snapshot(**result)}

    async def _record(self, result: dict) -> None:
        if not self.kept:
            return
        try:
            await sync_to_async(response_record)(response_id=self.id, result=result)
        except DatabaseError:  # the worker records it too, once the database is back
            logger.warning("could not record response %s", self.id, exc_info=True)


def _sse_response(stream: TokenStream, events: AsyncIterator[dict | str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(_frames(stream, events), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


async def _frames(stream: TokenStream, events: AsyncIterator[dict | str]) -> AsyncIterator[str]:
    """Typed events, numbered from 0; `: ping` comments while waiting. No [DONE]: the last event ends the stream."""
    finished = False
    sequence = 0
    try:
        async for event in events:
            if event is PING:
                yield PING
                continue
            data = json.dumps({**event, "sequence_number": sequence}, ensure_ascii=False)
            yield f"event: {event['type']}\ndata: {data}\n\n"
            sequence += 1
        finished = True
    finally:
        if not finished:  # the client went away: the worker stops at its next token (and records `cancelled`)
            await stream.cancel()


@openai_view(methods=("GET", "DELETE"))
async def response(request: HttpRequest, response_id: str) -> HttpResponse:
    if request.method == "GET" and request.GET.get("stream", "").lower() in ("true", "1"):
        raise InvalidRequest("Streaming a stored response again is not supported; retrieve it without stream.",
                             param="stream")  # fmt: skip

    def act() -> dict:
        found = response_get(response_id, api_key=request.api_key)
        if request.method == "DELETE":
            response_delete(response=found)
            return {"id": response_id, "object": "response", "deleted": True}
        return response_json(found)

    return JsonResponse(await sync_to_async(act)())


@openai_view(methods=("POST",))
async def cancel_response(request: HttpRequest, response_id: str) -> HttpResponse:
    def cancel() -> dict:
        return response_json(response_cancel(response=response_get(response_id, api_key=request.api_key)))

    return JsonResponse(await sync_to_async(cancel)())


@openai_view(methods=("GET",))
async def input_items(request: HttpRequest, response_id: str) -> HttpResponse:
    query = request.GET
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc.", param="order")
    raw = query.get("limit") or "20"
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidRequest("limit must be an integer from 1 to 100.", param="limit")

    def page() -> tuple[list[dict], bool]:
        found = response_get(response_id, api_key=request.api_key)
        return response_input_items(found, after=query.get("after"), limit=int(raw), order=order)

    data, has_more = await sync_to_async(page)()
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return JsonResponse({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
