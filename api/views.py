"""The OpenAI surface: thin async views. Each validates its wire format, hands the neutral request to
inference.serving, and renders the neutral deltas it gets back as OpenAI objects (JSON or SSE)."""

import base64
from collections.abc import AsyncIterator

import numpy as np
from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse

from core.errors import InvalidRequest, ModelNotFound, NotFound
from inference.serving import (
    Answer,
    Embeddings,
    Generation,
    ToolCallPart,
    embedding_replay,
    embedding_start,
    generation_replay,
    generation_start,
    tokenize_answer,
)
from models_app.selectors import model_get, model_list, model_loaded_names, model_n_ctx, model_registry_version

from .decorators import openai_view, parse_body
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
    CompletionTokensDetails,
    CreateEmbeddingRequest,
    CreateEmbeddingResponse,
    DetokenizeRequest,
    Embedding,
    EmbeddingUsage,
    Model,
    ModelMeta,
    OtherPart,
    PromptTokensDetails,
    TokenizeRequest,
    ToolCall,
    Usage,
)
from .sse import PING, sse_response


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
    if version is None or _listing.get("version") != version:
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
    generation = await _start(request, body)
    if body.stream:
        return sse_response(generation.stream, _chat_chunks(generation, body))
    return JsonResponse(chat_completion(await generation.collect(), generation, body))


@openai_view(methods=("POST",))
async def completions(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, CompletionRequest)
    check_completion(body)
    generation = await _start(request, body)
    if body.stream:
        return sse_response(generation.stream, _completion_chunks(generation, body))
    return JsonResponse(completion(await generation.collect(), generation, body))


@openai_view(methods=("POST",))
async def embeddings(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, CreateEmbeddingRequest)
    embedding = await embedding_start(request_id=request.request_id, endpoint=request.path, body=body.to_embedding(),
                                      api_key=request.api_key, audit=request.audit,
                                      on_queued=lambda: _logged(request))  # fmt: skip
    return JsonResponse(embedding_response(await embedding.collect(), body))


async def collect_embeddings(request_id: str, body: CreateEmbeddingRequest) -> dict:
    """The JSON body a finished embedding request would have returned, from its stream (a batch line's)."""
    return embedding_response(await embedding_replay(request_id).collect(), body)


def embedding_response(result: Embeddings, body: CreateEmbeddingRequest) -> dict:
    def encoded(vector: bytes) -> list[float] | str:
        if body.encoding_format == "base64":  # OpenAI's: the float32 bytes, little-endian
            return base64.b64encode(vector).decode()
        return np.frombuffer(vector, "<f4").tolist()

    return CreateEmbeddingResponse(
        data=[Embedding(index=i, embedding=encoded(v)) for i, v in enumerate(result.vectors)],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    ).model_dump()


@openai_view(methods=("POST",))
async def tokenize(request: HttpRequest) -> HttpResponse:
    """llama-server's /tokenize; with `messages` instead of `content`, the chat's prompt token count."""
    body = await parse_body(request, TokenizeRequest)
    if body.messages is not None:
        chat = await parse_body(request, ChatCompletionRequest)
        check_chat(chat)
        neutral = body.to_tokenize().model_copy(update={"chat": chat.to_generation()})
    elif body.content is None:
        raise InvalidRequest("Give `content` to tokenize, or `messages` to count.", param="content")
    else:
        neutral = body.to_tokenize()
    return JsonResponse(await _tokenizer(request, neutral))


@openai_view(methods=("POST",))
async def detokenize(request: HttpRequest) -> HttpResponse:
    """llama-server's /detokenize."""
    body = await parse_body(request, DetokenizeRequest)
    return JsonResponse(await _tokenizer(request, body.to_tokenize()))


async def _tokenizer(request: HttpRequest, body) -> dict:
    return await tokenize_answer(request_id=request.request_id, endpoint=request.path, body=body,
                                 api_key=request.api_key, audit=request.audit,
                                 on_queued=lambda: _logged(request))  # fmt: skip


