"""Pydantic models of Anthropic's Messages API (https://docs.anthropic.com/en/api/messages) and the neutral request
each one builds (`to_generation()`).

A leaf module like api/protocol.py: requests are strict (a string is not a number) and ignore unknown fields, which
the view logs; what Minerva cannot do (images, documents, server tools) is refused with a 400 naming the field."""

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core import generation as neutral
from core.errors import InvalidRequest
from inference.schema_bounds import (
    MAX_COUNT,
    MAX_DEPTH,
    arguments_schema_check,
    schema_bounds_check,
    tools_bounds_check,
)

from ..protocol import UNSUPPORTED_SCHEMA_KEYWORDS, _unsupported_schema_keywords, schema_checked

MAX_TOOLS = 128  # as on /v1/chat/completions
MAX_STOP_SEQUENCES = 16  # the neutral request's bound
MIN_THINKING_BUDGET = 1024  # Anthropic's

# --------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextBlock(_Request):
    type: Literal["text"]
    text: str


class MediaBlock(_Request):
    """An image or a document: accepted by the schema so that the error can say what is unsupported."""

    type: Literal["image", "document", "search_result"]


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict = Field(description="The call's arguments, a JSON object.")


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    # Lists first: a wrong block is then reported as itself, not as "Input should be a valid string".
    content: Annotated[list[Annotated[TextBlock | MediaBlock, Field(discriminator="type")]],
                       Field(fail_fast=True)] | str | None = None  # fmt: skip
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content if isinstance(block, TextBlock))


class ThinkingBlock(_Request):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # ours is opaque and not checked


class RedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    TextBlock | MediaBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class MessageParam(_Request):
    role: Literal["user", "assistant", "system"]  # system: Claude Code's mid-conversation system messages (a beta)
    content: Annotated[list[ContentBlock], Field(fail_fast=True)] | str


class Tool(_Request):
    """A client tool. Anthropic's server tools (web search, code execution, ...) have a `type` of their own and are
    refused: nothing here runs them."""

    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    description: str | None = None
    strict: bool | None = Field(default=None, description="The input must follow the schema exactly.")
    input_schema: dict = Field(description="A JSON Schema for the tool's input.")

    @field_validator("input_schema")
    @classmethod
    def _schema_supported(cls, value: dict, info: ValidationInfo) -> dict:
        # Anthropic enforces a schema only for a strict tool, and Claude Code's own tools use keywords a grammar
        # cannot enforce (propertyNames) and a maxLength of 524288: a tool that is not strict gets the schema's
        # enforceable part, a strict one is refused as /v1/chat/completions refuses such a schema.
        strict = info.data.get("strict")
        schema = value if strict else _enforceable(value)
        schema_bounds_check(schema)
        arguments_schema_check(schema)
        unsupported = _unsupported_schema_keywords(schema)
        if unsupported:
            raise ValueError(f"the schema uses {', '.join(sorted(unsupported))}, which cannot be enforced")
        return schema


UPPER_BOUNDS = ("maxLength", "maxItems", "maxProperties")


def _enforceable(node, depth: int = 0):
    """A schema less what a grammar cannot hold an answer to: the keywords the converter would ignore
    (propertyNames, not, ...), and upper bounds over schema_bounds' limit, which no answer within a context reaches.
    The other bounds still
    apply to what is left (deeper than MAX_DEPTH is left as it is, for them to refuse)."""
    if depth > MAX_DEPTH:
        return node
    if isinstance(node, list):
        return [_enforceable(item, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        over = key in UPPER_BOUNDS and isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT
        if key in UNSUPPORTED_SCHEMA_KEYWORDS or over:
            continue
        if key in ("enum", "const", "default", "examples"):  # values, not subschemas
            result[key] = value
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):  # names -> subschemas
            result[key] = {name: _enforceable(sub, depth + 2) for name, sub in value.items()}
        else:
            result[key] = _enforceable(value, depth + 1)
    return result


def _client_tool(value):
    if isinstance(value, dict) and value.get("type") not in (None, "custom"):
        raise ValueError(f"server tools ({str(value['type'])[:64]}) are not supported: only tools with an input_schema")
    return value


class ToolChoiceAuto(_Request):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Request):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Request):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Request):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingEnabled(_Request):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=MIN_THINKING_BUDGET)


