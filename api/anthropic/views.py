"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens, and /v1/models for requests that carry
`anthropic-version`): thin async views like the OpenAI and Ollama ones. Each validates Anthropic's wire format, hands
the neutral request to inference.serving, and renders the neutral deltas as a Message or as Anthropic's server-sent
events; errors are Anthropic's `{"type": "error", "error": {"type", "message"}, "request_id"}`."""

import datetime
import functools
import json
from collections.abc import AsyncIterator, Callable

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from core.errors import InvalidRequest, MinervaError, ModelNotFound
from core.generation import TokenizeRequest
from inference.serving import Answer, Generation, Usage, generation_start, tokenize_answer
from inference.streams import TokenStream
from models_app.selectors import model_get, model_list, model_n_ctx

from ..decorators import api_view, error_headers, parse_body
from .protocol import CountTokensRequest, MessageCreateRequest

SIGNATURE = "minerva"  # a thinking block's `signature`: opaque to clients, and not checked when one comes back
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
MAX_MODELS_PAGE = 1000

# ----------------------------------------------------------------------------------------------- errors


def error_type(exc: MinervaError) -> tuple[int, str]:
    """The HTTP status and Anthropic error type of a Minerva error: Anthropic's own statuses, its 529 for our 503s
    (a full queue, a model that cannot be loaded now, the database or Redis away), `invalid_request_error` for any
    other client error and `api_error` for any other server error, as Anthropic's reference describes."""
    status = exc.status
    if status == 503:
        return 529, "overloaded_error"
    known = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             413: "request_too_large", 429: "rate_limit_error"}  # fmt: skip
    if status in known:
        return status, known[status]
    return status, "invalid_request_error" if status < 500 else "api_error"


def error_body(exc: MinervaError, request_id: str | None = None) -> dict:
    body = {"type": "error", "error": {"type": error_type(exc)[1], "message": exc.message}}
    if request_id:
        body["request_id"] = request_id
    return body


def anthropic_error(exc: MinervaError) -> JsonResponse:
    """An error in Anthropic's shape; `anthropic_view` adds the request id once the response has one."""
    response = JsonResponse(error_body(exc), status=error_type(exc)[0])
    response.anthropic_error = True
    return error_headers(response, exc)


def anthropic_view(*, methods: tuple[str, ...]):
    """@api_view with Anthropic's error shape; every answer carries `request-id`, as Anthropic's do (the SDK reads it
    into `_request_id`), and an error's body its `request_id`."""

    def decorate(view):
        inner = api_view(methods=methods, render_error=anthropic_error)(view)

        @functools.wraps(inner)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            response = await inner(request, *args, **kwargs)
            request_id = response["x-request-id"]
            response["request-id"] = request_id
            if getattr(response, "anthropic_error", False):
                response.content = json.dumps({**json.loads(response.content), "request_id": request_id})
            return response

        return wrapper

    return decorate


def when_versioned(anthropic: Callable, *, otherwise: Callable) -> Callable:
    """A path that Anthropic's API and OpenAI's share (/v1/models): Anthropic's view for a request that names an
    Anthropic API version, as its clients all do, else OpenAI's. Each view logs the request itself."""

    async def view(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        chosen = anthropic if "anthropic-version" in request.headers else otherwise
        return await chosen(request, *args, **kwargs)

    view.csrf_exempt = True
    return view


# ----------------------------------------------------------------------------------------------- models


@anthropic_view(methods=("GET",))
async def list_models(request: HttpRequest) -> HttpResponse:
    """Anthropic's paginated list: `limit` (1-1000, 20 by default), `after_id` or `before_id`."""
    limit = request.GET.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_MODELS_PAGE:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_MODELS_PAGE}.", param="limit")
    models = await sync_to_async(model_list)()
    if request.api_key is not None:  # a key scoped to some models sees only those
        models = [m for m in models if request.api_key.allows(m.name)]
    entries = [_model_info(m) for m in models]
    ids = [entry["id"] for entry in entries]
    after, before = request.GET.get("after_id"), request.GET.get("before_id")
    for param, cursor in (("after_id", after), ("before_id", before)):
        if cursor is not None and cursor not in ids:
            raise InvalidRequest(f"{param} names no model in this list.", param=param)
    if before is not None:
        end = ids.index(before)
        page = entries[max(end - int(limit), 0) : end]
        has_more = end - int(limit) > 0
    else:
        start = ids.index(after) + 1 if after is not None else 0
        page = entries[start : start + int(limit)]
        has_more = start + int(limit) < len(entries)
    return JsonResponse({"data": page, "has_more": has_more, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None})  # fmt: skip


