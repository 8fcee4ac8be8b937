"""The OpenAI surface: thin async views. Each validates, hands generation to a worker, and turns the
request's TokenStream events into OpenAI objects (JSON or SSE)."""

import asyncio
import time
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse

from inference.services import request_create
from inference.streams import TokenStream
from models_app.selectors import model_get, model_list, model_n_ctx

from .decorators import openai_view, parse_body
from .errors import InvalidRequest, NotFound, OpenAIError
from .protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChoiceDelta,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Model,
    ModelList,
    OtherPart,
    PromptTokensDetails,
    Usage,
)


@openai_view(methods=("GET",))
async def list_models(request: HttpRequest) -> HttpResponse:
    models = await sync_to_async(model_list)()
    return JsonResponse(ModelList(data=[_model(m) for m in models]).model_dump())


@openai_view(methods=("GET",))
async def retrieve_model(request: HttpRequest, model_id: str) -> HttpResponse:
    request.log_model = model_id[:255]
    model = await sync_to_async(model_get)(model_id)
    return JsonResponse(_model(model).model_dump())


@openai_view(methods=("POST",))
async def chat_completions(request: HttpRequest) -> HttpResponse:
    body = parse_body(request, ChatCompletionRequest)
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, OtherPart):
                    raise InvalidRequest(
                        f"This model does not support {part.type} content.",
                        param=f"messages[{i}].content[{j}]",
                    )
    generation = await _submit(request, body)
    if body.stream:
        return generation.sse_response(_chat_chunks(generation, body))
    return JsonResponse(await generation.collect_chat())


@openai_view(methods=("POST",))
async def completions(request: HttpRequest) -> HttpResponse:
    body = parse_body(request, CompletionRequest)
    if body.echo:
        raise InvalidRequest("echo is not supported yet.", param="echo")
    if body.suffix:
        raise InvalidRequest("suffix is not supported yet.", param="suffix")
    if isinstance(body.prompt, list) and len(body.prompt) == 0:
        raise InvalidRequest("The prompt must not be empty.", param="prompt")
    if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) and len(body.prompt) > 1:
        raise InvalidRequest("Only one prompt per request is supported.", param="prompt")
    generation = await _submit(request, body)
    if body.stream:
        return generation.sse_response(_completion_chunks(generation, body))
    return JsonResponse(await generation.collect_completion())


@openai_view(methods=("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
async def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    raise NotFound(f"Invalid URL ({request.method} {request.path})")


def _model(model) -> Model:
    return Model(
        id=model.name,
        created=int(model.created.timestamp()),
        owned_by="minerva",
        context_length=model_n_ctx(model),
    )


class _Generation:
    """One submitted request: its ids and the events its worker publishes."""

    def __init__(self, request: HttpRequest, body, events: AsyncIterator[tuple[str, dict]]):
        self.stream = TokenStream(request.request_id)
        self.body, self.events = body, events
        self.id = request.request_id
        self.created = int(time.time())
        self.prompt_tokens = 0

    def sse_response(self, chunks: AsyncIterator[str]) -> HttpResponse:
        from .sse import sse_response

        return sse_response(self.stream, chunks)

    async def collect_chat(self) -> dict:
        texts, finish, usage = await self._collect()
        return ChatCompletion(
            id=f"chatcmpl-{self.id}",
            created=self.created,
            model=self.body.model,
            choices=[
                ChatCompletionChoice(
                    index=0, message=ChatCompletionMessage(content="".join(texts)), finish_reason=finish
                )
            ],
            usage=usage,
        ).model_dump()

    async def collect_completion(self) -> dict:
        texts, finish, usage = await self._collect()
        return Completion(
            id=f"cmpl-{self.id}",
            created=self.created,
            model=self.body.model,
            choices=[CompletionChoice(index=0, text="".join(texts), finish_reason=finish)],
            usage=usage,
        ).model_dump()

    async def _collect(self) -> tuple[list[str], str, Usage]:
        texts, finish, usage = [], "stop", None
        try:
            async for event, data in self.events:
                if event == "token":
                    texts.append(data["text"])
                elif event == "done":
                    finish, usage = data["finish_reason"], _usage(data)
                elif event == "error":
                    raise OpenAIError.from_dict(data)
        except asyncio.CancelledError:  # the client went away while we waited
            await self.stream.cancel()
            raise
        return texts, finish, usage


async def _submit(request: HttpRequest, body) -> _Generation:
    """Queue the request and wait for its first event, so a refusal (e.g. context length) is a real 4xx
    status even when streaming: the 200 goes out only once the worker has accepted the prompt."""
    await sync_to_async(request_create)(request_id=request.request_id, endpoint=request.path, body=body)
    request.request_logged = True  # from here on the worker owns the log row
    events = TokenStream(request.request_id).read()
    generation = _Generation(request, body, events)
    try:
        event, data = await anext(events)
    except asyncio.CancelledError:
        await generation.stream.cancel()
        raise
    except OpenAIError:
        await generation.stream.cancel()
        raise
    if event == "error":
        raise OpenAIError.from_dict(data)
    generation.prompt_tokens = data["prompt_tokens"]
    return generation


async def _chat_chunks(generation: _Generation, body: ChatCompletionRequest) -> AsyncIterator[str]:
    def chunk(delta: ChoiceDelta, finish_reason: str | None = None) -> str:
        return ChatCompletionChunk(
            id=f"chatcmpl-{generation.id}",
            created=generation.created,
            model=body.model,
            choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
        ).to_json()

    yield chunk(ChoiceDelta(role="assistant", content=""))
    async for event, data in generation.events:
        if event == "token":
            yield chunk(ChoiceDelta(content=data["text"]))
        elif event == "done":
            yield chunk(ChoiceDelta(), data["finish_reason"])
            if body.stream_options and body.stream_options.include_usage:
                yield ChatCompletionChunk(
                    id=f"chatcmpl-{generation.id}",
                    created=generation.created,
                    model=body.model,
                    choices=[],
                    usage=_usage(data),
                ).to_json()
        elif event == "error":
            raise OpenAIError.from_dict(data)


async def _completion_chunks(generation: _Generation, body: CompletionRequest) -> AsyncIterator[str]:
    def chunk(text: str, finish_reason: str | None = None, usage: Usage | None = None, choices=True) -> str:
        return Completion(
            id=f"cmpl-{generation.id}",
            created=generation.created,
            model=body.model,
            choices=[CompletionChoice(index=0, text=text, finish_reason=finish_reason)] if choices else [],
            usage=usage,
        ).model_dump_json(exclude={"usage"} if usage is None else set())

    async for event, data in generation.events:
        if event == "token":
            yield chunk(data["text"])
        elif event == "done":
            yield chunk("", data["finish_reason"])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk("", usage=_usage(data), choices=False)
        elif event == "error":
            raise OpenAIError.from_dict(data)


def _usage(data: dict) -> Usage:
    return Usage(
        prompt_tokens=data["prompt_tokens"],
        completion_tokens=data["completion_tokens"],
        total_tokens=data["prompt_tokens"] + data["completion_tokens"],
        prompt_tokens_details=PromptTokensDetails(cached_tokens=data.get("cached_tokens", 0)),
    )