class ThinkingDisabled(_Request):
    type: Literal["disabled"]


class ThinkingAdaptive(_Request):
    type: Literal["adaptive"]


Thinking = Annotated[ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")]


class Metadata(_Request):
    user_id: str | None = Field(default=None, max_length=256)


class OutputFormat(_Request):
    """Structured outputs: the answer's text is JSON following `schema`, held by a grammar."""

    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _schema_checked(cls, value: dict) -> dict:
        return schema_checked(value)


class OutputConfig(_Request):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class MessagesBody(_Request):
    """What /v1/messages and /v1/messages/count_tokens share: the prompt, its tools, and thinking."""

    model: str = Field(min_length=1)
    messages: Annotated[list[MessageParam], Field(min_length=1, fail_fast=True)]
    system: Annotated[list[TextBlock], Field(fail_fast=True)] | str | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools(cls, value):
        if isinstance(value, list):
            for item in value:
                _client_tool(item)
        return value

    @field_validator("tools")
    @classmethod
    def _tools_bounded(cls, value: list[Tool] | None) -> list[Tool] | None:
        tools_bounds_check(tool.input_schema for tool in value or [])
        return value

    def _neutral(self, **fields) -> neutral.GenerationRequest:
        choice = self.tool_choice
        self._check_tools()
        kind = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}[choice.type] if choice else "auto"
        system = self.system if isinstance(self.system, str) else "\n\n".join(b.text for b in self.system or [])
        messages = _neutral_messages(self.messages)
        if system:
            messages.insert(0, neutral.Message(role="system", content=system))
        return neutral.GenerationRequest(
            model=self.model,
            messages=messages,
            tools=[neutral.Tool(name=t.name, description=t.description, parameters=t.input_schema)
                   for t in self.tools or []],
            tool_choice=kind,
            tool_name=choice.name if isinstance(choice, ToolChoiceTool) else None,
            parallel_tool_calls=not getattr(choice, "disable_parallel_tool_use", False),
            reasoning_effort=_reasoning_effort(self.thinking, self.output_config),
            json_schema=self.output_config.format.schema_ if self.output_config and self.output_config.format else None,
            **fields,
        )  # fmt: skip

    def _check_tools(self) -> None:
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise InvalidRequest(f"tool_choice {choice.type!r} needs tools.", param="tool_choice")
        if isinstance(choice, ToolChoiceTool) and choice.name not in {t.name for t in self.tools or []}:
            raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not in tools.", param="tool_choice")


class MessageCreateRequest(MessagesBody):
    max_tokens: int = Field(
        ge=0,
        description="Upper bound of generated tokens (thinking included); 0 only reads the "
        "prompt into the prompt cache.",
    )
    stream: bool = False
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    metadata: Metadata | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        if any(s == "" for s in value or []):
            raise ValueError("stop sequences must not be empty")
        return value

    def to_generation(self) -> neutral.GenerationRequest:
        """The neutral request the worker runs."""
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise InvalidRequest("thinking.budget_tokens must be less than max_tokens.", param="thinking.budget_tokens")
        # max_tokens 0 warms the prompt cache: the prompt is decoded and the one token sampled after it is dropped.
        return self._neutral(
            max_tokens=max(self.max_tokens, 1), stream=self.stream, stop=self.stop_sequences,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            user=self.metadata.user_id if self.metadata else None,
        )  # fmt: skip


class CountTokensRequest(MessagesBody):
    def to_generation(self) -> neutral.GenerationRequest:
        """The neutral request whose prompt is counted (its template and tools applied as a generation would)."""
        return self._neutral()


