"""Reading tool calls out of a model's answer while it is generated, for every tool-call format (inference/tools.py
names them). `ToolCallStream.feed` takes each piece of text as the model writes it and gives back, in order, the
free text the client may see now and the parts of calls: a call's head (its index, a new id and its name) as soon
as the name is complete, then its arguments' JSON text as it is written. Text that may start a call is held back;
a call whose name never completes (cut off, or not a call after all) is given back as text at `finish`. A non-
streamed answer is the fold of the same parts (`calls_fold`), so both ways give the same calls.

Arguments are the JSON text of the arguments value exactly as the model wrote it (a string value is decoded), so
the streamed pieces concatenate to the final arguments; the grammar that holds a call makes that text valid JSON.
The XML-style formats write one tag per argument: their arguments' JSON is built as the tags arrive, a string value
streamed as it is written (JSON-escaped), any other value (typed by the tool's schema) once its tag closes."""

import json
import re
import uuid
from dataclasses import dataclass

from core.generation import Tool

from .tools import _PYTHON_TAG, JSON_TRIGGER, NAMED, XML, XmlSyntax, value_kind

_ARGUMENT_KEYS = ("arguments", "parameters")  # llama3 writes "parameters"
_SPACE = " \t\r\n"
_NAME_LIMIT = 256  # characters a call's or an argument's name may have: past this, held text is not a call


@dataclass
class ToolCallPart:
    """A piece of the index-th call of an answer: its head (`id` and `name` set) or more of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def calls_fold(parts: list[ToolCallPart]) -> list[dict]:
    """Whole calls in OpenAI's shape (`{"id", "type", "function": {"name", "arguments"}}`) from their parts."""
    calls: dict[int, dict] = {}
    for part in parts:
        if part.id is not None:
            calls[part.index] = {"id": part.id, "type": "function", "function": {"name": part.name, "arguments": ""}}
        if part.arguments:
            calls[part.index]["function"]["arguments"] += part.arguments
    return [calls[i] for i in sorted(calls)]


def parse_tool_calls(tool_format: str, text: str, tools: list[Tool] | None = None) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole answer: the stream's fold (content trimmed; None when there is none)."""
    stream = ToolCallStream(tool_format, tools)
    items = stream.feed(text) + stream.finish()
    content = "".join(item for item in items if isinstance(item, str)).strip() or None
    return content, calls_fold([item for item in items if isinstance(item, ToolCallPart)])


class _Json:
    """Follows one JSON value character by character and reports where member values start and end: events
    ("start", path, position, first character) and ("end", path, position after it). A path is the keys and array
    indices from the root: ("tool_calls", 0, "name")."""

    def __init__(self, text: str, start: int):
        self.text = text  # the stream's whole buffer; positions index it
        self.pos = start
        self.frames: list[list] = []  # [kind "{" or "[", state, key or index, own path]
        self.string: str | None = None  # "key" or "value" while inside a string
        self.escape = False
        self.scalar = False
        self.key_start = 0
        self.end: int | None = None  # where the root value ended
        self.failed = False  # not JSON

    def path(self) -> tuple:
        return tuple(frame[2] for frame in self.frames)

    def scan(self, text: str) -> list[tuple]:
        """Read the buffer's new characters (`text` is the whole buffer, grown)."""
        self.text = text
        events: list[tuple] = []
        while self.pos < len(text) and self.end is None and not self.failed:
            self._char(text[self.pos], events)
            self.pos += 1
        return events

    def _char(self, ch: str, events: list) -> None:
        if self.string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                if self.string == "key":
                    frame = self.frames[-1]
                    frame[2], frame[1] = json.loads(self.text[self.key_start : self.pos + 1]), "colon"
                else:
                    self._ended(self.pos + 1, events)
                self.string = None
            return
        if self.scalar:
            if ch not in _SPACE and ch not in ",}]":
                return
            self.scalar = False
            self._ended(self.pos, events)
            if self.end is not None:
                return
        if ch in _SPACE:
            return
        frame = self.frames[-1] if self.frames else None
        state = frame[1] if frame else "value"
        if state == "key" and ch == '"':
            self.string, self.key_start = "key", self.pos
        elif state == "colon" and ch == ":":
            frame[1] = "value"
        elif state in ("key", "comma", "first") and ch == ("}" if frame[0] == "{" else "]"):
            self.frames.pop()
            self._ended(self.pos + 1, events, frame[3])
        elif state == "comma" and ch == ",":
            if frame[0] == "{":
                frame[1] = "key"
            else:
                frame[1], frame[2] = "value", frame[2] + 1
        elif state in ("value", "first") and ch not in ",:}]":
            path = self.path()
            events.append(("start", path, self.pos, ch))
            if ch == "{":
                self.frames.append(["{", "key", None, path])
            elif ch == "[":
                self.frames.append(["[", "first", 0, path])
            elif ch == '"':
                self.string = "value"
            else:
                self.scalar = True
        else:
            self.failed = True

    def _ended(self, end: int, events: list, path: tuple | None = None) -> None:
        events.append(("end", self.path() if path is None else path, end))
        if self.frames:
            self.frames[-1][1] = "comma"
        else:
            self.end = end