@anthropic_view(methods=("GET",))
async def retrieve_model(request: HttpRequest, model_id: str) -> HttpResponse:
    request.log_model = model_id[:255]
    model = await sync_to_async(model_get)(model_id)
    if request.api_key is not None and not request.api_key.allows(model.name):
        raise ModelNotFound(model_id)
    return JsonResponse(_model_info(model))


def _model_info(model) -> dict:
    created = model.created.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
    return {"type": "model", "id": model.name, "display_name": model.name, "created_at": created,
            "max_input_tokens": model_n_ctx(model)}  # fmt: skip


# --------------------------------------------------------------------------------------------- messages


@anthropic_view(methods=("POST",))
async def messages(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, MessageCreateRequest)
    generation = await generation_start(request_id=request.request_id, endpoint=request.path,
                                        body=body.to_generation(), api_key=request.api_key, audit=request.audit,
                                        on_queued=lambda: _logged(request))  # fmt: skip
    if body.stream:
        return _sse_response(generation, _events(generation, body))
    return JsonResponse(message(await generation.collect(), generation, body))


@anthropic_view(methods=("POST",))
async def count_tokens(request: HttpRequest) -> HttpResponse:
    """The prompt's tokens, counted by the model's worker with its template and the request's tools, exactly as a
    generation would build it (cached or not: Anthropic's count is the whole input)."""
    body = await parse_body(request, CountTokensRequest)
    answer = await tokenize_answer(request_id=request.request_id, endpoint=request.path,
                                   body=TokenizeRequest(model=body.model, chat=body.to_generation()),
                                   api_key=request.api_key, audit=request.audit,
                                   on_queued=lambda: _logged(request))  # fmt: skip
    return JsonResponse({"input_tokens": answer["count"]})


def _logged(request: HttpRequest) -> None:
    request.request_logged = True  # from here on the worker owns the log row


def message(answer: Answer, generation: Generation, body: MessageCreateRequest) -> dict:
    """A non-streamed answer: thinking, then text, then tool_use blocks."""
    choice = answer.choices[0]
    if body.max_tokens == 0:  # the prompt was only read into the cache; the token sampled after it is dropped
        return {**_head(generation, body), "content": [], "stop_reason": "max_tokens", "stop_sequence": None,
                "usage": _usage(answer.usage, generated=False)}  # fmt: skip
    content: list[dict] = []
    if choice.reasoning:
        content.append({"type": "thinking", "thinking": choice.reasoning, "signature": SIGNATURE})
    if choice.text:
        content.append({"type": "text", "text": choice.text})
    content += [{"type": "tool_use", "id": _tool_use_id(call["id"]), "name": call["function"]["name"],
                 "input": _input(call["function"]["arguments"])} for call in choice.tool_calls]  # fmt: skip
    return {**_head(generation, body), "content": content,
            **_stop(choice.finish_reason, choice.stop_sequence),
            "usage": _usage(answer.usage)}  # fmt: skip


def _stop(finish_reason: str, stop_sequence: str | None) -> dict:
    """Why the message ended: end_turn, max_tokens, tool_use, or stop_sequence with the one that matched."""
    if finish_reason == "stop" and stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_sequence}
    return {"stop_reason": STOP_REASONS.get(finish_reason, "end_turn"), "stop_sequence": None}


def _head(generation: Generation, body: MessageCreateRequest) -> dict:
    return {"id": f"msg_{generation.id}", "type": "message", "role": "assistant", "model": body.model}


def _usage(usage: Usage, *, generated: bool = True) -> dict:
    """Anthropic counts a prompt's cached tokens apart: the whole input is input + cache read + cache creation. The
    prompt cache keeps what a request decoded without a separate write, so no creation is ever counted."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.completion_tokens if generated else 0}  # fmt: skip


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str):
    """A call's input as the object Anthropic sends (the neutral call has the JSON text the model wrote)."""
    try:
        value = json.loads(arguments)
    except ValueError:  # tool grammars make this unreachable
        return {}
    return value if isinstance(value, dict) else {}