def _reasoning_effort(thinking: ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive | None,
                      output: OutputConfig | None) -> str | None:  # fmt: skip
    """Thinking as the neutral request has it: the template's `reasoning_effort`. Disabled is "none"; a budget picks
    a level (the core cannot stop a thought at a token count), and so does `output_config.effort`; `adaptive` and
    no setting leave the template's default."""
    if isinstance(thinking, ThinkingDisabled):
        return "none"
    if output is not None and output.effort is not None:
        return {"xhigh": "high", "max": "high"}.get(output.effort, output.effort)
    if isinstance(thinking, ThinkingEnabled):
        return "low" if thinking.budget_tokens < 4096 else "medium" if thinking.budget_tokens < 16384 else "high"
    return None


def _neutral_messages(messages: list[MessageParam]) -> list[neutral.Message]:
    """Anthropic's turns as neutral messages. A user turn's tool_result blocks become tool messages (before its
    text, where Anthropic requires them); an assistant turn's thinking, text and tool_use blocks become one message
    with reasoning, content and tool calls."""
    result: list[neutral.Message] = []
    names: dict[str, str] = {}  # tool_use id -> the tool's name, for the results that answer it
    for role, blocks in _turns(messages):
        texts, thoughts, calls, results = [], [], [], []
        for where, block in blocks:
            if isinstance(block, MediaBlock) or (isinstance(block, ToolResultBlock) and _has_media(block)):
                what = {"image": "images", "document": "documents"}.get(block.type, "search results")
                if isinstance(block, ToolResultBlock):
                    what = "images or documents in tool results"
                raise InvalidRequest(f"This model does not support {what}: no multimodal model is loaded.",
                                     param=where)  # fmt: skip
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif role == "system":
                raise InvalidRequest(f"A system message holds only text blocks, not {block.type}.", param=where)
            elif isinstance(block, ThinkingBlock | RedactedThinkingBlock | ToolUseBlock) and role == "user":
                raise InvalidRequest(f"A user message cannot hold a {block.type} block.", param=where)
            elif isinstance(block, ToolResultBlock) and role == "assistant":
                raise InvalidRequest("An assistant message cannot hold a tool_result block.", param=where)
            elif isinstance(block, ThinkingBlock):
                thoughts.append(block.thinking)
            elif isinstance(block, ToolUseBlock):
                names[block.id] = block.name
                calls.append(neutral.ToolCall(id=block.id, name=block.name,
                                              arguments=json.dumps(block.input, ensure_ascii=False)))  # fmt: skip
            elif isinstance(block, ToolResultBlock):
                # The neutral request has no error flag on a result: the text says it, for the model to read.
                content = f"Error: {block.text()}" if block.is_error else block.text()
                results.append(neutral.Message(role="tool", content=content, tool_call_id=block.tool_use_id,
                                               name=names.get(block.tool_use_id)))  # fmt: skip
            # redacted_thinking: opaque, and never ours to read back; dropped
        if role == "system":  # the worker joins it to the system prompt at the front, as templates take one
            result.append(neutral.Message(role="system", content="\n\n".join(texts)))
            continue
        if role == "assistant":
            result.append(neutral.Message(role="assistant", content="".join(texts), tool_calls=calls,
                                          reasoning="".join(thoughts) or None))  # fmt: skip
            continue
        result += results
        if texts or not results:
            result.append(neutral.Message(role="user", content="\n\n".join(texts)))
    return result


def _turns(messages: list[MessageParam]) -> list[tuple[str, list[tuple[str, object]]]]:
    """(role, [(where, block)]) for each turn: consecutive messages of one role are one turn, as Anthropic combines
    them; a string is a text block; `where` names the block's parameter for errors."""
    turns: list[tuple[str, list[tuple[str, object]]]] = []
    for i, message in enumerate(messages):
        content = message.content
        content = [TextBlock(type="text", text=content)] if isinstance(content, str) else content
        blocks = [(f"messages[{i}].content[{j}]", block) for j, block in enumerate(content)]
        if turns and turns[-1][0] == message.role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((message.role, blocks))
    return turns


def _has_media(block: ToolResultBlock) -> bool:
    return isinstance(block.content, list) and any(isinstance(part, MediaBlock) for part in block.content)


# -------------------------------------------------------------------------------------------- responses
# Built as dicts in views.py: Anthropic's shapes leave fields out or null by type, which plain dicts say best.
