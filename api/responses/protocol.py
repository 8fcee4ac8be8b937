"""Pydantic models of the OpenAI Responses API's request (https://platform.openai.com/docs/api-reference/responses)
and what it becomes: input items in their stored form (the ItemResource shapes `input_items` lists) and the neutral
request (`to_generation()`), whose messages are the conversation those items spell (`conversation()`).

Requests are strict and ignore unknown fields, like api/protocol.py. What Minerva cannot do (hosted tools such as
web_search, images and files, `conversation`, prompt templates) is refused with a 400 naming the field."""

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from core import generation as neutral
from core.errors import InvalidRequest
from inference.schema_bounds import tools_bounds_check

from ..protocol import FunctionDefinition, schema_checked

# Union members are tagged with names holding a "-": validation_error (api/decorators.py) leaves such names out of
# `param`, so an error in the third item's text is `input[2].content[0].text`, not `input[2].message-item...`.


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


def _type_of(value) -> str | None:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


# ------------------------------------------------------------------------------------------------- content


class TextPart(_Request):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(_Request):
    type: Literal["refusal"]
    refusal: str


class OtherPart(_Request):
    """An image, file or audio part: accepted by the schema so that the error can name what is unsupported."""

    type: str


def _part_tag(value) -> str:
    kind = _type_of(value)
    if kind in ("input_text", "output_text"):
        return "text-part"
    return "refusal-part" if kind == "refusal" else "other-part"


Part = Annotated[
    Annotated[TextPart, Tag("text-part")] | Annotated[RefusalPart, Tag("refusal-part")]
    | Annotated[OtherPart, Tag("other-part")],
    Discriminator(_part_tag),
]  # fmt: skip
Parts = Annotated[list[Part], Field(fail_fast=True)]

# --------------------------------------------------------------------------------------------------- items


class MessageItem(_Request):
    type: Literal["message"] | None = None  # the SDK's EasyInputMessage may leave it out
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Parts


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | Parts


class SummaryText(_Request):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningText(_Request):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(_Request):
    type: Literal["reasoning"]
    id: str | None = None
    summary: Annotated[list[SummaryText], Field(fail_fast=True)] = Field(default_factory=list)
    content: Annotated[list[ReasoningText], Field(fail_fast=True)] | None = None
    encrypted_content: str | None = None


class OtherItem(_Request):
    """A hosted tool's call or output, an item_reference, ...: accepted by the schema so that the error can name it."""

    type: str


ITEM_TAGS = {"message": "message-item", "function_call": "call-item", "function_call_output": "output-item",
             "reasoning": "reasoning-item"}  # fmt: skip


def _item_tag(value) -> str:
    kind = _type_of(value)
    if kind is None and isinstance(value, dict) and "role" in value:
        return "message-item"
    return ITEM_TAGS.get(kind, "other-item")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message-item")] | Annotated[FunctionCallItem, Tag("call-item")]
    | Annotated[FunctionCallOutputItem, Tag("output-item")] | Annotated[ReasoningItem, Tag("reasoning-item")]
    | Annotated[OtherItem, Tag("other-item")],
    Discriminator(_item_tag),
]  # fmt: skip

# ------------------------------------------------------------------------------------------- tools and text


class FunctionTool(FunctionDefinition):
    """A function tool in the Responses API's flat shape: {"type": "function", "name", "parameters", ...}."""

    type: Literal["function"]


class OtherTool(_Request):
    """A hosted tool (web_search, file_search, code_interpreter, ...): accepted so that the error can name it."""

    type: str


Tool = Annotated[
    Annotated[FunctionTool, Tag("function-tool")] | Annotated[OtherTool, Tag("other-tool")],
    Discriminator(lambda v: "function-tool" if _type_of(v) == "function" else "other-tool"),
]


class FunctionChoice(_Request):
    type: Literal["function"]
    name: str


class OtherChoice(_Request):
    type: str


def _choice_tag(value) -> str:
    if isinstance(value, str):
        return "mode-choice"
    return "function-choice" if _type_of(value) == "function" else "other-choice"


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode-choice")]
    | Annotated[FunctionChoice, Tag("function-choice")] | Annotated[OtherChoice, Tag("other-choice")],
    Discriminator(_choice_tag),
]  # fmt: skip


class PlainFormat(_Request):
    type: Literal["text", "json_object"]


class JsonSchemaFormat(_Request):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict = Field(alias="schema", description="The JSON Schema the output follows.")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema_checked(cls, value: dict) -> dict:
        return schema_checked(value)


Format = Annotated[
    Annotated[PlainFormat, Tag("plain-format")] | Annotated[JsonSchemaFormat, Tag("schema-format")],
    Discriminator(lambda v: "schema-format" if _type_of(v) == "json_schema" else "plain-format"),
]