class _Blocks:
    """Content blocks as Anthropic streams them: each one started, its deltas, then stopped, one open at a time.
    A tool call is a block like the others (start, input_json_delta fragments, stop), so calls whose arguments
    arrive in pieces need nothing new here."""

    def __init__(self):
        self.index, self.open = -1, None  # the open block's index and type

    def thinking(self, text: str) -> list[tuple[str, dict]]:
        if not text:
            return []
        events = [] if self.open == "thinking" else self._start({"type": "thinking", "thinking": "", "signature": ""})
        return [*events, self._delta({"type": "thinking_delta", "thinking": text})]

    def text(self, text: str) -> list[tuple[str, dict]]:
        if self.open != "text":  # a text block starts at its first non-blank character (beside calls, answers are
            text = text.lstrip()  # trimmed; blank lines between blocks open none)
            if not text:
                return []
        events = [] if self.open == "text" else self._start({"type": "text", "text": ""})
        return [*events, self._delta({"type": "text_delta", "text": text})]

    def tool_use(self, call_id: str, name: str) -> list[tuple[str, dict]]:
        return self._start({"type": "tool_use", "id": call_id, "name": name, "input": {}})

    def tool_input(self, partial_json: str) -> list[tuple[str, dict]]:
        return [self._delta({"type": "input_json_delta", "partial_json": partial_json})] if partial_json else []

    def stop(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":  # a thinking block's signature comes last, just before it stops
            events.append(self._delta({"type": "signature_delta", "signature": SIGNATURE}))
        self.open = None
        return [*events, ("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _start(self, block: dict) -> list[tuple[str, dict]]:
        events = self.stop()
        self.index, self.open = self.index + 1, block["type"]
        return [*events, ("content_block_start", {"type": "content_block_start", "index": self.index,
                                                   "content_block": block})]  # fmt: skip

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}


async def _events(generation: Generation, body: MessageCreateRequest) -> AsyncIterator[tuple[str, dict]]:
    """The answer as Anthropic's stream: message_start, each block, message_delta (stop reason, usage),
    message_stop, with a ping whenever the request is quiet (queued, loading, a long prompt)."""
    yield "message_start", {"type": "message_start", "message": {
        **_head(generation, body), "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": _usage(generation.usage)}}  # fmt: skip
    blocks, finish, stop_sequence, generated = _Blocks(), "stop", None, body.max_tokens > 0
    async for delta in generation.deltas():
        if delta.ping:
            yield "ping", {"type": "ping"}
            continue
        if not generated:  # max_tokens 0: the prompt was only read into the cache
            finish = "length"
            continue
        events = blocks.thinking(delta.reasoning)
        events += blocks.text(delta.text)
        for part in delta.tool_call_parts:  # a call's head once its name is known, then its arguments as written
            if part.id is not None:
                events += blocks.tool_use(_tool_use_id(part.id), part.name)
            events += blocks.tool_input(part.arguments)
        for event in events:
            yield event
        finish = delta.finish_reason or finish
        stop_sequence = delta.stop_sequence or stop_sequence
    for event in blocks.stop():
        yield event
    yield "message_delta", {"type": "message_delta",
                            "delta": _stop(finish, stop_sequence),
                            "usage": _usage(generation.usage, generated=generated)}  # fmt: skip
    yield "message_stop", {"type": "message_stop"}


def _frame(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _frames(stream: TokenStream, request_id: str, events: AsyncIterator[tuple[str, dict]]) -> AsyncIterator[str]:
    """An async generator (under ASGI a sync one would be read in full first). An error after the 200 is an `error`
    event, as Anthropic sends it."""
    finished = False
    try:
        async for event, data in events:
            yield _frame(event, data)
        finished = True
    except MinervaError as exc:
        finished = True
        yield _frame("error", error_body(exc, request_id))
    finally:
        if not finished:  # the client went away: tell the worker to stop at its next token
            await stream.cancel()


def _sse_response(generation: Generation, events: AsyncIterator[tuple[str, dict]]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(_frames(generation.stream, f"req_{generation.id}", events),
                                     content_type="text/event-stream")  # fmt: skip
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response
