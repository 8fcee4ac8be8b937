"""A Responses API answer built from neutral deltas: its output items (reasoning, message, function_call) and the
stream events that announce them. One builder serves a streamed answer, a non-streamed one and a background one
folded on its worker, so the three cannot disagree; item ids come from the response id, so the view and the worker
name the same items alike. No Django here."""

from dataclasses import dataclass, field

from core.errors import MinervaError
from inference.serving import Delta, Usage

# A Responses API error's `code` is one of a fixed list (ResponseErrorCode): ours are mapped onto it by status.
ERROR_CODES = {429: "rate_limit_exceeded"}


def item_id(prefix: str, response_id: str, index: int) -> str:
    """The id of a response's `index`-th output item (`msg_`, `rs_`, `fc_`), or of its calls (`call_`)."""
    return f"{prefix}_{response_id.removeprefix('resp_')}{index:02x}"


def response_error(exc: MinervaError) -> dict:
    """A failed response's `error`: OpenAI's fixed codes (a client mistake is `invalid_prompt`), our message."""
    code = ERROR_CODES.get(exc.status) or ("invalid_prompt" if exc.status < 500 else "server_error")
    return {"code": code, "message": exc.message}


def response_object(*, response_id: str, created_at: int, model: str, params: dict, status: str,
                    output: list[dict] | None = None, usage: dict | None = None, error: dict | None = None,
                    incomplete_reason: str = "", completed_at: int | None = None) -> dict:  # fmt: skip
    """The Response object: the outcome so far, and what the request asked for (`params`, see the protocol's
    `echo()`)."""
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": params.get("background", False),
        "completed_at": completed_at if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": params.get("instructions"),
        "max_output_tokens": params.get("max_output_tokens"),
        "metadata": params.get("metadata") or {},
        "model": model,
        "output": output or [],
        "parallel_tool_calls": params.get("parallel_tool_calls", True),
        "previous_response_id": params.get("previous_response_id"),
        "reasoning": params.get("reasoning"),
        "store": params.get("store", True),
        "temperature": params.get("temperature"),
        "text": params.get("text") or {"format": {"type": "text"}},
        "tool_choice": params.get("tool_choice", "auto"),
        "tools": params.get("tools") or [],
        "top_p": params.get("top_p"),
        "truncation": "disabled",
    }
    if usage is not None:  # an object once known, absent before
        response["usage"] = usage
    if params.get("user") is not None:  # a string when present
        response["user"] = params["user"]
    return response


@dataclass
class _Open:
    """The output item being written: its place in `output`, the item as announced, and its text so far."""

    index: int
    item: dict
    parts: list[str] = field(default_factory=list)


class OutputBuilder:
    """Fold one answer's deltas into output items. `feed()` and `finish()` return the stream events (without
    `sequence_number`, which the stream adds) that announce each item, its text and its end."""

    def __init__(self, response_id: str):
        self.response_id = response_id
        self.output: list[dict] = []  # every item so far; the open one as announced until it ends
        self.open: _Open | None = None
        self.held = ""  # whitespace before the answer's first words: an answer that is only a tool call drops it
        self.finish_reason: str | None = None

    def feed(self, delta: Delta) -> list[dict]:
        events: list[dict] = []
        if delta.reasoning:
            events += self._write("reasoning", delta.reasoning)
        if delta.text:
            events += self._text(delta.text)
        for part in delta.tool_call_parts:  # a call's head once its name is known, then its arguments as written
            if part.id is not None:
                events += self._close() + self._start("function_call", name=part.name)
            events += self._write("function_call", part.arguments)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        return events

    def finish(self) -> list[dict]:
        """End the answer: close the open item; an answer with nothing in it gets an empty message."""
        events = self._close()
        if not self.output and self.finish_reason != "cancelled":
            events += self._start("message") + self._write("message", self.held, always=True) + self._close()
        return events

    @property
    def status(self) -> str:
        return {"length": "incomplete", "cancelled": "cancelled"}.get(self.finish_reason or "", "completed")

    def result(self, usage: Usage) -> dict:
        """The outcome, as a stored response keeps it (and the Response object shows it)."""
        return {"status": self.status, "output": self.output, "usage": self.usage(usage), "error": None,
                "incomplete_reason": "max_output_tokens" if self.status == "incomplete" else ""}  # fmt: skip

    def failed(self, exc: MinervaError) -> dict:
        """The outcome of an answer that ended in an error: what it had written, and the error."""
        self._close(status="incomplete")
        return {"status": "failed", "output": self.output, "usage": None, "error": response_error(exc),
                "incomplete_reason": ""}  # fmt: skip

    def usage(self, usage: Usage) -> dict:
        # Every prompt token not found in a slot's cache is written to it.
        return {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": usage.prompt_tokens - usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }  # fmt: skip

    # -- items ---------------------------------------------------------------------------------------------

    def _text(self, text: str) -> list[dict]:
        if self.open is not None and self.open.item["type"] == "message":
            return self._write("message", text)
        if not (self.held + text).strip():
            self.held += text
            return []
        text, self.held = self.held + text, ""
        return self._write("message", text)

    def _start(self, kind: str, name: str = "") -> list[dict]:
        index = len(self.output)
        if kind == "message":
            item = {"id": item_id("msg", self.response_id, index), "type": "message", "status": "in_progress",
                    "content": [], "role": "assistant"}  # fmt: skip
        elif kind == "reasoning":
            item = {"id": item_id("rs", self.response_id, index), "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}  # fmt: skip
        else:
            item = {"id": item_id("fc", self.response_id, index), "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": item_id("call", self.response_id, index), "name": name}  # fmt: skip
        self.open = _Open(index, item)
        self.output.append(item)
        events = [{"type": "response.output_item.added", "output_index": index, "item": dict(item)}]
        if kind != "function_call":
            events.append({"type": "response.content_part.added", **self._where(), "part": self._part("")})
        return events

    def _write(self, kind: str, text: str, *, always: bool = False) -> list[dict]:
        events = [] if self.open is not None and self.open.item["type"] == kind else self._close() + self._start(kind)
        if not text and not always:
            return events
        self.open.parts.append(text)
        delta = {"type": f"response.{_DELTA[kind]}.delta", **self._where(), "delta": text}
        if kind == "message":
            delta["logprobs"] = []
        elif kind == "function_call":
            del delta["content_index"]
        return [*events, delta]

    def _close(self, status: str | None = None) -> list[dict]:
        if self.open is None:
            return []
        status = status or ("incomplete" if self.finish_reason in ("length", "cancelled") else "completed")
        kind, text = self.open.item["type"], "".join(self.open.parts)
        where = self._where()
        if kind == "function_call":
            item = {**self.open.item, "arguments": text, "status": status}
            events = [{"type": "response.function_call_arguments.done", **where, "name": item["name"],
                       "arguments": text}]  # fmt: skip
            del events[0]["content_index"]
        else:
            item = {**self.open.item, "content": [self._part(text)], "status": status}
            done = {"type": f"response.{_DELTA[kind]}.done", **where, "text": text}
            if kind == "message":
                done["logprobs"] = []
            events = [done, {"type": "response.content_part.done", **where, "part": self._part(text)}]
        events.append({"type": "response.output_item.done", "output_index": self.open.index, "item": item})
        self.output[self.open.index] = item
        self.open = None
        return events

    def _where(self) -> dict:
        return {"item_id": self.open.item["id"], "output_index": self.open.index, "content_index": 0}

    def _part(self, text: str) -> dict:
        if self.open.item["type"] == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


_DELTA = {"message": "output_text", "reasoning": "reasoning_text", "function_call": "function_call_arguments"}
