"""The OpenAI surface: thin async views. Each validates, hands generation to a worker, and turns the
request's TokenStream events into OpenAI objects (JSON or SSE)."""

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from inference.services import request_create, request_worker_lost
from inference.streams import TokenStream
from models_app.selectors import model_get, model_list, model_loaded_names, model_n_ctx, model_registry_version

from .decorators import openai_view, parse_body
from .errors import InvalidRequest, ModelNotFound, NotFound, OpenAIError, WorkerLost
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
from .tools import ToolCallStream, parse_tool_calls, tools_active


@openai_view(methods=("GET",))
async def list_models(request: HttpRequest) -> HttpResponse:
    listing = await sync_to_async(_model_list)()
    if request.api_key is not None:  # a key scoped to some models sees only those
        listing["data"] = [entry for entry in listing["data"] if request.api_key.allows(entry["id"])]
    return JsonResponse(listing)


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
    if request.api_key is not None and not request.api_key.allows(model.name):
        raise ModelNotFound(model_id)
    loaded = await sync_to_async(model_loaded_names)()
    return JsonResponse(_model(model, loaded).model_dump(exclude_none=True))


@openai_view(methods=("POST",))
async def chat_completions(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, ChatCompletionRequest)
    check_chat(body)
    generation = await _submit(request, body)
    if body.stream:
        return generation.sse_response(_chat_chunks(generation, body))
    return JsonResponse(await generation.collect_chat())


@openai_view(methods=("POST",))
async def completions(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, CompletionRequest)
    check_completion(body)
    generation = await _submit(request, body)
    if body.stream:
        return generation.sse_response(_completion_chunks(generation, body))
    return JsonResponse(await generation.collect_completion())


def check_chat(body: ChatCompletionRequest) -> None:
    """What /v1/chat/completions refuses beyond the schema (batch lines get the same checks)."""
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, OtherPart):  # no multimodal projector is loaded with any model yet
                    what = {"image_url": "images", "input_audio": "audio", "file": "files"}.get(part.type, part.type)
                    raise InvalidRequest(
                        f"The model {body.model} does not support {what}.", param=f"messages[{i}].content[{j}]"
                    )
    _check_tools(body)


def check_completion(body: CompletionRequest) -> None:
    """What /v1/completions refuses beyond the schema (batch lines get the same checks)."""
    if body.echo:
        raise InvalidRequest("echo is not supported yet.", param="echo")
    if body.suffix:
        raise InvalidRequest("suffix is not supported yet.", param="suffix")
    if isinstance(body.prompt, list) and len(body.prompt) == 0:
        raise InvalidRequest("The prompt must not be empty.", param="prompt")
    if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) and len(body.prompt) > 1:
        raise InvalidRequest("Only one prompt per request is supported.", param="prompt")


