"""The view side of a generation, for every client surface: submit a neutral request, watch its worker, and turn the
worker's token events into neutral deltas (reasoning split from the answer, tool calls parsed), once, here. A
surface only renders deltas in its own wire format; a non-streamed answer is a fold of the same deltas."""

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.conf import settings

from access.models import ApiKey
from core.errors import MinervaError, ServerError, WorkerLost
from core.generation import EmbeddingRequest, GenerationRequest, TokenizeRequest

from .reasoning import HarmonySplitter, ReasoningSplitter, reasoning_splitter
from .services import embedding_create, request_create, request_worker_lost, tokenize_create
from .streams import TokenStream
from .tool_calls import ToolCallPart, ToolCallStream, calls_fold


@dataclass
class Delta:
    """What one choice adds to its answer, in order: reasoning, text, then parts of tool calls (a call's head as
    soon as its name is known, then pieces of its arguments as they are written: what streaming surfaces send).
    A choice's last delta has `finish_reason` ("tool_calls" when it called tools) and `tool_calls`, its calls
    whole (for surfaces that send calls whole). `ping` marks a quiet interval (nothing else is set)."""

    index: int = 0
    text: str = ""
    reasoning: str = ""
    tool_call_parts: list[ToolCallPart] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)  # whole calls: {"id", "type", "function": {name, arguments}}
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None  # on the last delta: the stop string that ended the choice, if one did
    ping: bool = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # generated tokens that went to reasoning (a token straddling its end counts)
    # Speculative decoding: drafted tokens the model kept (they are in completion_tokens) and those it did not.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


@dataclass
class Choice:
    index: int
    text: str | None = ""
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_sequence: str | None = None


@dataclass
class Answer:
    choices: list[Choice]
    usage: Usage


class Generation:
    """One submitted request: its id and the deltas of its n choices."""

    def __init__(self, request_id: str, body: GenerationRequest, events: AsyncIterator[tuple[str, dict]]):
        self.id, self.body, self.events = request_id, body, events
        self.stream = TokenStream(request_id)
        self.created = int(time.time())
        self.n = body.n
        self.thinking = False  # the template opened a <think> block (from the `start` event)
        self.tool_format = "generic"  # how the model writes tool calls (from the `start` event)
        self.reasoning = "think"  # how it writes its reasoning: <think> tags, or "harmony" channels (`start` event)
        self.usage = Usage()  # the prompt's once started, complete once deltas() has ended
        self.detached = False  # read by a client that does not own it (generation_attach): leaving cancels nothing

    def started(self, data: dict) -> None:
        """Take what the worker's `start` event says about the answer to come, and the prompt's size."""
        self.thinking = data.get("thinking", False)
        self.tool_format = data.get("tool_format", self.tool_format)
        self.reasoning = data.get("reasoning", self.reasoning)
        self.usage = Usage(prompt_tokens=data.get("prompt_tokens", 0), cached_tokens=data.get("cached_tokens", 0))

    async def deltas(self) -> AsyncIterator[Delta]:
        """The answer as it is generated. Raises the request's MinervaError if it fails."""
        splitters: dict[int, ReasoningSplitter | HarmonySplitter] = {}  # per choice (chats): reasoning split off
        tool_streams: dict[int, ToolCallStream] = {}  # per choice, with tools: calls read out of the text
        parts: dict[int, list[ToolCallPart]] = {}  # per choice: every call part so far
        done: list[dict] = []
        thought = 0  # token events that carried reasoning: one token each
        chat, tools = self.body.is_chat, self.body.is_chat and self.body.tools_active()
        try:
            async for event, data in self.events:
                if event == "ping":
                    yield Delta(ping=True)
                elif event == "start":
                    self.started(data)
                elif event == "token":
                    index = data["index"]
                    if not chat:
                        yield Delta(index=index, text=data["text"], logprobs=data.get("logprobs"))
                        continue
                    if index not in splitters:
                        splitters[index] = reasoning_splitter(self.reasoning, self.tool_format, thinking=self.thinking,
                                                              calls=tools)  # fmt: skip
                        if tools:
                            tool_streams[index] = ToolCallStream(self.tool_format, self.body.offered_tools())
                            parts[index] = []
                    reasoning, text = splitters[index].feed(data["text"])
                    thought += 1 if reasoning else 0
                    items = tool_streams[index].feed(text) if index in tool_streams else [text]
                    for delta in _in_order(index, reasoning, items, data.get("logprobs")):
                        parts.get(index, []).extend(delta.tool_call_parts)
                        yield delta
                elif event == "done":
                    index = data["index"]
                    done.append(data)
                    if index in splitters:
                        reasoning, text = splitters[index].flush()
                        stream = tool_streams.get(index)
                        items = stream.feed(text) + stream.finish() if stream else [text]
                        for delta in _in_order(index, reasoning, items, None):
                            parts.get(index, []).extend(delta.tool_call_parts)
                            yield delta
                    calls = calls_fold(parts.get(index, []))
                    finish = "tool_calls" if calls and data["finish_reason"] == "stop" else data["finish_reason"]
                    yield Delta(index=index, tool_calls=calls, finish_reason=finish,
                                stop_sequence=data.get("stop_sequence"))  # fmt: skip
                elif event == "error":
                    raise MinervaError.from_dict(data)
        except asyncio.CancelledError:  # the client went away while we waited
            if not self.detached:
                await self.stream.cancel()
            raise
        prompt = done[0] if done else {}
        completion = sum(d["completion_tokens"] for d in done)
        kinds = ("accepted_prediction_tokens", "rejected_prediction_tokens")
        drafts = {k: sum(d.get(k, 0) for d in done) for k in kinds}
        self.usage = Usage(
            prompt_tokens=prompt.get("prompt_tokens", 0), cached_tokens=prompt.get("cached_tokens", 0),
            completion_tokens=completion, reasoning_tokens=min(thought, completion), **drafts,
        )  # fmt: skip

    async def collect(self) -> Answer:
        """The whole answer: the fold of deltas()."""
        choices = [Choice(index=i) for i in range(self.n)]
        texts: list[list[str]] = [[] for _ in range(self.n)]
        reasoning: list[list[str]] = [[] for _ in range(self.n)]
        async for delta in self.deltas():
            if delta.ping:
                continue
            choice = choices[delta.index]
            texts[delta.index].append(delta.text)
            reasoning[delta.index].append(delta.reasoning)
            choice.tool_calls += delta.tool_calls
            choice.logprobs += delta.logprobs or []
            if delta.finish_reason:
                choice.finish_reason, choice.stop_sequence = delta.finish_reason, delta.stop_sequence
        tools = self.body.is_chat and self.body.tools_active()
        for choice, text, thought in zip(choices, texts, reasoning, strict=True):
            choice.text = "".join(text)
            if tools:  # text around tool calls is trimmed, as the parsers trim it; none at all is null
                choice.text = choice.text.strip() or None
            choice.reasoning = "".join(thought) or None
        return Answer(choices=choices, usage=self.usage)