class TextParam(_Request):
    format: Format | None = None


class ReasoningParam(_Request):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]

# ------------------------------------------------------------------------------------------------- request


class CreateResponse(_Request):
    """POST /v1/responses."""

    model: str = Field(min_length=1, description="ID of the model to use.")
    input: str | Annotated[list[InputItem], Field(fail_fast=True)] | None = Field(
        default=None, description="Text, or a list of items: messages, function calls and their outputs, reasoning."
    )
    instructions: str | None = Field(default=None, description="A system message ahead of the input.")
    previous_response_id: str | None = Field(default=None, description="Continue this stored response.")
    tools: Annotated[list[Tool], Field(fail_fast=True)] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, description="Upper bound of generated tokens.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: Metadata | None = Field(default=None, max_length=16, description="Up to 16 string pairs, echoed.")
    stream: bool | None = Field(default=False, description="Stream the answer as typed server-sent events.")
    store: bool | None = Field(default=True, description="Keep the response, for retrieval and continuation.")
    background: bool | None = Field(default=False, description="Return at once; the answer is generated anyway.")
    user: str | None = None
    # Refused rather than ignored: each changes what the answer is.
    conversation: str | dict | None = None
    prompt: dict | None = None

    @field_validator("tools")
    @classmethod
    def _tools_bounded(cls, value: list | None) -> list | None:
        tools_bounds_check(tool.parameters or {} for tool in value or [] if isinstance(tool, FunctionTool))
        return value

    @field_validator("metadata")
    @classmethod
    def _no_nul(cls, value: dict | None) -> dict | None:
        if value and any("\x00" in text for pair in value.items() for text in pair):
            raise ValueError("keys and values cannot contain NUL (U+0000)")  # they come back verbatim
        return value

    @property
    def kept(self) -> bool:
        """Whether the response is stored (`store` defaults to true; null means the default)."""
        return self.store is not False

    def check(self) -> None:
        """What the schema cannot say: every refusal names its parameter."""
        if self.conversation is not None:
            raise InvalidRequest("conversation is not supported; continue with previous_response_id.",
                                 param="conversation")  # fmt: skip
        if self.prompt is not None:
            raise InvalidRequest("Stored prompt templates are not supported; send instructions and input.",
                                 param="prompt")  # fmt: skip
        if self.background and not self.kept:
            raise InvalidRequest("background: true needs store: true (a background response is read back later).",
                                 param="background")  # fmt: skip
        for i, tool in enumerate(self.tools or []):
            if isinstance(tool, OtherTool):
                raise InvalidRequest(f"Tools of type {tool.type!r} are not supported; Minerva runs function tools "
                                     "only (your code runs them).", param=f"tools[{i}].type")  # fmt: skip
        names = {tool.name for tool in self.tools or []}
        choice = self.tool_choice
        if isinstance(choice, OtherChoice):
            raise InvalidRequest(f"tool_choice of type {choice.type!r} is not supported; use auto, none, required or "
                                 '{"type": "function", "name": ...}.', param="tool_choice")  # fmt: skip
        if choice is not None and choice != "none" and not names:
            raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
        if isinstance(choice, FunctionChoice) and choice.name not in names:
            raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not in tools.", param="tool_choice")
        if isinstance(self.input, list):
            for i, item in enumerate(self.input):
                _check_item(item, f"input[{i}]")

    def input_items(self) -> list[dict]:
        """The input as stored items: each in its ItemResource shape, with an id (a client's own is kept)."""
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [_message("user", [_text_part("user", self.input)])]
        return [_stored(item) for item in self.input]

    def echo(self) -> dict:
        """What the Response object repeats of this request."""
        fmt = self.text.format if self.text and self.text.format else PlainFormat(type="text")
        choice = self.tool_choice
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {}, "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "reasoning": self.reasoning.model_dump() if self.reasoning else None, "store": self.kept,
            "temperature": self.temperature, "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
            "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                       "strict": t.strict} for t in self.tools or []],
            "top_p": self.top_p, "background": bool(self.background), "user": self.user,
        }  # fmt: skip

    def to_generation(self, messages: list[neutral.Message]) -> neutral.GenerationRequest:
        """The neutral request the worker runs, on the conversation `messages` (see conversation())."""
        choice = self.tool_choice
        fmt = self.text.format if self.text else None
        schema = None
        if isinstance(fmt, JsonSchemaFormat):
            schema = fmt.schema_ or {"type": "object"}
        elif fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        return neutral.GenerationRequest(
            model=self.model, messages=messages, max_tokens=self.max_output_tokens, stream=bool(self.stream),
            temperature=self.temperature, top_p=self.top_p, user=self.user,
            tools=[neutral.Tool(name=t.name, description=t.description, parameters=t.parameters)
                   for t in self.tools or []],
            tool_choice="named" if isinstance(choice, FunctionChoice) else (choice or "auto"),
            tool_name=choice.name if isinstance(choice, FunctionChoice) else None,
            parallel_tool_calls=self.parallel_tool_calls is not False, json_schema=schema,
            reasoning_effort=self.reasoning.effort if self.reasoning else None,
        )  # fmt: skip


