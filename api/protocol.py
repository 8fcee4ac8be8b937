"""Pydantic models of the OpenAI wire format (https://platform.openai.com/docs/api-reference/chat).

A leaf module: pydantic and the standard library only. Requests are strict (a string is not a number) and
ignore unknown fields, which the view logs; responses follow the reference's field order."""

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core import generation as neutral
from core.generation import KeepAlive
from inference.schema_bounds import arguments_schema_check, schema_bounds_check, tools_bounds_check

# --------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class OtherPart(_Request):
    """An image, audio or file part: accepted by the schema so that the error can name what is unsupported."""

    type: Literal["image_url", "input_audio", "file", "refusal"]


ContentPart = Annotated[TextPart | OtherPart, Field(discriminator="type")]


class FunctionCallIn(_Request):
    name: str
    arguments: str = Field(description="The arguments as a JSON string.")


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="The role of the message's author."
    )
    content: str | Annotated[list[ContentPart], Field(fail_fast=True)] | None = Field(
        default=None, description="Text, or a list of parts."
    )
    name: str | None = Field(default=None, description="An optional name for the participant.")
    tool_call_id: str | None = Field(default=None, description="The call this tool message answers.")
    tool_calls: Annotated[list[ToolCallIn], Field(fail_fast=True)] | None = Field(
        default=None, description="Calls an assistant message made."
    )
    reasoning_content: str | None = Field(default=None, description="An assistant turn's thinking.")
    reasoning: str | None = Field(default=None, description="Same as reasoning_content (another server's name).")

    def text(self) -> str:
        """The content as plain text (parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def to_neutral(self) -> neutral.Message:
        return neutral.Message(
            role="system" if self.role == "developer" else self.role,
            content=self.text(),
            tool_calls=[neutral.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                        for c in self.tool_calls or []],
            tool_call_id=self.tool_call_id,
            name=self.name,
            reasoning=self.reasoning_content or self.reasoning,
        )  # fmt: skip


class StreamOptions(_Request):
    include_usage: bool = Field(default=False, description="Send a final chunk with usage and no choices.")


Stop = str | Annotated[list[str], Field(max_length=16)] | None
MAX_LOGIT_BIAS = 10_000
# Lists stop at their first wrong item (fail_fast): 400,000 wrong items would be as many errors, seconds to build.


class _SamplingRequest(_Request):
    model: str = Field(min_length=1, description="ID of the model to use.")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    max_tokens: int | None = Field(default=None, ge=1, description="Upper bound of generated tokens.")
    n: int | None = Field(default=None, ge=1, le=128, description="How many choices (at most the model's slots).")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="Seed for sampling.")
    stop: Stop = Field(default=None, description="Up to 16 sequences where generation stops.")
    stream: bool | None = Field(default=False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id -> bias added to its logit; -100 bans the token."
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None
    # Minerva extensions (llama-server and Ollama names)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000, description="Keep the k most likely tokens.")
    min_p: float | None = Field(default=None, ge=0, le=1, description="Drop tokens below min_p x the top one.")
    repeat_penalty: float | None = Field(default=None, ge=0, le=10, description="Penalty for recent tokens.")
    ignore_eos: bool | None = Field(default=None, description="Generate until max_tokens (benchmarks).")
    keep_alive: KeepAlive = Field(
        default=None, description="How long the model stays loaded after this request: seconds or '5m'."
    )

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _not_too_many(cls, value):
        if isinstance(value, dict) and len(value) > MAX_LOGIT_BIAS:  # before each entry is checked (and reported)
            raise ValueError(f"at most {MAX_LOGIT_BIAS:,} tokens may be biased")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict | None) -> dict | None:
        for token in value or {}:
            if not token.isdigit() or int(token) > 2**31:
                raise ValueError(f"keys must be token ids, got {token!r}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):  # OpenAI's 400, not an option silently unused
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: Stop) -> Stop:
        stops = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _sampling(self) -> dict:
        """The neutral request's sampling fields, as this request gives them."""
        return {
            "model": self.model, "n": self.n or 1, "stream": bool(self.stream), "max_tokens": self.token_limit(),
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repeat_penalty": self.repeat_penalty, "seed": self.seed,
            "stop": self.stop_list() if self.stop is not None else None,
            "logit_bias": {int(token): bias for token, bias in (self.logit_bias or {}).items()},
            "ignore_eos": bool(self.ignore_eos), "logprobs": self.logprobs_top(), "keep_alive": self.keep_alive,
            "user": self.user,
        }  # fmt: skip


class JSONSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema", description="The JSON Schema the output follows.")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema_bounded(cls, value: dict) -> dict:
        schema_bounds_check(value)
        return value


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_supported(cls, value: JSONSchemaFormat | None, info: ValidationInfo) -> JSONSchemaFormat | None:
        if value is None and info.data.get("type") == "json_schema":  # OpenAI's 400 too
            raise ValueError("json_schema is required when type is json_schema")
        if value is not None:
            unsupported = _unsupported_schema_keywords(value.schema_)
            if unsupported:
                raise ValueError(f"the schema uses {', '.join(sorted(unsupported))}, which cannot be enforced")
        return value


# JSON Schema keywords the grammar converter would silently ignore: refuse them rather than not enforce them.
UNSUPPORTED_SCHEMA_KEYWORDS = {"not", "if", "then", "else", "patternProperties", "dependentRequired",
                               "dependentSchemas", "uniqueItems", "contains", "propertyNames", "multipleOf",
                               "unevaluatedProperties", "unevaluatedItems", "$dynamicRef"}  # fmt: skip


def schema_checked(schema: dict) -> dict:
    """A client's JSON schema for a grammar (any surface's structured output): bounded, and only with keywords the
    grammar enforces."""
    schema_bounds_check(schema)
    unsupported = _unsupported_schema_keywords(schema)
    if unsupported:
        raise ValueError(f"the schema uses {', '.join(sorted(unsupported))}, which cannot be enforced")
    return schema


def _unsupported_schema_keywords(node, depth: int = 0) -> set[str]:
    if depth > 64:
        return {"nesting deeper than 64 levels"}
    found: set[str] = set()
    if isinstance(node, dict):
        found |= UNSUPPORTED_SCHEMA_KEYWORDS & {k for k in node if k not in ("properties", "$defs", "definitions")}
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for sub in value.values():
                    found |= _unsupported_schema_keywords(sub, depth + 1)
            elif key not in ("enum", "const", "default", "examples"):
                found |= _unsupported_schema_keywords(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            found |= _unsupported_schema_keywords(item, depth + 1)
    return found


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(default=None, description="A JSON Schema for the arguments.")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema_supported(cls, value: dict | None) -> dict | None:
        schema_bounds_check(value or {})
        arguments_schema_check(value or {})
        unsupported = _unsupported_schema_keywords(value or {})
        if unsupported:
            raise ValueError(f"the schema uses {', '.join(sorted(unsupported))}, which cannot be enforced")
        return value


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True, description="The conversation so far.")
    logprobs: bool | None = Field(default=None, description="Return each output token's log probability.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Replaces max_tokens.")
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one tool call.")
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"] | None = Field(
        default=None, description="llama-server's: 'none' leaves a <think> thought in the content; else it is split."
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        default=None, description="Accepted; passed to the chat template as `reasoning_effort`."
    )
    response_format: ResponseFormat | None = Field(default=None, description="text, json_object or json_schema.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128, description="Functions the model may call.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Alternatives per token (logprobs).")

    @field_validator("tools")
    @classmethod
    def _tools_bounded(cls, value: list[Tool] | None) -> list[Tool] | None:
        tools_bounds_check(tool.function.parameters or {} for tool in value or [])
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def logprobs_top(self) -> int | None:
        """How many alternatives to report per token, or None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        """The requested bound on completion tokens, if any."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_generation(self) -> neutral.GenerationRequest:
        """The neutral request the worker runs."""
        choice = self.tool_choice
        schema = None
        if self.response_format is not None and self.response_format.type != "text":
            given = self.response_format.json_schema.schema_ if self.response_format.json_schema else None
            schema = given or {"type": "object"}  # json_object, or a json_schema without a schema: any object
        return neutral.GenerationRequest(
            **self._sampling(),
            messages=[m.to_neutral() for m in self.messages],
            tools=[neutral.Tool(**t.function.model_dump(include={"name", "description", "parameters"}))
                   for t in self.tools or []],
            tool_choice="named" if isinstance(choice, NamedToolChoice) else (choice or "auto"),
            tool_name=choice.function.name if isinstance(choice, NamedToolChoice) else None,
            parallel_tool_calls=self.parallel_tool_calls is not False,
            json_schema=schema,
            reasoning_effort=self.reasoning_effort,
            reasoning_format=self.reasoning_format and ("none" if self.reasoning_format == "none" else "auto"),
        )  # fmt: skip


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(fail_fast=True)] | Annotated[list[int], Field(fail_fast=True)] = Field(
        description="The prompt: a string or a list of token ids."
    )
    max_tokens: int | None = Field(default=16, ge=1, description="Upper bound of generated tokens.")
    echo: bool | None = Field(default=False, description="Echo the prompt before the completion.")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Alternatives per token to report.")
    suffix: str | None = None

    def token_limit(self) -> int | None:
        """The requested bound on completion tokens, if any."""
        return self.max_tokens

    def to_generation(self) -> neutral.GenerationRequest:
        """The neutral request the worker runs: one prompt, text or token ids."""
        prompt = self.prompt[0] if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) \
            else self.prompt  # fmt: skip
        return neutral.GenerationRequest(**self._sampling(), prompt=prompt)

    def logprobs_top(self) -> int | None:
        """How many alternatives to report per token, or None when logprobs are off."""
        return self.logprobs


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request
TokenIds = Annotated[list[int], Field(fail_fast=True)]
EmbeddingInput = str | Annotated[list[str], Field(fail_fast=True)] | TokenIds | Annotated[list[TokenIds], Field(
    fail_fast=True)]  # fmt: skip