async def generation_start(*, request_id: str, endpoint: str, body: GenerationRequest, api_key: ApiKey | None,
                           audit: dict, on_queued: Callable[[], None],
                           task: str = "minerva.run_request") -> Generation:  # fmt: skip
    """Queue the request and wait for its first event, so a refusal (e.g. context length) is a real 4xx status even
    when streaming: a streamed answer's 200 goes out only once the worker has accepted the prompt, or once the
    first quiet interval has passed (a ping; a refusal after that arrives in the stream). `on_queued` runs once
    the request is queued: from then on the worker owns its log row. `task`: as for request_create."""
    await sync_to_async(request_create)(
        request_id=request_id, endpoint=endpoint, body=body, api_key=api_key, audit=audit, task=task
    )
    on_queued()
    ping_every = settings.SSE_PING_SECONDS if body.stream else None
    events = _watched(request_id, TokenStream(request_id).read(choices=body.n, ping_every=ping_every),
                      stream=body.stream)  # fmt: skip
    try:
        event, data = await anext(events)
    except (asyncio.CancelledError, MinervaError):  # the client left, or the wait timed out
        await TokenStream(request_id).cancel()
        raise
    if event == "error":
        raise MinervaError.from_dict(data)
    generation = Generation(request_id, body, _after((event, data), events))
    if event == "start":  # known before any delta is read: a stream's head can carry the prompt's usage
        generation.started(data)
    return generation


def generation_attach(request_id: str, body: GenerationRequest) -> Generation:
    """A queued request's generation for a client that does not own it (a background response's stream, as created
    or resumed): its events from the first on, while it runs and after; leaving or a quiet spell stops nothing."""
    events = TokenStream(request_id).read(choices=body.n, ping_every=settings.SSE_PING_SECONDS, detached=True)
    generation = Generation(request_id, body, _watched(request_id, events, stream=True))
    generation.detached = True
    return generation


def generation_replay(request_id: str, body: GenerationRequest) -> Generation:
    """A finished request's generation, rebuilt from the events in its stream (a batch line's answer)."""
    return Generation(request_id, body, TokenStream(request_id).read(choices=body.n))