UNSUPPORTED_PARTS = {"input_image": "images", "input_file": "files", "input_audio": "audio"}


def _check_item(item, param: str) -> None:
    if isinstance(item, OtherItem):
        raise InvalidRequest(f"Input items of type {item.type!r} are not supported; send messages, function_call, "
                             "function_call_output and reasoning items.", param=f"{param}.type")  # fmt: skip
    parts = item.content if isinstance(item, MessageItem) else item.output if isinstance(item, FunctionCallOutputItem) \
        else None  # fmt: skip
    if isinstance(parts, list):
        for j, part in enumerate(parts):
            if isinstance(part, OtherPart):
                what = UNSUPPORTED_PARTS.get(part.type, part.type)
                raise InvalidRequest(
                    f"Minerva's models do not take {what} (no multimodal projector is loaded).",
                    param=f"{param}.{'content' if isinstance(item, MessageItem) else 'output'}[{j}]",
                )


# ----------------------------------------------------------------------------------------- stored items


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(role: str, text: str) -> dict:
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": text}


def _message(role: str, content: list[dict], item_id: str | None = None) -> dict:
    return {"id": item_id or _new_id("msg"), "type": "message", "role": role, "content": content,
            "status": "completed"}  # fmt: skip


def _stored(item) -> dict:
    if isinstance(item, MessageItem):
        parts = [TextPart(type="input_text", text=item.content)] if isinstance(item.content, str) else item.content
        content = [
            {"type": "refusal", "refusal": p.refusal}
            if isinstance(p, RefusalPart) and item.role == "assistant"
            else _text_part(item.role, p.refusal if isinstance(p, RefusalPart) else p.text)
            for p in parts
        ]
        return _message(item.role, content, item.id)  # fmt: skip
    if isinstance(item, FunctionCallItem):
        return {"id": item.id or _new_id("fc"), "type": "function_call", "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments, "status": "completed"}  # fmt: skip
    if isinstance(item, FunctionCallOutputItem):
        output = item.output if isinstance(item.output, str) else [_text_part("tool", p.text) for p in item.output]
        return {"id": item.id or _new_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                "output": output, "status": "completed"}  # fmt: skip
    stored = {"id": item.id or _new_id("rs"), "type": "reasoning", "summary": [s.model_dump() for s in item.summary]}
    if item.content is not None:
        stored["content"] = [c.model_dump() for c in item.content]
    if item.encrypted_content is not None:
        stored["encrypted_content"] = item.encrypted_content
    return stored


def _text(parts: str | list[dict], key: str = "text") -> str:
    if isinstance(parts, str):
        return parts
    return "".join(part.get(key) or part.get("refusal") or "" for part in parts)


def conversation(items: list[dict], instructions: str | None) -> list[neutral.Message]:
    """The neutral messages that stored items spell, after `instructions` as a system message. Consecutive function
    calls (and an assistant message before them) are one assistant turn; reasoning goes with the assistant turn
    that follows it."""
    messages = [neutral.Message(role="system", content=instructions)] if instructions else []
    thought: list[str] = []  # reasoning waiting for its assistant turn
    names: dict[str, str] = {}  # call_id -> the function's name, for the tool message answering it
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            texts = [part["text"] for part in item.get("content") or item.get("summary") or []]
            thought.append("\n\n".join(texts))
        elif kind == "message" and item["role"] != "assistant":
            role = "user" if item["role"] == "user" else "system"
            messages.append(neutral.Message(role=role, content=_text(item["content"])))
        elif kind == "message":
            messages.append(neutral.Message(role="assistant", content=_text(item["content"]),
                                            reasoning="\n\n".join(thought) or None))  # fmt: skip
            thought = []
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            call = neutral.ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"])
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and not thought:
                last.tool_calls.append(call)
            else:
                messages.append(neutral.Message(role="assistant", tool_calls=[call],
                                                reasoning="\n\n".join(thought) or None))  # fmt: skip
                thought = []
        elif kind == "function_call_output":
            messages.append(neutral.Message(role="tool", content=_text(item["output"]), tool_call_id=item["call_id"],
                                            name=names.get(item["call_id"])))  # fmt: skip
    return messages