class CreateEmbeddingRequest(_Request):
    model: str = Field(min_length=1, description="Any model: an embedding model, or a generating one (mean-pooled).")
    input: EmbeddingInput = Field(description="A text, a list of texts, token ids, or a list of token-id lists.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: lists of numbers; base64: little-endian float32, base64-encoded."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Keep the first this many, normalised again.")
    user: str | None = None
    # Minerva extensions (llama-server's and Ollama's names)
    truncate: bool = Field(default=False, description="Cut inputs longer than the model's context (else a 400).")
    keep_alive: KeepAlive = Field(
        default=None, description="How long the model stays loaded after this request: seconds or '5m'."
    )

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        inputs = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not inputs:
            raise ValueError("must not be empty")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs may be embedded in one request")
        for i, item in enumerate(inputs):
            if len(item) == 0:
                raise ValueError(f"input {i} is empty" if len(inputs) > 1 else "must not be empty")
        return value

    def to_embedding(self) -> neutral.EmbeddingRequest:
        """The neutral request the worker runs: a list of inputs, each text or token ids."""
        single = isinstance(self.input, str) or isinstance(self.input[0], int)
        return neutral.EmbeddingRequest(
            model=self.model, inputs=[self.input] if single else self.input, truncate=self.truncate,
            dimensions=self.dimensions, keep_alive=self.keep_alive, user=self.user,
        )  # fmt: skip


class TokenizeRequest(_Request):
    """llama-server's /tokenize, or with `messages` (a chat/completions body) a count of that chat's prompt."""

    model: str = Field(min_length=1)
    content: str | None = Field(default=None, description="The text to tokenize.")
    add_special: bool = Field(default=False, description="Add the model's BOS (or [CLS] ... [SEP]) tokens.")
    parse_special: bool = Field(default=True, description="Special tokens' text becomes those tokens.")
    with_pieces: bool = Field(default=False, description="Return {id, piece} for each token.")
    messages: list | None = Field(default=None, description="Count the prompt tokens of this chat instead.")

    def to_tokenize(self) -> neutral.TokenizeRequest:
        return neutral.TokenizeRequest(model=self.model, content=self.content, add_special=self.add_special,
                                       parse_special=self.parse_special, with_pieces=self.with_pieces)  # fmt: skip


class DetokenizeRequest(_Request):
    model: str = Field(min_length=1)
    tokens: TokenIds = Field(max_length=1_000_000, description="Token ids to turn back into text.")

    def to_tokenize(self) -> neutral.TokenizeRequest:
        return neutral.TokenizeRequest(model=self.model, tokens=self.tokens)


# -------------------------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV cells were reused from an earlier request.")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="Generated tokens that went to reasoning (reasoning_content).")
    accepted_prediction_tokens: int = Field(
        0, description="Speculative decoding: drafted tokens the model kept (counted in completion_tokens)."
    )
    rejected_prediction_tokens: int = Field(0, description="Speculative decoding: drafted tokens the model rejected.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    # Minerva extensions (as llama-server and vLLM name them)
    reasoning_content: str | None = None
    reasoning: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None  # {"index", "id", "type", "function": {"name", "arguments"}}
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def to_json(self) -> str:
        """The wire form: `finish_reason` is always present (null until the end), `usage` only when set."""
        data = self.model_dump(exclude_none=True)
        for choice in data["choices"]:
            choice.setdefault("finish_reason", None)
            if "logprobs" in choice:
                choice["logprobs"].setdefault("refusal", None)
        return json.dumps(data, ensure_ascii=False)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A legacy completion; streamed chunks share this shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelMeta(BaseModel):
    """What a client (or a coding agent choosing a model) needs to know, from the file's header."""

    format: str
    architecture: str | None = None
    quantization: str | None = None
    parameters: int | None = None
    file_size: int | None = None
    tensor_count: int | None = None
    layers: int | None = None
    vocab_size: int | None = None
    trained_context_length: int | None = None
    loaded: bool = False


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Minerva extensions
    max_model_len: int | None = Field(default=None, description="Tokens a request may use (prompt + output).")
    context_length: int | None = Field(default=None, description="Same as max_model_len (llama-server's name).")
    meta: ModelMeta | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
