"""Server-sent events: `data: {json}\\n\\n` frames, an error frame when the 200 has already gone, `[DONE]`."""

import json
from collections.abc import AsyncIterator

from django.http import StreamingHttpResponse

from core.errors import MinervaError
from inference.streams import TokenStream

PING = ": ping\n\n"


async def frames(stream: TokenStream, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """An async generator: under ASGI a sync iterator would be read in full before anything is sent."""
    finished = False
    try:
        async for chunk in chunks:
            # A comment line keeps proxies and client idle timers (OpenCode's is 300 s) from giving up while
            # the request waits in the queue or in a long prefill.
            yield PING if chunk is PING else f"data: {chunk}\n\n"
        finished = True
    except MinervaError as exc:  # the 200 has already gone out, so the error is a frame
        finished = True
        yield f"data: {json.dumps(exc.to_dict())}\n\n"
    finally:
        # The client went away (Django cancels the response task, or the iterator is closed early):
        # tell the worker to stop at its next token.
        if not finished:
            await stream.cancel()
    yield "data: [DONE]\n\n"


def sse_response(stream: TokenStream, chunks: AsyncIterator[str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(frames(stream, chunks), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response
