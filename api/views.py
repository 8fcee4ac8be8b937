"""The OpenAI surface: thin async views. Each validates, hands generation to a worker, and turns the
request's TokenStream events into OpenAI objects (JSON or SSE)."""

import asyncio
import time
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from inference.services import request_create
from inference.streams import TokenStream
from models_app.selectors import model_get, model_list, model_loaded_names, model_n_ctx, model_registry_version

from .decorators import openai_view, parse_body
from .errors import InvalidRequest, NotFound, OpenAIError
from .protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Model,
    ModelMeta,
    OtherPart,
    PromptTokensDetails,
    ToolCall,
    Usage,
)
from .reasoning import ReasoningSplitter
from .sse import PING, sse_response
from .tools import parse_tool_answer, tools_active


@openai_view(methods=("GET",))
async def list_models(request: HttpRequest) -> HttpResponse:
    return JsonResponse(await sync_to_async(_model_list)())


_listing: dict = {}  # {"version": registry version, "entries": [entry dicts]}: rebuilt when the registry changes


def _model_list() -> dict:
    # One trip to the sync thread for the query, the loaded set and the encoding: hops cost more than the work.
    version = model_registry_version()
    if _listing.get("version") != version:
        entries = [_model(m, set()).model_dump(exclude_none=True) for m in model_list()]
        _listing.update(version=version, entries=entries)
    loaded = model_loaded_names()
    return {
        "object": "list",
        "data": [
            entry if entry["id"] not in loaded else {**entry, "meta": {**entry["meta"], "loaded": True}}
            for entry in _listing["entries"]
        ],
    }


@openai_view(methods=("GET",))
async def retrieve_model(request: HttpRequest, model_id: str) -> HttpResponse:
    request.log_model = model_id[:255]
    model = await sync_to_async(model_get)(model_id)
    loaded = await sync_to_async(model_loaded_names)()
    return JsonResponse(_model(model, loaded).model_dump(exclude_none=True))


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
    _check_tools(body)
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


def _model(model, loaded: set[str]) -> Model:
    meta = model.metadata
    n_ctx = model_n_ctx(model)
    return Model(
        id=model.name,
        created=int(model.created.timestamp()),
        owned_by="minerva",
        max_model_len=n_ctx,
        context_length=n_ctx,
        meta=ModelMeta(
            format=model.format,
            architecture=meta.get("architecture"),
            quantization=model.quantization or None,
            parameters=meta.get("parameter_count"),
            file_size=model.file_size,
            tensor_count=meta.get("tensor_count"),
            layers=meta.get("block_count"),
            vocab_size=meta.get("vocab_size"),
            trained_context_length=model.context_length,
            loaded=model.name in loaded,
        ),
    )


