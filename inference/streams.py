"""TokenStream: one Redis Stream per request. The worker appends events; the view reads them.

Unlike pub/sub, a Stream keeps its events, so a view that starts reading late (or a test that reads after an
eager task already ran) still sees everything from id 0. Keys expire MINERVA_STREAM_TTL after the last event."""

import json
import logging
import time
from collections.abc import AsyncIterator

from django.conf import settings
from redis.exceptions import RedisError

from api.errors import ServiceUnavailable, Timeout, WorkerLost
from minerva_project.redis import get_async_redis, get_redis

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 1000


class TokenStream:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self.key = f"minerva:request:{request_id}"
        self.cancel_key = f"{self.key}:cancel"

    # -- worker side (sync) --------------------------------------------------------------------------

    def publish(self, event: str, **data) -> None:
        """Append one event (`accepted`, `start`, `token`, `done` or `error`) and push the expiry forward."""
        pipe = get_redis().pipeline(transaction=False)
        pipe.xadd(
            self.key,
            {"event": event, "data": json.dumps(data, ensure_ascii=False)},
            maxlen=settings.STREAM_MAXLEN,
            approximate=True,
        )
        pipe.expire(self.key, settings.STREAM_TTL)
        pipe.execute()

    def text(self) -> list[str]:
        """Each choice's generated text so far, read back from the stream (for MINERVA_LOG_CONTENT)."""
        texts: dict[int, list[str]] = {}
        for _id, fields in get_redis().xrange(self.key):
            if fields["event"] == "token":
                data = json.loads(fields["data"])
                texts.setdefault(data["index"], []).append(data["text"])
        return ["".join(texts[i]) for i in sorted(texts)]

    def cancelled(self) -> bool:
        """Whether the client went away (checked by the worker between tokens)."""
        return bool(get_redis().exists(self.cancel_key))

    # -- view side (async) ---------------------------------------------------------------------------

    async def cancel(self) -> None:
        """Ask the worker to stop (or never start) this request."""
        client = get_async_redis()
        try:
            await client.set(self.cancel_key, "1", ex=settings.STREAM_TTL)
        except RedisError:  # Redis is down: the worker's own publish fails too, and it stops
            logger.warning("could not cancel request %s", self.request_id, exc_info=True)
        finally:
            await client.aclose()

    async def read(self, *, choices: int = 1, ping_every: float | None = None) -> AsyncIterator[tuple[str, dict]]:
        """Yield (event, data) from the first event on, until every choice is `done`, an `error`, or
        MINERVA_REQUEST_TIMEOUT. With `ping_every`, a ("ping", {}) comes after that many quiet seconds.

        The worker's `accepted` event names it; from then on, each quiet second checks that worker's heartbeat,
        so a worker that died mid-request is a `worker_lost` error within seconds, not a hang until the
        timeout. (The watchdog is separate from the pings, which only keep the client's connection alive.)"""
        from .worker import worker_key

        deadline = time.monotonic() + settings.REQUEST_TIMEOUT
        client = get_async_redis()
        last_id = "0"
        last_yield = time.monotonic()
        worker = None
        try:
            while True:
                if time.monotonic() > deadline:
                    raise Timeout("The request timed out waiting for the model.")
                reply = await client.xread({self.key: last_id}, block=READ_BLOCK_MS, count=256)
                if not reply and worker is not None and not await client.exists(worker_key(worker)):
                    raise WorkerLost()
                if not reply and ping_every is not None and time.monotonic() - last_yield >= ping_every:
                    last_yield = time.monotonic()
                    yield "ping", {}
                for _key, entries in reply or []:
                    for entry_id, fields in entries:
                        last_id = entry_id
                        event, data = fields["event"], json.loads(fields["data"])
                        if event == "accepted":
                            worker = data["worker"]
                            continue
                        last_yield = time.monotonic()
                        yield event, data
                        if event == "done":
                            choices -= 1
                        if event == "error" or choices == 0:
                            return
        except RedisError:
            raise ServiceUnavailable(
                "Lost the connection to Redis while streaming this request; try again.", code="redis_unavailable"
            ) from None
        finally:
            await client.aclose()


class RedisStepIO:
    """The engine's StepIO: one pipeline per decode step publishes every sequence's events and checks every
    running sequence's cancel flag, so a step costs one Redis round trip however many sequences it holds."""

    def step(self, events: list, active: list) -> set:
        pipe = get_redis().pipeline(transaction=False)
        for sequence, event, data in events:
            key = TokenStream(sequence.key).key
            fields = {"event": event, "data": json.dumps(data, ensure_ascii=False)}
            pipe.xadd(key, fields, maxlen=settings.STREAM_MAXLEN, approximate=True)
            pipe.expire(key, settings.STREAM_TTL)
        for sequence in active:
            pipe.exists(TokenStream(sequence.key).cancel_key)
        flags = pipe.execute()[2 * len(events) :]
        return {sequence for sequence, flag in zip(active, flags, strict=True) if flag}
