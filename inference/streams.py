"""TokenStream: one Redis Stream per request. The worker appends events; the view reads them.

Unlike pub/sub, a Stream keeps its events, so a view that starts reading late (or a test that reads after an
eager task already ran) still sees everything from id 0. A live stream's keys expire MINERVA_STREAM_TTL after its
last event; once its reader has read the end, or its worker has finished the request, FINISHED_TTL_SECONDS.
Nothing is ever trimmed: a stream that would pass MINERVA_STREAM_MAXLEN events ends its request with an error."""

import json
import logging
import time
from collections.abc import AsyncIterator

from django.conf import settings
from redis.exceptions import RedisError

from core.errors import ServiceUnavailable, Timeout, WorkerLost
from core.redis import get_async_redis, get_redis
from core.workers import worker_key

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
FINISHED_TTL_SECONDS = 60  # a finished stream's keys: long enough for the worker's log and a batch line to read it
# Why a request was cancelled: the value of its cancel flag (the worker logs each differently).
CANCEL_CLIENT, CANCEL_TIMEOUT, CANCEL_OVERFLOW = "client", "timeout", "overflow"


def timed_out() -> Timeout:
    """The error of a request whose reader heard nothing for MINERVA_REQUEST_TIMEOUT (its worker logs it too)."""
    return Timeout(f"No answer from the model for {settings.REQUEST_TIMEOUT} s; the request was stopped.")


class TokenStream:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self.key = f"minerva:request:{request_id}"
        self.cancel_key = f"{self.key}:cancel"

    # -- worker side (sync) --------------------------------------------------------------------------

    def publish(self, event: str, **data) -> None:
        """Append one event (`accepted`, `start`, `token`, `done` or `error`) and push the expiry forward."""
        pipe = get_redis().pipeline(transaction=False)
        pipe.xadd(self.key, {"event": event, "data": json.dumps(data, ensure_ascii=False)})
        pipe.expire(self.key, settings.STREAM_TTL)
        pipe.execute()

    def finished(self, keep: int = FINISHED_TTL_SECONDS) -> None:
        """The request is over: its keys need only outlive a reader that is still catching up (`keep` seconds; a
        background response's, MINERVA_STREAM_TTL, so that it can be streamed again)."""
        pipe = get_redis().pipeline(transaction=False)
        pipe.expire(self.key, keep)
        pipe.expire(self.cancel_key, keep)  # a cancelled request's detached readers end on its flag
        pipe.execute()

    def text(self) -> list[str]:
        """Each choice's generated text so far, read back from the stream (for MINERVA_LOG_CONTENT)."""
        texts: dict[int, list[str]] = {}
        for event, data in self.events():
            if event == "token":
                texts.setdefault(data["index"], []).append(data["text"])
        return ["".join(texts[i]) for i in sorted(texts)]

    def events(self) -> list[tuple[str, dict]]:
        """Every event published so far, without waiting for more (a finished request's, read back on its worker)."""
        return [(fields["event"], json.loads(fields["data"])) for _id, fields in get_redis().xrange(self.key)]

    def cancelled(self) -> str | None:
        """Why the request was cancelled (CANCEL_CLIENT, CANCEL_TIMEOUT, CANCEL_OVERFLOW), or None."""
        return get_redis().get(self.cancel_key)

    # -- view side (async) ---------------------------------------------------------------------------

    async def cancel(self, reason: str = CANCEL_CLIENT) -> None:
        """Ask the worker to stop (or never start) this request. The first reason given stays (nx): a client
        that leaves after its request timed out does not turn the timeout into a disconnect."""
        client = get_async_redis()
        try:
            await client.set(self.cancel_key, reason, ex=settings.STREAM_TTL, nx=True)
        except RedisError:  # Redis is down: the worker's own publish fails too, and it stops
            logger.warning("could not cancel request %s", self.request_id, exc_info=True)
        finally:
            await client.aclose()

    async def read(self, *, choices: int = 1, ping_every: float | None = None,
                   detached: bool = False) -> AsyncIterator[tuple[str, dict]]:  # fmt: skip
        """Yield (event, data) from the first event on, until every choice is `done` or an `error`. With
        `ping_every`, a ("ping", {}) comes after that many quiet seconds. A `detached` reader (a background
        response's stream, one choice) does not own the request: its silence timeout ends only the read, reading to
        the end leaves the stream's expiry as the worker set it, and once the request is cancelled (by someone
        else: a cancelled generation publishes nothing more) it ends with a `done` of its own, finish_reason
        `cancelled`, counting the tokens it read.

        MINERVA_REQUEST_TIMEOUT bounds silence, not length: no event for that long (in the queue, loading the
        model, in prefill or generating text held back) cancels the request in its worker with reason
        `timeout` and raises Timeout; a generation that keeps producing events runs as long as it needs. Only
        an empty read counts as silence, so a consumer that is slow to take events is never timed out.

        The worker's `accepted` event names it; from then on, each quiet second checks that worker's heartbeat,
        so a worker that died mid-request is a `worker_lost` error within seconds, not a hang until the
        timeout. (The watchdog is separate from the pings, which only keep the client's connection alive.)"""
        client = get_async_redis()
        last_id = "0"
        last_event = last_yield = time.monotonic()
        worker = None
        prompt: dict = {}  # the prompt's usage, from `start`; and how many tokens were read (a detached reader's end)
        tokens = 0
        try:
            while True:
                reply = await client.xread({self.key: last_id}, block=READ_BLOCK_MS, count=256)
                if not reply and time.monotonic() - last_event > settings.REQUEST_TIMEOUT:
                    if detached:
                        raise Timeout(f"No event for {settings.REQUEST_TIMEOUT} s; the response goes on: retrieve "
                                      "it later.")  # fmt: skip
                    await self.cancel(CANCEL_TIMEOUT)
                    raise timed_out()
                if not reply and worker is not None and not await client.exists(worker_key(worker)):
                    raise WorkerLost()
                if not reply and detached and await client.exists(self.cancel_key):
                    yield "done", {"index": 0, "finish_reason": "cancelled", "completion_tokens": tokens, **prompt}
                    return
                if not reply and ping_every is not None and time.monotonic() - last_yield >= ping_every:
                    last_yield = time.monotonic()
                    yield "ping", {}
                for _key, entries in reply or []:
                    last_event = time.monotonic()
                    for entry_id, fields in entries:
                        last_id = entry_id
                        event, data = fields["event"], json.loads(fields["data"])
                        if event == "accepted":
                            worker = data["worker"]
                            continue
                        last_yield = time.monotonic()
                        if event == "start":
                            prompt = {k: data[k] for k in ("prompt_tokens", "cached_tokens") if k in data}
                        tokens += event == "token"
                        yield event, data
                        if event == "done":
                            choices -= 1
                        if event == "error" or choices == 0:
                            if not detached:
                                await client.expire(self.key, FINISHED_TTL_SECONDS)  # read to its end
                            return
        except RedisError:
            raise ServiceUnavailable(
                "Lost the connection to Redis while streaming this request; try again.", code="redis_unavailable"
            ) from None
        finally:
            await client.aclose()