class _Generation:
    """One submitted request: its ids and the events its worker publishes (for n choices)."""

    def __init__(self, request: HttpRequest, body, events: AsyncIterator[tuple[str, dict]]):
        self.stream = TokenStream(request.request_id)
        self.body, self.events = body, events
        self.id = request.request_id
        self.created = int(time.time())
        self.n = body.n or 1
        self.thinking = False  # the template opened a <think> block (from the `start` event)

    def sse_response(self, chunks: AsyncIterator[str]) -> HttpResponse:
        return sse_response(self.stream, chunks)

    async def collect_chat(self) -> dict:
        choices, usage = await self._collect()
        with_tools = tools_active(self.body)
        result = ChatCompletion(
            id=f"chatcmpl-{self.id}",
            created=self.created,
            model=self.body.model,
            choices=[
                _chat_choice(
                    i,
                    "".join(c["texts"]),
                    c["finish_reason"],
                    with_tools,
                    ChoiceLogprobs(content=c["logprobs"]) if self.body.logprobs else None,
                    self.thinking,
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        ).model_dump()
        for choice in result["choices"]:  # these are absent, not null, when there are none
            for key in ("tool_calls", "reasoning_content", "reasoning"):
                if choice["message"][key] is None:
                    del choice["message"][key]
        return result

    async def collect_completion(self) -> dict:
        choices, usage = await self._collect()
        return Completion(
            id=f"cmpl-{self.id}",
            created=self.created,
            model=self.body.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(c["texts"]),
                    logprobs=_completion_logprobs(c["logprobs"]) if self.body.logprobs is not None else None,
                    finish_reason=c["finish_reason"],
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        ).model_dump()

    async def _collect(self) -> tuple[list[dict], Usage]:
        choices = [{"texts": [], "logprobs": [], "finish_reason": "stop"} for _ in range(self.n)]
        done = []
        try:
            async for event, data in self.events:
                if event == "start":
                    self.thinking = data.get("thinking", False)
                elif event == "token":
                    choices[data["index"]]["texts"].append(data["text"])
                    choices[data["index"]]["logprobs"].extend(data.get("logprobs", []))
                elif event == "done":
                    choices[data["index"]]["finish_reason"] = data["finish_reason"]
                    done.append(data)
                elif event == "error":
                    raise OpenAIError.from_dict(data)
        except asyncio.CancelledError:  # the client went away while we waited
            await self.stream.cancel()
            raise
        return choices, _usage(done)


async def _submit(request: HttpRequest, body) -> _Generation:
    """Queue the request and wait for its first event, so a refusal (e.g. context length) is a real 4xx
    status even when streaming: the 200 goes out only once the worker has accepted the prompt."""
    await sync_to_async(request_create)(request_id=request.request_id, endpoint=request.path, body=body)
    request.request_logged = True  # from here on the worker owns the log row
    ping_every = settings.SSE_PING_SECONDS if body.stream else None
    events = TokenStream(request.request_id).read(choices=body.n or 1, ping_every=ping_every)
    generation = _Generation(request, body, events)
    try:
        event, data = await anext(events)
    except (asyncio.CancelledError, OpenAIError):  # the client left, or the wait timed out
        await generation.stream.cancel()
        raise
    if event == "error":
        raise OpenAIError.from_dict(data)
    if event == "start":
        generation.thinking = data.get("thinking", False)
    # A "ping" first means the request is still queued after SSE_PING_SECONDS: the 200 goes out now so the
    # client sees life; a refusal after this point (e.g. context length) arrives as an error frame instead.
    return generation


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _chat_chunks(generation: _Generation, body: ChatCompletionRequest) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            id=f"chatcmpl-{generation.id}", created=generation.created, model=body.model, choices=choices, usage=usage
        ).to_json()

    for i in range(generation.n):
        yield chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))])
    done = []
    answers: dict[int, list[str]] = {}  # with tools: the JSON answer is parsed once it is complete
    splitters: dict[int, ReasoningSplitter] = {}  # without: <think> text goes to reasoning_content

    def split(reasoning: str, content: str) -> ChoiceDelta | None:
        if not reasoning and not content:
            return None
        return ChoiceDelta(content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None)

    async for event, data in generation.events:
        if event == "ping":
            yield PING
        elif event == "start":
            generation.thinking = data.get("thinking", False)
        elif event == "token" and tools_active(body):
            answers.setdefault(data["index"], []).append(data["text"])
        elif event == "done" and tools_active(body):
            done.append(data)
            content, calls = parse_tool_answer("".join(answers.get(data["index"], [])))
            for delta in _tool_deltas(content, calls):
                yield chunk([ChunkChoice(index=data["index"], delta=delta)])
            finish = "tool_calls" if calls else data["finish_reason"]
            yield chunk([ChunkChoice(index=data["index"], delta=ChoiceDelta(), finish_reason=finish)])
        elif event == "token":
            logprobs = ChoiceLogprobs(content=data["logprobs"]) if "logprobs" in data else None
            splitter = splitters.setdefault(data["index"], ReasoningSplitter(thinking=generation.thinking))
            delta = split(*splitter.feed(data["text"]))
            if delta or logprobs:
                yield chunk([ChunkChoice(index=data["index"], delta=delta or ChoiceDelta(), logprobs=logprobs)])
        elif event == "done":
            done.append(data)
            splitter = splitters.get(data["index"])
            delta = split(*splitter.flush()) if splitter else None
            if delta:
                yield chunk([ChunkChoice(index=data["index"], delta=delta)])
            yield chunk([ChunkChoice(index=data["index"], delta=ChoiceDelta(), finish_reason=data["finish_reason"])])
        elif event == "error":
            raise OpenAIError.from_dict(data)
    if _include_usage(body):
        yield chunk([], _usage(done))