async def _after(first: tuple[str, dict], events: AsyncIterator[tuple[str, dict]]):
    yield first
    async for item in events:
        yield item


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


def _in_order(index: int, reasoning: str, items: list, logprobs: list[dict] | None) -> list[Delta]:
    """Deltas for what one token added, in order: reasoning, then text and call parts as the stream read them
    (a delta's text comes before its call parts, so text after a call starts a new delta)."""
    deltas = [Delta(index=index, reasoning=reasoning, logprobs=logprobs)]
    for item in items:
        if isinstance(item, ToolCallPart):
            deltas[-1].tool_call_parts.append(item)
        elif deltas[-1].tool_call_parts:
            deltas.append(Delta(index=index, text=item))
        else:
            deltas[-1].text += item
    return [d for d in deltas if d.text or d.reasoning or d.tool_call_parts or d.logprobs is not None]


@dataclass
class Embeddings:
    """A finished embedding request: each input's vector as float32 little-endian bytes (OpenAI's base64 form,
    decoded), in input order, and the tokens its inputs had."""

    vectors: list[bytes]
    prompt_tokens: int


class Embedding:
    """One submitted embedding request."""

    def __init__(self, request_id: str, events: AsyncIterator[tuple[str, dict]]):
        self.id, self.events = request_id, events
        self.stream = TokenStream(request_id)

    async def collect(self) -> Embeddings:
        """Every vector. Raises the request's MinervaError if it fails."""
        vectors: list[bytes] = []
        prompt_tokens = 0
        try:
            async for event, data in self.events:
                if event == "embedding":  # a run of vectors, `index` the first's
                    raw = base64.b64decode(data["data"])
                    size = 4 * data["dimensions"]
                    vectors += [raw[k : k + size] for k in range(0, len(raw), size)]
                elif event == "done":
                    prompt_tokens = data.get("prompt_tokens", 0)
                elif event == "error":
                    raise MinervaError.from_dict(data)
        except asyncio.CancelledError:  # the client went away while we waited
            await self.stream.cancel()
            raise
        return Embeddings(vectors=vectors, prompt_tokens=prompt_tokens)


async def embedding_start(*, request_id: str, endpoint: str, body: EmbeddingRequest, api_key: ApiKey | None,
                          audit: dict, on_queued: Callable[[], None]) -> Embedding:  # fmt: skip
    """Queue an embedding request on its model's queue (its row written, its key's tokens reserved); collect()
    waits for its vectors. `on_queued` runs once it is queued: from then on the worker owns its log row."""
    await sync_to_async(embedding_create)(
        request_id=request_id, endpoint=endpoint, body=body, api_key=api_key, audit=audit
    )
    on_queued()
    return Embedding(request_id, _watched(request_id, TokenStream(request_id).read(), stream=False))


def embedding_replay(request_id: str) -> Embedding:
    """A finished embedding request, rebuilt from the events in its stream (a batch line's answer)."""
    return Embedding(request_id, TokenStream(request_id).read())


async def tokenize_answer(*, request_id: str, endpoint: str, body: TokenizeRequest, api_key: ApiKey | None,
                          audit: dict, on_queued: Callable[[], None]) -> dict:  # fmt: skip
    """Run a tokenizer request on its model's worker and return its answer: {"tokens"}, {"content"} or
    {"count"}. Raises its MinervaError if it fails."""
    await sync_to_async(tokenize_create)(request_id=request_id, endpoint=endpoint, body=body, api_key=api_key,
                                         audit=audit)  # fmt: skip
    on_queued()
    stream = TokenStream(request_id)
    try:
        async for event, data in _watched(request_id, stream.read(), stream=False):
            if event == "done":
                return {k: v for k, v in data.items() if k in ("tokens", "content", "count")}
            if event == "error":
                raise MinervaError.from_dict(data)
    except asyncio.CancelledError:
        await stream.cancel()
        raise
    raise ServerError()  # unreachable: a stream ends in `done` or `error`, or read() raises


async def model_load(*, request_id: str, endpoint: str, name: str, unload: bool, api_key: ApiKey | None,
                     audit: dict, on_queued: Callable[[], None]) -> str:  # fmt: skip
    """Load a model now (or unload it once its running requests end) through its queue, as Ollama's empty request
    does: a neutral `load_only` request that a worker serving the model runs. Returns "load" or "unload"."""
    body = GenerationRequest(model=name, prompt="", max_tokens=1, load_only=True, keep_alive=0 if unload else None)
    generation = await generation_start(request_id=request_id, endpoint=endpoint, body=body, api_key=api_key,
                                        audit=audit, on_queued=on_queued)  # fmt: skip
    return (await generation.collect()).choices[0].finish_reason