class RedisStepIO:
    """The engine's StepIO: one pipeline per decode step publishes every sequence's events and checks every
    running sequence's cancel flag, so a step costs one Redis round trip however many sequences it holds.

    A stream is never trimmed (a trimmed stream would silently lose a long answer's beginning). Instead, a request
    whose stream would pass MINERVA_STREAM_MAXLEN events is stopped: its further events are not published, its
    cancel flag says `overflow`, and its worker ends it with an error event (room for it is kept)."""

    RESERVED = 2  # the `accepted` and final `error` events, published by request_run, not counted here

    def __init__(self):
        self.published: dict[str, int] = {}  # events published per running request (only the IO thread counts)
        self.overflowing: set[str] = set()

    def step(self, events: list, active: list) -> set:
        live = {sequence.key for sequence in active} | {sequence.key for sequence, _, _ in events}
        self.published = {key: count for key, count in self.published.items() if key in live}
        self.overflowing &= live
        # A step that starts a request goes in one MULTI/EXEC: Redis wakes a blocked reader after each command
        # otherwise, and the view would read `start` alone and its first token in a second round trip.
        starts = any(event == "start" for _sequence, event, _data in events)
        pipe = get_redis().pipeline(transaction=starts)
        for sequence, event, data in events:
            if sequence.key in self.overflowing:
                continue
            count = self.published.get(sequence.key, 0) + 1
            stream = TokenStream(sequence.key)
            if count > settings.STREAM_MAXLEN - self.RESERVED:
                self.overflowing.add(sequence.key)
                pipe.set(stream.cancel_key, CANCEL_OVERFLOW, ex=settings.STREAM_TTL, nx=True)
                continue
            self.published[sequence.key] = count
            fields = {"event": event, "data": json.dumps(data, ensure_ascii=False)}
            pipe.xadd(stream.key, fields)
            pipe.expire(stream.key, settings.STREAM_TTL)
        checked = [sequence for sequence in active if sequence.key not in self.overflowing]
        for sequence in checked:
            pipe.exists(TokenStream(sequence.key).cancel_key)
        replies = pipe.execute()
        flags = replies[len(replies) - len(checked) :]
        cancelled = {sequence for sequence, flag in zip(checked, flags, strict=True) if flag}
        return cancelled | {sequence for sequence in active if sequence.key in self.overflowing}