def _check_tools(body: ChatCompletionRequest) -> None:
    choice = body.tool_choice
    if choice is not None and choice != "none" and not body.tools:
        raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
    if (
        not isinstance(choice, str)
        and choice is not None
        and choice.function.name not in {t.function.name for t in body.tools}
    ):
        raise InvalidRequest(f"tool_choice names {choice.function.name!r}, which is not in tools.", param="tool_choice")
    if tools_active(body) and body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequest("response_format cannot be combined with tools.", param="response_format")


def _chat_choice(index: int, text: str, finish_reason: str, with_tools: bool, logprobs,
                 thinking: bool) -> ChatCompletionChoice:  # fmt: skip
    reasoning = None
    if with_tools:
        content, calls = parse_tool_answer(text)
    else:
        splitter = ReasoningSplitter(thinking=thinking)
        (r1, c1), (r2, c2) = splitter.feed(text), splitter.flush()
        content, calls, reasoning = c1 + c2, [], (r1 + r2) or None
    return ChatCompletionChoice(
        index=index,
        message=ChatCompletionMessage(
            content=content,
            tool_calls=[ToolCall(**c) for c in calls] or None,
            reasoning_content=reasoning,
            reasoning=reasoning,
        ),
        logprobs=logprobs,
        finish_reason="tool_calls" if calls else finish_reason,
    )


def _tool_deltas(content: str | None, calls: list[dict]) -> list[ChoiceDelta]:
    """How a parsed answer streams: the text, or per call a delta with its id and name (arguments "") and
    then one with the arguments, as OpenAI streams them."""
    if not calls:
        return [ChoiceDelta(content=content)] if content else []
    deltas = []
    for i, call in enumerate(calls):
        head = {"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"],
                                                                                "arguments": ""}}  # fmt: skip
        deltas.append(ChoiceDelta(tool_calls=[head]))
        deltas.append(ChoiceDelta(tool_calls=[{"index": i, "function": {"arguments": call["function"]["arguments"]}}]))
    return deltas


async def _completion_chunks(generation: _Generation, body: CompletionRequest) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return Completion(
            id=f"cmpl-{generation.id}", created=generation.created, model=body.model, choices=choices, usage=usage
        ).model_dump_json(exclude={"usage"} if usage is None else set())

    done = []
    async for event, data in generation.events:
        if event == "ping":
            yield PING
        elif event == "token":
            logprobs = _completion_logprobs(data["logprobs"]) if "logprobs" in data else None
            yield chunk([CompletionChoice(index=data["index"], text=data["text"], logprobs=logprobs)])
        elif event == "done":
            done.append(data)
            yield chunk([CompletionChoice(index=data["index"], text="", finish_reason=data["finish_reason"])])
        elif event == "error":
            raise OpenAIError.from_dict(data)
    if _include_usage(body):
        yield chunk([], _usage(done))


def _completion_logprobs(entries: list[dict]) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists, alternatives as {token: logprob}."""
    offsets, offset = [], 0
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return CompletionLogprobs(
        tokens=[e["token"] for e in entries],
        token_logprobs=[e["logprob"] for e in entries],
        top_logprobs=[{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
        text_offset=offsets,
    )


def _usage(done: list[dict]) -> Usage:
    """Usage from the choices' `done` events: one prompt, every choice's completion tokens."""
    prompt_tokens = done[0]["prompt_tokens"] if done else 0
    completion_tokens = sum(d["completion_tokens"] for d in done)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=done[0].get("cached_tokens", 0) if done else 0),
    )