async def collect_answer(request_id: str, body: ChatCompletionRequest | CompletionRequest) -> dict:
    """The JSON body a finished request's endpoint would have returned, rebuilt from the events in its stream
    (a batch line's response). Raises the request's OpenAIError if it failed."""
    events = TokenStream(request_id).read(choices=body.n or 1)
    generation = _Generation(SimpleNamespace(request_id=request_id), body, events)  # it reads only the id
    if isinstance(body, ChatCompletionRequest):
        return await generation.collect_chat()
    return await generation.collect_completion()


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
        self.tool_format = "generic"  # how the model writes tool calls (from the `start` event)

    def started(self, data: dict) -> None:
        """Take what the worker's `start` event says about the answer to come."""
        self.thinking = data.get("thinking", False)
        self.tool_format = data.get("tool_format", self.tool_format)

    def sse_response(self, chunks: AsyncIterator[str]) -> HttpResponse:
        return sse_response(self.stream, chunks)

    async def collect_chat(self) -> dict:
        choices, usage = await self._collect()
        tool_format = self.tool_format if tools_active(self.body) else None
        result = ChatCompletion(
            id=f"chatcmpl-{self.id}",
            created=self.created,
            model=self.body.model,
            choices=[
                _chat_choice(
                    i,
                    "".join(c["texts"]),
                    c["finish_reason"],
                    tool_format,
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
                    self.started(data)
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
    await sync_to_async(request_create)(
        request_id=request.request_id, endpoint=request.path, body=body, api_key=request.api_key, audit=request.audit
    )
    request.request_logged = True  # from here on the worker owns the log row
    ping_every = settings.SSE_PING_SECONDS if body.stream else None
    events = TokenStream(request.request_id).read(choices=body.n or 1, ping_every=ping_every)
    events = _watched(request.request_id, events, stream=bool(body.stream))
    generation = _Generation(request, body, events)
    try:
        event, data = await anext(events)
    except (asyncio.CancelledError, OpenAIError):  # the client left, or the wait timed out
        await generation.stream.cancel()
        raise
    if event == "error":
        raise OpenAIError.from_dict(data)
    if event == "start":
        generation.started(data)
    # A "ping" first means the request is still queued after SSE_PING_SECONDS: the 200 goes out now so the
    # client sees life; a refusal after this point (e.g. context length) arrives as an error frame instead.
    return generation


async def _watched(request_id: str, events: AsyncIterator[tuple[str, dict]], *,
                   stream: bool) -> AsyncIterator[tuple[str, dict]]:  # fmt: skip
    """The worker's events; when that worker dies, the request's row ends here (no worker will end it)."""
    started = False  # a streamed response has sent its 200 once the first start (or ping) arrived
    try:
        async for event, data in events:
            started = started or event in ("start", "ping")
            yield event, data
    except WorkerLost:
        status_code = 200 if stream and started else WorkerLost.status
        await sync_to_async(request_worker_lost)(request_id=request_id, status_code=status_code)
        raise


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
    splitters: dict[int, ReasoningSplitter] = {}  # per choice: <think> text goes to reasoning_content
    tool_streams: dict[int, ToolCallStream] = {}  # per choice, with tools: text that may be a call is held

    def delta(index: int, reasoning: str, content: str) -> ChoiceDelta | None:
        if index in tool_streams:
            content = tool_streams[index].feed(content)
        if not reasoning and not content:
            return None
        return ChoiceDelta(content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None)

    async for event, data in generation.events:
        if event == "ping":
            yield PING
        elif event == "start":
            generation.started(data)
        elif event == "token":
            index = data["index"]
            if index not in splitters:
                splitters[index] = ReasoningSplitter(thinking=generation.thinking)
                if tools_active(body):
                    tool_streams[index] = ToolCallStream(generation.tool_format)
            logprobs = ChoiceLogprobs(content=data["logprobs"]) if "logprobs" in data else None
            text = delta(index, *splitters[index].feed(data["text"]))
            if text or logprobs:
                yield chunk([ChunkChoice(index=index, delta=text or ChoiceDelta(), logprobs=logprobs)])
        elif event == "done":
            index = data["index"]
            done.append(data)
            text = delta(index, *splitters[index].flush()) if index in splitters else None
            if text:
                yield chunk([ChunkChoice(index=index, delta=text)])
            content, calls = tool_streams[index].finish() if index in tool_streams else (None, [])
            for tool_delta in _tool_deltas(content, calls):
                yield chunk([ChunkChoice(index=index, delta=tool_delta)])
            finish = "tool_calls" if calls else data["finish_reason"]
            yield chunk([ChunkChoice(index=index, delta=ChoiceDelta(), finish_reason=finish)])
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


def _chat_choice(index: int, text: str, finish_reason: str, tool_format: str | None, logprobs,
                 thinking: bool) -> ChatCompletionChoice:  # fmt: skip
    splitter = ReasoningSplitter(thinking=thinking)
    (r1, c1), (r2, c2) = splitter.feed(text), splitter.flush()
    content, calls, reasoning = c1 + c2, [], (r1 + r2) or None
    if tool_format is not None:
        content, calls = parse_tool_calls(tool_format, content)
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
    """How the end of a parsed answer streams: its text, then per call a delta with its id and name (arguments
    "") and one with the arguments, as OpenAI streams them."""
    deltas = [ChoiceDelta(content=content)] if content else []
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