def _logged(request: HttpRequest) -> None:
    request.request_logged = True  # from here on the worker owns the log row


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
    (a batch line's response). Raises the request's MinervaError if it failed."""
    generation = generation_replay(request_id, body.to_generation())
    answer = await generation.collect()
    if isinstance(body, ChatCompletionRequest):
        return chat_completion(answer, generation, body)
    return completion(answer, generation, body)


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


async def _start(request: HttpRequest, body: ChatCompletionRequest | CompletionRequest) -> Generation:
    def queued() -> None:
        request.request_logged = True  # from here on the worker owns the log row

    return await generation_start(request_id=request.request_id, endpoint=request.path, body=body.to_generation(),
                                  api_key=request.api_key, audit=request.audit, on_queued=queued)  # fmt: skip


def chat_completion(answer: Answer, generation: Generation, body: ChatCompletionRequest) -> dict:
    result = ChatCompletion(
        id=f"chatcmpl-{generation.id}",
        created=generation.created,
        model=body.model,
        choices=[
            ChatCompletionChoice(
                index=c.index,
                message=ChatCompletionMessage(
                    content=c.text,
                    tool_calls=[ToolCall(**call) for call in c.tool_calls] or None,
                    reasoning_content=c.reasoning,
                    reasoning=c.reasoning,
                ),
                logprobs=ChoiceLogprobs(content=c.logprobs) if body.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in answer.choices
        ],
        usage=_usage(answer.usage),
    ).model_dump()
    for choice in result["choices"]:  # these are absent, not null, when there are none
        for key in ("tool_calls", "reasoning_content", "reasoning"):
            if choice["message"][key] is None:
                del choice["message"][key]
    return result


def completion(answer: Answer, generation: Generation, body: CompletionRequest) -> dict:
    return Completion(
        id=f"cmpl-{generation.id}",
        created=generation.created,
        model=body.model,
        choices=[
            CompletionChoice(
                index=c.index,
                text=c.text or "",
                logprobs=_completion_logprobs(c.logprobs) if body.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for c in answer.choices
        ],
        usage=_usage(answer.usage),
    ).model_dump()


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _chat_chunks(generation: Generation, body: ChatCompletionRequest) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            id=f"chatcmpl-{generation.id}", created=generation.created, model=body.model, choices=choices, usage=usage
        ).to_json()

    for i in range(generation.n):
        yield chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))])
    async for delta in generation.deltas():
        if delta.ping:
            yield PING
            continue
        logprobs = ChoiceLogprobs(content=delta.logprobs) if delta.logprobs is not None else None
        text = _text_delta(delta.reasoning, delta.text)
        if text or logprobs:
            yield chunk([ChunkChoice(index=delta.index, delta=text or ChoiceDelta(), logprobs=logprobs)])
        for part in delta.tool_call_parts:  # a call's head as soon as its name is known, then its arguments
            yield chunk([ChunkChoice(index=delta.index, delta=ChoiceDelta(tool_calls=[_tool_delta(part)]))])
        if delta.finish_reason:
            yield chunk([ChunkChoice(index=delta.index, delta=ChoiceDelta(), finish_reason=delta.finish_reason)])
    if _include_usage(body):
        yield chunk([], _usage(generation.usage))


def _text_delta(reasoning: str, content: str) -> ChoiceDelta | None:
    if not reasoning and not content:
        return None
    return ChoiceDelta(content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None)


def _tool_delta(part: ToolCallPart) -> dict:
    """A call part as OpenAI streams it: the head with id, type and name (arguments ""), then argument pieces."""
    if part.id is not None:
        return {"index": part.index, "id": part.id, "type": "function",
                "function": {"name": part.name, "arguments": part.arguments}}  # fmt: skip
    return {"index": part.index, "function": {"arguments": part.arguments}}


async def _completion_chunks(generation: Generation, body: CompletionRequest) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return Completion(
            id=f"cmpl-{generation.id}", created=generation.created, model=body.model, choices=choices, usage=usage
        ).model_dump_json(exclude={"usage"} if usage is None else set())

    offsets: dict[int, int] = {}  # per choice, where its next token starts in its whole text
    async for delta in generation.deltas():
        if delta.ping:
            yield PING
        elif delta.finish_reason:
            yield chunk([CompletionChoice(index=delta.index, text="", finish_reason=delta.finish_reason)])
        else:
            logprobs = None
            if delta.logprobs is not None:
                start = offsets.get(delta.index, 0)
                logprobs = _completion_logprobs(delta.logprobs, start=start)
                offsets[delta.index] = start + sum(len(entry["token"]) for entry in delta.logprobs)
            yield chunk([CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs)])
    if _include_usage(body):
        yield chunk([], _usage(generation.usage))


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


def _completion_logprobs(entries: list[dict], *, start: int = 0) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists, alternatives as {token: logprob}; `text_offset` counts from
    `start`, where the entries' first token begins in the choice's whole text (a stream's later chunks)."""
    offsets, offset = [], start
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return CompletionLogprobs(
        tokens=[e["token"] for e in entries],
        token_logprobs=[e["logprob"] for e in entries],
        top_logprobs=[{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
        text_offset=offsets,
    )


def _usage(usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=usage.reasoning_tokens,
            accepted_prediction_tokens=usage.accepted_prediction_tokens,
            rejected_prediction_tokens=usage.rejected_prediction_tokens,
        ),
    )