class _Call:
    """One call being read: its head goes out once its name is known, its arguments as they are written."""

    def __init__(self, index: int, name: str | None = None):
        self.index, self.name = index, name
        self.head_sent = False
        self.name_start: int | None = None  # where its "name" string starts in the buffer
        self.args_start: int | None = None  # where the arguments value starts in the buffer
        self.args_end: int | None = None
        self.args_kind = ""  # the value's first character: "{", "[", '"' or a scalar's
        self.sent_to = 0  # how far the arguments went out (a position in the buffer)
        self.args_done = False  # all of the arguments went out
        self.done = False  # the call's text ended

    def parts(self, text: str, upto: int) -> list[ToolCallPart]:
        """What can go out now, the buffer being read up to `upto`."""
        parts: list[ToolCallPart] = []
        if not self.name or self.args_done:
            return parts
        if not self.head_sent:
            self.head_sent = True
            parts.append(ToolCallPart(self.index, id=_call_id(), name=self.name))
        if self.args_start is None:
            if self.done:  # a call without arguments
                self.args_done = True
                parts.append(ToolCallPart(self.index, arguments="{}"))
            return parts
        if self.args_kind in ("{", "["):  # streamed as written
            end = self.args_end if self.args_end is not None else upto
            begin = max(self.sent_to, self.args_start)
            if end > begin:
                parts.append(ToolCallPart(self.index, arguments=text[begin:end]))
                self.sent_to = end
            self.args_done = self.args_end is not None
        elif self.args_end is not None:  # a string (the arguments' JSON as a string) or a scalar: whole
            self.args_done = True
            raw = text[self.args_start : self.args_end]
            value = json.loads(raw) if self.args_kind == '"' else raw
            parts.append(ToolCallPart(self.index, arguments=value if value and value != "null" else "{}"))
        return parts

    def cut(self, text: str) -> list[ToolCallPart]:
        """The rest when the answer ends inside the call (cut off by max_tokens): what it wrote."""
        parts = self.parts(text, len(text))
        if self.head_sent and not self.args_done and self.args_start is not None and self.args_kind not in "{[":
            parts.append(ToolCallPart(self.index, arguments=text[self.args_start :]))
        return parts


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Splits an answer into free text and tool-call parts as it is generated (see the module's docstring).

    It moves through modes, each a method reading from `pos`: `free` text (watching for the format's markers),
    `trigger` (what follows a JSON format's trigger), `name` (a call's name before its arguments: mistral's
    `name[ARGS]`, DeepSeek V3.1's, Kimi's, Harmony's), `args` and `json` (a call, an array of calls, the arguments,
    or the generic format's whole answer), `xml` (a block of XML-style calls), `close` (the marker after a call),
    `after` (whitespace after a call), and for llama3 `start` (is the answer a call?) and `text` (it is not:
    everything is text). `tools` (the offered ones) type the XML-style formats' values."""

    def __init__(self, tool_format: str, tools: list[Tool] | None = None):
        self.format = tool_format
        self.tools = {t.name: t.parameters or {} for t in tools or []}
        self.named = NAMED.get(tool_format)
        # Text in free text -> "call" (a call starts after it), "bare" (a call starts with it) or "silent" (not text).
        self.markers: dict[str, str] = {}
        if tool_format in JSON_TRIGGER:
            self.markers[JSON_TRIGGER[tool_format]] = "call"
        elif self.named is not None:
            self.markers = {self.named.call_open: "call", **dict.fromkeys(self.named.section, "silent")}
        elif tool_format in XML:
            self.markers[XML[tool_format].block_open] = "call"
        if tool_format == "qwen3_coder":
            # Qwen3-Coder sometimes leaves out the block's <tool_call> and starts with the call itself: an offered
            # tool's whole opener starts a block too, read from the opener on (llama.cpp's parser does the same).
            for name in self.tools:
                self.markers[f"{XML[tool_format].call_open}{name}{XML[tool_format].call_name_end}"] = "bare"
        self.marker_starts = {marker[0] for marker in self.markers}  # (see _held)
        self.marker_longest = max((len(marker) for marker in self.markers), default=1)
        self.xml: _XmlReader | None = None
        self.xml_calls = 0  # calls the XML blocks so far had
        self.text = ""  # everything fed so far
        self.pos = 0  # what has been dealt with
        self.mode = "start" if tool_format == "llama3" else "free"
        self.calls: list[_Call] = []
        self.call: _Call | None = None  # the call being read
        self.json: _Json | None = None
        self.json_base: tuple = ()  # the path of the call object inside the JSON; (0,) for an array of calls
        self.json_args = False  # the JSON is the current call's arguments (mistral's [ARGS])
        self.json_calls = 0
        self.mark = 0  # where held text starts (it goes out as text if it turns out not to be a call)
        self.response: list[int] | None = None  # generic: how far its "response" string went out; -1 all of it
        self.raw_response: int | None = None  # generic, a JSON response (response_format): how far it went out
        self.spaces = ""  # whitespace after a call: it goes out only if text follows
        if tool_format == "generic":  # the whole answer is JSON
            self._json_start(0)

    def feed(self, text: str) -> list:
        """Free text (str) and call parts (ToolCallPart) that can go out now, in order."""
        self.text += text
        out: list = []
        while True:
            before = (self.pos, self.mode)
            getattr(self, f"_{self.mode}")(out)
            if (self.pos, self.mode) == before:
                return _merged(out)

    def finish(self) -> list:
        """The end of the answer: held text goes out as text; a call cut off keeps what it wrote."""
        out: list = []
        held = self.text[self.mark :]
        if self.mode == "json" and self.response is not None:
            self._response(out, final=True)
        elif self.mode == "json" and self.raw_response is not None:  # cut off: what it wrote
            self._say(out, self.text[self.raw_response :])
        elif self.mode == "json" and self.call is not None and self.call.head_sent:
            out += self.call.cut(self.text)
        elif self.mode == "json" and not any(c.head_sent for c in self.calls[self.json_calls :]):
            if self.format != "generic":  # generic: the grammar's own wrapper, cut off before a name: nothing said
                out.append(held)  # not a call after all, or cut off before its name
        elif self.mode in ("trigger", "name"):
            out.append(held)
        elif self.mode == "xml":
            out += self.xml.cut(self.text) if self.xml.heads else [held]
        elif self.mode == "args":
            self.call.done = True
            out += self.call.parts(self.text, len(self.text))
        elif self.mode in ("free", "start"):
            out.append(self.spaces + self.text[self.pos :])
        elif self.mode == "failed" and not self.calls and self.response is None:
            out.append(self.text)
        return _merged(out)

    # -- modes: each reads what it can from self.pos and moves on ------------------------------------------

    def _free(self, out: list) -> None:
        """Free text goes out at once, but for a tail that may be the start of a marker. A call's marker starts a
        call; a silent one (Kimi's and DeepSeek's section markers around the calls) is dropped."""
        rest = self.text[self.pos :]
        found = [(at, -len(marker), marker) for marker in self.markers
                 if marker[0] in rest and (at := rest.find(marker)) >= 0]  # fmt: skip
        if found:
            at, _, marker = min(found)
            self._say(out, rest[:at])
            self.pos += at + len(marker)
            if self.markers[marker] == "silent":
                return
            self.mark = self.pos - len(marker)
            if self.markers[marker] == "bare":  # the call's own opener: the block's reader reads it
                self.pos = self.mark
            if self.format in XML:
                self.xml = _XmlReader(XML[self.format], self.tools, self.pos, self.xml_calls)
                self.mode = "xml"
            else:
                self.mode = "name" if self.named is not None else "trigger"
            return
        keep = self._held(rest)
        self._say(out, rest[: len(rest) - keep])
        self.pos += len(rest) - keep

    def _held(self, rest: str) -> int:
        """How long a tail of `rest` may still become a marker (held back until it does or cannot). Only a tail that
        starts with a marker's first character is compared with them: with a tool's opener per offered tool (Qwen3-
        Coder), comparing every tail with every marker cost ~50 us a token at 50 tools."""
        for k in range(min(self.marker_longest - 1, len(rest)), 0, -1):
            tail = rest[-k:]
            if tail[0] in self.marker_starts and any(marker.startswith(tail) for marker in self.markers):
                return k
        return 0

    def _say(self, out: list, text: str) -> None:
        if text:
            out.append(self.spaces + text)
            self.spaces = ""

    def _after(self, out: list) -> None:
        """After a call, whitespace is held; then free text (or, for llama3, maybe another call)."""
        rest = self.text[self.pos :]
        stripped = rest.lstrip(_SPACE)
        self.spaces += rest[: len(rest) - len(stripped)]
        self.pos = len(self.text) - len(stripped)
        if stripped:
            self.mode = "start" if self.format == "llama3" else "free"

    def _start(self, out: list) -> None:
        """llama3: the answer is calls only if it starts with one (maybe after <|python_tag|>); else all text."""
        rest = self.text[self.pos :]
        stripped = rest.lstrip(_SPACE)
        skip = len(rest) - len(stripped)
        if not stripped or (_PYTHON_TAG.startswith(stripped) and not self.calls):
            return
        if stripped.startswith(_PYTHON_TAG) and not self.calls:
            self.mark, self.pos, self.mode = self.pos, self.pos + skip + len(_PYTHON_TAG), "trigger"
        elif stripped.startswith("{"):
            self.mark = self.pos
            self._json_start(skip)
        elif stripped.startswith(";") and self.calls:  # calls separated by ";"
            self.pos += skip + 1
            self.mode = "after"
        else:
            self._say(out, rest)
            self.pos, self.mode = len(self.text), "text"

    def _text(self, out: list) -> None:
        self._say(out, self.text[self.pos :])
        self.pos = len(self.text)

    def _trigger(self, out: list) -> None:
        """After the trigger: a JSON call (hermes, llama3), an array of them or `name[ARGS]{...}` (mistral)."""
        rest = self.text[self.pos :]
        stripped = rest.lstrip(_SPACE)
        if not stripped:
            return
        skip = len(rest) - len(stripped)
        if stripped[0] == "{" or (stripped[0] == "[" and self.format == "mistral"):
            self._json_start(skip, base=(0,) if stripped[0] == "[" else ())
        elif self.format == "mistral":
            self.pos += skip
            self.mode = "name"
        else:  # not a call after all: the trigger and what follows are text
            self._not_a_call(out)

    def _name(self, out: list) -> None:
        """A call's name up to its end marker (mistral's `name[ARGS]`, DeepSeek V3.1's `name<｜tool▁sep｜>`, Kimi's
        `functions.name:0<|tool_call_argument_begin|>`, Harmony's `name<|message|>`), then the arguments."""
        end = "[ARGS]" if self.format == "mistral" else self.named.name_end
        rest = self.text[self.pos :]
        at = rest.find(end)
        if at < 0:
            if len(rest) > _NAME_LIMIT:
                self._not_a_call(out)
            return
        name = _call_name(self.format, rest[:at])
        if not name:
            self._not_a_call(out)
            return
        self.call = _Call(len(self.calls), name)
        self.calls.append(self.call)
        out += self.call.parts(self.text, self.pos)
        self.pos += at + len(end)
        self.mode = "args"

    def _args(self, out: list) -> None:
        rest = self.text[self.pos :]
        stripped = rest.lstrip(_SPACE)
        if stripped:
            self._json_start(len(rest) - len(stripped), args=True)

    def _json_start(self, skip: int, base: tuple = (), args: bool = False) -> None:
        self.pos += skip
        self.json = _Json(self.text, self.pos)
        self.json_base, self.json_args = base, args
        self.json_calls = len(self.calls)  # the calls before this JSON
        self.mode = "json"

    def _json(self, out: list) -> None:
        for event in self.json.scan(self.text):
            self._event(event, out)
        self.pos = self.json.pos
        if self.call is not None:
            out += self.call.parts(self.text, self.pos)
        if self.response is not None:
            self._response(out)
        elif self.raw_response is not None and self.json.end is None:
            self._say(out, self.text[self.raw_response : self.pos])
            self.raw_response = self.pos
        if self.json.failed:
            self._json_failed(out)
        elif self.json.end is not None:
            self._json_done(out)

    def _event(self, event: tuple, out: list) -> None:
        kind, path, position = event[0], event[1], event[2]
        first = event[3] if kind == "start" else ""
        if self.json_args:  # mistral's [ARGS]: the value is the arguments
            if path == () and kind == "start":
                self.call.args_start, self.call.args_kind = position, first
            elif path == ():
                self.call.args_end, self.call.done = position, True
            return
        if self.format == "generic" and path == ("response",):
            if kind == "start" and first == '"':
                self.response = [position + 1, position + 1]
            elif kind == "start":  # an answer following response_format's schema: its JSON text is the content
                self.raw_response = position
            elif self.response is not None:
                self._response(out, end=position - 1)
            elif self.raw_response is not None:
                self._say(out, self.text[self.raw_response : position])
                self.raw_response = None
                self.response = [position, -1]  # all of it went out
            return
        call_path = self._call_path(path)
        if call_path is None:
            return
        member = path[len(call_path) :]
        if not member and kind == "start":
            self.call = _Call(len(self.calls)) if first == "{" else None
            if self.call is not None:
                self.calls.append(self.call)
        elif self.call is None:
            return
        elif not member:  # the call's end
            self.call.done = True
            out += self.call.parts(self.text, position)
        elif member == ("name",) and kind == "start":
            self.call.name_start = position if first == '"' else None
        elif member == ("name",) and self.call.name_start is not None:
            self.call.name = json.loads(self.text[self.call.name_start : position]) or None
            out += self.call.parts(self.text, position)
        elif len(member) == 1 and member[0] in _ARGUMENT_KEYS and self.call.args_kind == "" and kind == "start":
            self.call.args_start, self.call.args_kind = position, first
        elif len(member) == 1 and member[0] in _ARGUMENT_KEYS and self.call.args_end is None and kind == "end":
            self.call.args_end = position

    def _call_path(self, path: tuple) -> tuple | None:
        """The path of the call object `path` is in, or None."""
        if self.format == "generic":
            return path[:2] if len(path) >= 2 and path[0] == "tool_calls" and isinstance(path[1], int) else None
        if self.json_base == (0,):  # an array of calls
            return path[:1] if path and isinstance(path[0], int) else None
        return ()

    def _response(self, out: list, end: int | None = None, final: bool = False) -> None:
        """generic: the "response" string, decoded as far as it is written."""
        sent = self.response[1]
        if sent < 0:
            return
        limit = end if end is not None else self.pos
        for cut in range(limit, max(sent, limit - 6) - 1, -1):  # not inside an escape (\uXXXX is 6 long)
            try:
                decoded = json.loads('"' + self.text[sent:cut] + '"')
            except ValueError:
                continue
            if decoded and "\ud800" <= decoded[-1] <= "\udbff" and end is None and not final:
                continue  # half a surrogate pair: wait for the other half
            self._say(out, decoded)
            self.response[1] = -1 if end is not None else cut
            return

    def _not_a_call(self, out: list) -> None:
        """What was held since `mark` is text after all."""
        self._say(out, self.text[self.mark : self.pos])
        self.call = None
        self.mode = "text" if self.format == "llama3" else "free"

    def _json_failed(self, out: list) -> None:
        if self.format == "generic":
            self.mode = "failed"  # held: the whole answer is text at finish, unless a call or response went out
        elif any(c.head_sent for c in self.calls):
            self.mode = "text"  # what the call sent stays; the rest is text
        else:
            self.calls = [c for c in self.calls if c.head_sent]
            self._not_a_call(out)

    def _json_done(self, out: list) -> None:
        named = [c for c in self.calls if c.head_sent]
        unnamed = len(named) < len(self.calls)
        self.calls, self.call = named, None
        if self.format == "generic":  # calls or a response; anything else is text, at finish
            self.mode = "after_json" if named or self.response is not None else "failed"
        elif unnamed and not named:  # not a call: all of it is text
            self._not_a_call(out)
        else:
            self.mode = "close" if self._closing() else "after"

    def _closing(self) -> str:
        """The marker a format writes after a call's JSON (read when present)."""
        return "</tool_call>" if self.format == "hermes" else self.named.call_close if self.named else ""

    def _after_json(self, out: list) -> None:
        self.pos = len(self.text)  # generic: nothing may follow the answer's JSON

    def _failed(self, out: list) -> None:
        self.pos = len(self.text)

    def _close(self, out: list) -> None:
        """The marker after a call (hermes' `</tool_call>`, DeepSeek's `<｜tool▁call▁end｜>`, Kimi's
        `<|tool_call_end|>`), if the model writes it."""
        rest = self.text[self.pos :]
        stripped = rest.lstrip(_SPACE)
        closing = self._closing()
        if stripped.startswith(closing):
            self.pos = len(self.text) - len(stripped) + len(closing)
            self.mode = "after"
        elif stripped and not closing.startswith(stripped):
            self.mode = "after"

    def _xml(self, out: list) -> None:
        out += self.xml.read(self.text)
        self.pos = self.xml.pos
        if self.xml.state == "done":
            self.xml_calls, self.mode = self.xml.index, "after"
        elif self.xml.state == "failed" and self.xml.heads:
            self.mode = "text"  # what the calls sent stays; the rest is text
        elif self.xml.state == "failed":
            self._not_a_call(out)


def _call_name(tool_format: str, text: str) -> str | None:
    """The function's name in the text before a call's arguments (Kimi's is in its call id, `functions.name:0`)."""
    name = text.strip()
    if tool_format == "mistral":  # Mistral Small 3.2: name[CALL_ID]id[ARGS]
        name = name.split("[CALL_ID]")[0]
    elif tool_format == "kimi_k2":
        name = re.sub(r"^functions\.|:\d+$", "", name)
    if not name or len(name) > _NAME_LIMIT or any(ch in name for ch in _SPACE + '<>"{}'):
        return None
    return name


class _XmlReader:
    """A block of XML-style calls, read as it is written (see XmlSyntax): each call's head once its name is
    complete, then its arguments' JSON, `{"key": ` as each argument's tag completes, a string value as it is written
    (JSON-escaped, holding back what may be its closing tag), another value once its tag closes, `}` at the call's
    end. States: calls (between calls), name, args (between arguments), key, opened (GLM's <arg_value>),
    value_start, value; then done (the block closed) or failed (not what the format writes)."""

    def __init__(self, syntax: XmlSyntax, tools: dict, pos: int, index: int):
        self.syntax, self.tools = syntax, tools
        self.pos = pos  # how far the buffer is read
        self.index = index  # the call being read, counted in the whole answer
        self.state = "calls" if syntax.call_open else "name"
        self.heads = 0  # calls whose head went out
        self.name = ""
        self.args = 0  # the call's arguments so far
        self.kind = ""  # the value's: "string" (streamed), "json" or "mixed" (whole, at its end)
        self.value_start = self.sent = self.scanned = 0

    def read(self, text: str) -> list[ToolCallPart]:
        parts: list[ToolCallPart] = []
        while self.state not in ("done", "failed"):
            before = (self.pos, self.state)
            getattr(self, f"_{self.state}")(text, parts)
            if (self.pos, self.state) == before:
                break
        return parts

    def cut(self, text: str) -> list[ToolCallPart]:
        """The rest when the answer ends inside a call (cut off by max_tokens): what it wrote of its last value."""
        if self.state == "value" and len(text) > self.sent:
            rest = text[self.sent :]
            return [ToolCallPart(self.index, arguments=_escaped(rest) if self.kind == "string" else rest)]
        return []

    def _skipped(self, text: str) -> tuple[str, int]:
        """The unread text without leading whitespace, and where it starts."""
        rest = text[self.pos :]
        stripped = rest.lstrip(_SPACE)
        return stripped, self.pos + len(rest) - len(stripped)

    def _expect(self, text: str, tags: dict[str, str]) -> str | None:
        """Which of `tags` (tag -> next state) comes next, past whitespace; None while it may still come. Anything
        else fails the block."""
        rest, at = self._skipped(text)
        for tag, state in tags.items():
            if tag and rest.startswith(tag):
                self.pos, self.state = at + len(tag), state
                return tag
        if rest and not any(tag.startswith(rest) for tag in tags if tag):
            self.state = "done" if self.state == "calls" and self.heads else "failed"
        return None

    def _calls(self, text: str, parts: list) -> None:
        # A text after calls whose block never closed ends the block (it is text again).
        self._expect(text, {self.syntax.block_close: "done", self.syntax.call_open: "name"})

    def _name(self, text: str, parts: list) -> None:
        s, rest = self.syntax, text[self.pos :]
        if s.call_open:
            at = rest.find(s.call_name_end)
            end = at + len(s.call_name_end)
        else:  # GLM: the name (after any whitespace) ends at a newline, its first argument or the block's end
            rest = rest.lstrip(_SPACE)
            self.pos = len(text) - len(rest)
            at = end = min((i for i in (rest.find("\n"), rest.find(s.arg_open), rest.find(s.block_close)) if i >= 0),
                           default=-1)  # fmt: skip
        if at < 0:
            if len(rest) > _NAME_LIMIT:
                self.state = "failed"
            return
        name = _call_name("", rest[:at])
        if name is None:
            self.state = "failed"
            return
        self.name, self.args, self.heads = name, 0, self.heads + 1
        self.pos += end
        self.state = "args"
        parts.append(ToolCallPart(self.index, id=_call_id(), name=name))

    def _args(self, text: str, parts: list) -> None:
        s = self.syntax
        close = s.call_close or s.block_close
        if self._expect(text, {s.arg_open: "key", close: "calls" if s.call_close else "done"}) == close:
            parts.append(ToolCallPart(self.index, arguments="}" if self.args else "{}"))
            self.index += 1

    def _key(self, text: str, parts: list) -> None:
        s, rest = self.syntax, text[self.pos :]
        at = rest.find(s.arg_name_end)
        if at < 0:
            if len(rest) > _NAME_LIMIT:
                self.state = "failed"
            return
        key, kind = rest[:at].strip(), None
        if s.typed:  # DSML: name="key" string="true"
            typed = re.fullmatch(r'(.*)" string="(true|false)', key)
            key, kind = (typed[1], "string" if typed[2] == "true" else "json") if typed else ("", None)
        if not key or len(key) > _NAME_LIMIT or "\n" in key:
            self.state = "failed"
            return
        schema = self.tools.get(self.name, {})
        schema = schema.get("properties", {}) if isinstance(schema, dict) else {}
        self.kind = kind or value_kind(schema.get(key) if isinstance(schema, dict) else None)
        head = ("{" if not self.args else ", ") + json.dumps(key, ensure_ascii=False) + ": "
        parts.append(ToolCallPart(self.index, arguments=head + ('"' if self.kind == "string" else "")))
        self.args += 1
        self.pos += at + len(s.arg_name_end)
        self.state = "opened" if s.value_open else "value_start"

    def _opened(self, text: str, parts: list) -> None:
        self._expect(text, {self.syntax.value_open: "value_start"})

    def _value_start(self, text: str, parts: list) -> None:
        if self.syntax.newline:  # Qwen3-Coder: the newline after <parameter=key> is not the value's
            if self.pos >= len(text):
                return
            self.pos += text[self.pos] == "\n"
        self.value_start = self.sent = self.scanned = self.pos
        self.state = "value"

    def _value(self, text: str, parts: list) -> None:
        s = self.syntax
        at = text.find(s.arg_close, max(self.value_start, self.scanned - len(s.arg_close)))
        if at < 0:
            self.scanned = len(text)
            if self.kind == "string":  # out as it is written, but for what may be the closing tag
                end = len(text) - _held(text[self.value_start :], s.arg_close)
                if end > self.sent:
                    parts.append(ToolCallPart(self.index, arguments=_escaped(text[self.sent : end])))
                    self.sent = end
            return
        value = text[self.value_start : at]
        if self.kind == "string":
            parts.append(ToolCallPart(self.index, arguments=_escaped(value[self.sent - self.value_start :]) + '"'))
        else:
            parts.append(ToolCallPart(self.index, arguments=_json_text(value)))
        self.pos = at + len(s.arg_close)
        self.state = "args"


def _held(value: str, close: str) -> int:
    """How many characters at the end of a value being written may still be the start of its closing tag."""
    return next((k for k in range(min(len(value), len(close) - 1), 0, -1) if close.startswith(value[-k:])), 0)


def _escaped(text: str) -> str:
    """Text as inside a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _no_constant(name: str):
    raise ValueError(name)  # NaN and Infinity are not JSON


def _json_text(value: str) -> str:
    """A non-string value as JSON: as written if it is JSON (Python's True/False/None too, which templates write
    for booleans), else the text as a JSON string."""
    text = value.strip()
    try:
        json.loads(text, parse_constant=_no_constant)
        return text
    except ValueError:
        pass
    if text in ("True", "False", "None"):
        return {"True": "true", "False": "false", "None": "null"}[text]
    return json.dumps(value, ensure_ascii=False)


def _merged(items: list) -> list:
    """Adjacent text joined, empty text dropped."""
    merged: list = []
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += item
                continue
        merged.append(item)
    return merged
