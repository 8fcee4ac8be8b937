"""Splitting a model's reasoning from its answer (a leaf module, like protocol.py): a thinking model's
`<think>...</think>`, and gpt-oss's Harmony channels.

Text arrives in deltas that may cut a tag anywhere (`<thi` + `nk>`), so the splitters hold back what could still
become a tag. A template that opens the thinking itself (its generation prompt ends in `<think>`) starts the
splitter inside it."""

import re

OPEN, CLOSE = "<think>", "</think>"
# Calls that end a thought the model did not close (Qwen3.5, DeepSeek V3.2 / V4 and Kimi K2 call tools straight
# from their thinking, as llama.cpp's parsers allow): the call is the answer's.
THOUGHT_ENDS = {
    "qwen3_coder": ("<tool_call>",),
    "deepseek_v3_2": ("<｜DSML｜function_calls>",),
    "deepseek_v4": ("<｜DSML｜tool_calls>",),
    "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_call_begin|>"),
}


def reasoning_splitter(syntax: str | None, tool_format: str | None, *, thinking: bool, calls: bool):
    """The splitter for one choice: Harmony's channels when the worker's `start` event says "harmony", else
    <think> tags (`thinking`: the template opened one; `tool_format`: the calls that also end a thought; `calls`:
    whether tool calls are read from the answer)."""
    if syntax == "harmony":
        return HarmonySplitter(calls=calls)
    if syntax == "none":  # reasoning_format none: everything is content, <think> tags and all
        return ReasoningSplitter(passthrough=True)
    return ReasoningSplitter(thinking=thinking, ends=THOUGHT_ENDS.get(tool_format, ()) if calls else ())


class ReasoningSplitter:
    def __init__(self, *, thinking: bool = False, ends: tuple[str, ...] = (), passthrough: bool = False):
        self.state = "thinking" if thinking else "start"  # start -> (thinking -> after ->) answer
        if passthrough:
            self.state = "answer"
        self.pending = ""
        self.ends = ends  # tags that end a thought and begin the answer (a tool call)

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that is safe to emit for this delta."""
        self.pending += text
        reasoning = content = ""
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(OPEN):
                    self.pending, self.state = stripped[len(OPEN) :], "thinking"
                    continue
                if OPEN.startswith(stripped):  # could still become <think>: wait
                    return reasoning, content
                self.state = "answer"
            if self.state == "thinking":
                end, tag = _first(self.pending, (CLOSE, *self.ends))
                if end >= 0:
                    reasoning += self.pending[:end]
                    if tag == CLOSE:
                        self.pending, self.state = self.pending[end + len(CLOSE) :], "after"
                    else:  # a call: the answer starts with it
                        self.pending, self.state = self.pending[end:], "answer"
                    continue
                keep = max(_partial_suffix(self.pending, tag) for tag in (CLOSE, *self.ends))
                reasoning += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                return reasoning, content
            if self.state == "after":  # the newlines between the thought and the answer belong to neither
                self.pending = self.pending.lstrip("\n")
                if not self.pending:
                    return reasoning, content
                self.state = "answer"
            content += self.pending
            self.pending = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is left when the answer ends (an unclosed thought stays reasoning)."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.state == "thinking" else ("", rest)


# Harmony: each message is a header (`<|start|>assistant`, `<|channel|>NAME`, maybe ` to=RECIPIENT` and a content
# type) up to `<|message|>`, then its text up to `<|end|>` (or the next header when the model skips it; `<|return|>`
# and `<|call|>` end the generation). The generation prompt ends in `<|start|>assistant`, so the answer starts with a
# header.
MESSAGE = "<|message|>"
_HEADERS = ("<|start|>", "<|channel|>", "to=")
_BODY_ENDS = ("<|end|>", "<|start|>", "<|channel|>", "<|return|>", "<|call|>")  # the last two end the generation
_NEXT_HEADER = ("<|start|>", "<|channel|>")  # a body that ends in these is followed by a header (no <|end|>)
_HEADER_LIMIT = 512  # characters of a header without <|message|>: past this, the model is not writing Harmony


class HarmonySplitter:
    """gpt-oss's channels: `analysis` is reasoning; `final`, and `commentary` without a recipient (a preamble to
    calls), are the answer; a message to `functions.NAME` is a tool call, passed on in the content as
    `to=functions.NAME<|message|>ARGS` for the harmony tool-call reader (inference/tool_calls.py), or dropped when
    no tools were offered. Same interface as ReasoningSplitter."""

    def __init__(self, *, calls: bool = False):
        self.calls = calls
        self.state = "header"  # header -> body -> header ...
        self.route = "content"  # where the body goes: reasoning, content or drop
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        out = {"reasoning": [], "content": [], "drop": []}
        while True:
            if self.state == "header":
                at = self.pending.find(MESSAGE)
                head = self.pending.lstrip()
                writing = not head or any(h.startswith(head) or head.startswith(h) for h in _HEADERS)
                if at < 0 and writing and len(self.pending) <= _HEADER_LIMIT:
                    break  # a header still being written
                if at < 0 or not any(head.startswith(h) for h in _HEADERS):  # no Harmony: plain text is the answer
                    self.state, self.route = "body", "content"
                    continue
                self.route, prefix = self._route(self.pending[:at])
                out["content"].append(prefix)
                self.pending = self.pending[at + len(MESSAGE) :]
                self.state = "body"
                continue
            end, tag = _first(self.pending, _BODY_ENDS)
            if end < 0:
                keep = max(_partial_suffix(self.pending, tag) for tag in _BODY_ENDS)
                out[self.route].append(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                break
            out[self.route].append(self.pending[:end])
            self.pending = self.pending[end + (0 if tag in _NEXT_HEADER else len(tag)) :]
            self.state = "header"
        return "".join(out["reasoning"]), "".join(out["content"])

    def flush(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        if self.state == "header":  # cut off in a header: nothing of it is text
            return "", ""
        return (rest, "") if self.route == "reasoning" else ("", rest if self.route == "content" else "")

    def _route(self, header: str) -> tuple[str, str]:
        """Where a message's text goes, and what goes before it in the content."""
        recipient = re.search(r"to=([^\s<]+)", header)
        if recipient:
            if self.calls and recipient[1].startswith("functions."):
                return "content", f"to={recipient[1]}{MESSAGE}"
            return "drop", ""  # a call to a tool nobody offered (or a built-in one)
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        return ("reasoning" if channel and channel[1] == "analysis" else "content"), ""


def _first(text: str, tags: tuple[str, ...]) -> tuple[int, str]:
    """The first of `tags` in `text`: (where, which), or (-1, "")."""
    found = [(at, tag) for tag in tags if (at := text.find(tag)) >= 0]
    return min(found) if found else (-1, "")


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
