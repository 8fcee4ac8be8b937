"""TokenStream: one Redis Stream per request. The worker appends events; the view reads them.

Unlike pub/sub, a Stream keeps its events, so a view that starts reading late (or a test that reads after an
eager task already ran) still sees everything from id 0. Keys expire MINERVA_STREAM_TTL after the last event."""

import json
import time
from collections.abc import AsyncIterator

from django.conf import settings

from api.errors import Timeout
from minerva_project.redis import get_async_redis, get_redis

READ_BLOCK_MS = 1000


class TokenStream:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self.key = f"minerva:request:{request_id}"
        self.cancel_key = f"{self.key}:cancel"

    # -- worker side (sync) --------------------------------------------------------------------------

    def publish(self, event: str, **data) -> None:
        """Append one event (`start`, `token`, `done` or `error`) and push the expiry forward."""
        pipe = get_redis().pipeline(transaction=False)
        pipe.xadd(
            self.key,
            {"event": event, "data": json.dumps(data, ensure_ascii=False)},
            maxlen=settings.STREAM_MAXLEN,
            approximate=True,
        )
        pipe.expire(self.key, settings.STREAM_TTL)
        pipe.execute()

    def cancelled(self) -> bool:
        """Whether the client went away (checked by the worker between tokens)."""
        return bool(get_redis().exists(self.cancel_key))

    # -- view side (async) ---------------------------------------------------------------------------

    async def cancel(self) -> None:
        """Ask the worker to stop (or never start) this request."""
        client = get_async_redis()
        try:
            await client.set(self.cancel_key, "1", ex=settings.STREAM_TTL)
        finally:
            await client.aclose()

    async def read(self, *, choices: int = 1, ping_every: float | None = None) -> AsyncIterator[tuple[str, dict]]:
        """Yield (event, data) from the first event on, until every choice is `done`, an `error`, or
        MINERVA_REQUEST_TIMEOUT. With `ping_every`, a ("ping", {}) comes after that many quiet seconds."""
        deadline = time.monotonic() + settings.REQUEST_TIMEOUT
        client = get_async_redis()
        last_id = "0"
        last_yield = time.monotonic()
        try:
            while True:
                if time.monotonic() > deadline:
                    raise Timeout("The request timed out waiting for the model.")
                reply = await client.xread({self.key: last_id}, block=READ_BLOCK_MS, count=256)
                if not reply and ping_every is not None and time.monotonic() - last_yield >= ping_every:
                    last_yield = time.monotonic()
                    yield "ping", {}
                for _key, entries in reply or []:
                    for entry_id, fields in entries:
                        last_id = entry_id
                        event = fields["event"]
                        last_yield = time.monotonic()
                        yield event, json.loads(fields["data"])
                        if event == "done":
                            choices -= 1
                        if event == "error" or choices == 0:
                            return
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
