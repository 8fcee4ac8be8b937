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
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from access.models import ApiKey
from core.errors import InvalidRequest, MinervaError
from core.generation import GenerationRequest
from core.redis import get_redis
from inference.serving import Generation, generation_attach, generation_start
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
        if not body.stream:
            return JsonResponse(response_json(row))
        answer.created = int(row.created.timestamp())  # the generation's own: leaving this stream stops nothing
        return _sse_response(answer.events(generation_attach(request.request_id, generation_body), queued=True))
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
        return _sse_response(answer.events(generation), owner=generation.stream)
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

    async def events(self, generation: Generation, *, queued: bool = False) -> AsyncIterator[dict | str]:
        """The stream's events. A background response's (`queued`) are the same whenever they are read, from its
        creation or again later, so that their sequence numbers are too: created and queued, then in_progress with
        its first delta."""
        if queued:
            yield {"type": "response.created", "response": self.snapshot("queued")}
            yield {"type": "response.queued", "response": self.snapshot("queued")}
        else:
            yield {"type": "response.created", "response": self.snapshot()}
            yield {"type": "response.in_progress", "response": self.snapshot()}
        try:
            async for delta in generation.deltas():
                if delta.ping:
                    yield PING
                    continue
                if queued:
                    queued = False
                    yield {"type": "response.in_progress", "response": self.snapshot()}
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
        # A cancelled background response's readers (no stream event names that status) get it as incomplete.
        kind = {"completed": "response.completed"}.get(result["status"], "response.incomplete")
        yield {"type": kind, "response": self.snapshot(**result)}

    async def _record(self, result: dict) -> None:
        if not self.kept:
            return
        try:
            await sync_to_async(response_record)(response_id=self.id, result=result)
        except DatabaseError:  # the worker records it too, once the database is back
            logger.warning("could not record response %s", self.id, exc_info=True)


def _sse_response(events: AsyncIterator[dict | str], *, owner: TokenStream | None = None,
                  starting_after: int = -1) -> StreamingHttpResponse:  # fmt: skip
    """`owner`: the stream of a request this client owns (leaving cancels it); `starting_after`: the sequence number
    after which the client wants events (a background response streamed again)."""
    response = StreamingHttpResponse(_frames(events, owner, starting_after), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


async def _frames(events: AsyncIterator[dict | str], owner: TokenStream | None,
                  starting_after: int) -> AsyncIterator[str]:  # fmt: skip
    """Typed events, numbered from 0 (those up to `starting_after` left out); `: ping` comments while waiting. No
    [DONE]: the last event ends the stream."""
    finished = False
    sequence = 0
    try:
        async for event in events:
            if event is PING:
                yield PING
                continue
            if sequence > starting_after:
                data = json.dumps({**event, "sequence_number": sequence}, ensure_ascii=False)
                yield f"event: {event['type']}\ndata: {data}\n\n"
            sequence += 1
        finished = True
    finally:
        if not finished and owner is not None:  # the client went away: the worker stops at its next token
            await owner.cancel()


@openai_view(methods=("GET", "DELETE"))
async def response(request: HttpRequest, response_id: str) -> HttpResponse:
    if request.method == "GET" and request.GET.get("stream", "").lower() in ("true", "1"):
        return await _stream_again(request, response_id)

    def act() -> dict:
        found = response_get(response_id, api_key=request.api_key)
        if request.method == "DELETE":
            response_delete(response=found)
            return {"id": response_id, "object": "response", "deleted": True}
        return response_json(found)

    return JsonResponse(await sync_to_async(act)())


async def _stream_again(request: HttpRequest, response_id: str) -> HttpResponse:
    """A background response's events, from the first or after `starting_after`, while it runs and for
    MINERVA_STREAM_TTL after it ended: its client can come back to it after a lost connection."""
    raw = request.GET.get("starting_after", "")
    if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 18):  # int() of "²" or 5,000 digits would raise
        raise InvalidRequest("starting_after must be a sequence number (an integer, 0 or more).",
                             param="starting_after")  # fmt: skip

    def find() -> tuple[StoredResponse, _Answer, GenerationRequest]:
        found = response_get(response_id, api_key=request.api_key)
        if not found.background:
            raise InvalidRequest("Only a background response can be streamed again; retrieve this one without "
                                 "stream.", param="stream")  # fmt: skip
        if found.status not in StoredResponse.ACTIVE and not get_redis().exists(TokenStream(found.request_id).key):
            raise InvalidRequest(f"The events of {found.id} are kept for {settings.STREAM_TTL} s after it ends; "
                                 "retrieve it without stream.", param="stream")  # fmt: skip
        body = CreateResponse.model_validate({"model": found.model, **_resumable(found.params)})
        answer = _Answer(found.id, body)
        answer.params, answer.created = found.params, int(found.created.timestamp())
        return found, answer, body.to_generation(conversation(found.input_items, found.params.get("instructions")))

    found, answer, generation_body = await sync_to_async(find)()
    generation = generation_attach(found.request_id, generation_body)
    return _sse_response(answer.events(generation, queued=True), starting_after=int(raw) if raw else -1)


def _resumable(params: dict) -> dict:
    """What decides how a stored response's events read its text (tools, the text format), from its echo."""
    return {key: params[key] for key in ("tools", "tool_choice", "text", "parallel_tool_calls") if key in params}


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
