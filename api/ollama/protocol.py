"""Pydantic models of Ollama's wire format (https://github.com/ollama/ollama/blob/main/docs/api.md) and the neutral
request each generation builds (`to_generation()`).

A leaf module like api/protocol.py: requests are strict (a string is not a number) and ignore unknown fields;
what Minerva cannot do (images, a Go `template`, `suffix`, `context`) is refused with a 400 naming the field."""

import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core import generation as neutral
from core.errors import InvalidRequest
from core.generation import KeepAlive
from inference.schema_bounds import arguments_schema_check, tools_bounds_check

from ..protocol import _unsupported_schema_keywords

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Options(_Request):
    """Ollama's `options`. The sampling ones map onto the neutral request; load-time ones (num_ctx, num_gpu,
    num_thread, ...) are the administrator's, set per model in the registry, so they are accepted and ignored."""

    model_config = ConfigDict(strict=True, extra="allow")  # unknown options: Ollama logs and ignores them too

    num_predict: int | None = Field(default=None, ge=-2, description="-1 (or -2): no limit but the context")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    top_p: float | None = Field(default=None, ge=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = Field(default=None)
    repeat_penalty: float | None = Field(default=None, ge=0, le=10)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=1_000_000)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # Sampling Minerva does not do: refused unless it is the value that turns it off.
    mirostat: int | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    # Load-time options: the registry's (MINERVA_N_CTX or the model's n_ctx, ...), ignored here.
    num_ctx: int | None = Field(default=None, ge=1)
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    penalize_newline: bool | None = None

    @field_validator("num_predict")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be positive, or -1 for no limit")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("mirostat")
    @classmethod
    def _no_mirostat(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("mirostat sampling is not supported (0 turns it off)")
        return value

    @field_validator("typical_p", "tfs_z")
    @classmethod
    def _off(cls, value: float | None) -> float | None:
        if value is not None and value != 1:
            raise ValueError("is not supported (1 turns it off)")
        return value

    def sampling(self) -> dict:
        """The neutral request's sampling fields."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return {
            "max_tokens": self.num_predict if self.num_predict and self.num_predict > 0 else None,
            "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
            "seed": self.seed, "stop": stop, "repeat_penalty": self.repeat_penalty,
            "repeat_last_n": self.repeat_last_n, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }  # fmt: skip


class FunctionCall(_Request):
    name: str
    arguments: dict = Field(default_factory=dict, description="The arguments as a JSON object (not a string).")


class ToolCall(_Request):
    function: FunctionCall


class Message(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = Field(default=None, description="An assistant turn's thinking.")
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = Field(default=None, description="A tool result: the tool that gave it.")


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None

    @field_validator("parameters")
    @classmethod
    def _schema_supported(cls, value: dict | None) -> dict | None:
        _schema_check(value or {})
        arguments_schema_check(value or {})
        return value


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


Format = Literal["", "json"] | dict


def _model_name(name: str) -> str:
    # Ollama's names carry a tag, and clients add `:latest` to a name without one; Minerva's names have none.
    return name.removesuffix(":latest") or name


class _GenerationRequest(_Request):
    model: str = Field(min_length=1)
    stream: bool = Field(default=True, description="NDJSON lines (the default), or one JSON object when false.")
    options: Options | None = None
    format: Format | None = Field(default=None, description='"json" or a JSON schema the answer follows.')
    keep_alive: KeepAlive = Field(default=None, description="'5m', seconds, 0 to unload, -1 forever.")
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("model")
    @classmethod
    def _untagged(cls, value: str) -> str:
        return _model_name(value)

    @field_validator("format")
    @classmethod
    def _schema_supported(cls, value: Format | None) -> Format | None:
        if isinstance(value, dict):
            _schema_check(value)
        return value

    def _neutral(self, **fields) -> neutral.GenerationRequest:
        options = self.options or Options()
        if options.num_ctx is not None:
            logger.info("ignoring num_ctx=%s: the registry sets a model's context", options.num_ctx)
        schema = {"type": "object"} if self.format == "json" else self.format or None
        think = self.think
        return neutral.GenerationRequest(**{
            "model": self.model, "stream": self.stream, "keep_alive": self.keep_alive, "json_schema": schema,
            "reasoning_effort": "none" if think is False else think if isinstance(think, str) else None,
            "thinking_required": think not in (None, False),
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None, **options.sampling(), **fields,
        })  # fmt: skip


class ChatRequest(_GenerationRequest):
    messages: list[Message] | None = Field(default=None, description="None or []: only load (or unload) the model.")
    tools: list[Tool] | None = Field(default=None, max_length=128)

    @field_validator("tools")
    @classmethod
    def _tools_bounded(cls, value: list[Tool] | None) -> list[Tool] | None:
        tools_bounds_check(tool.function.parameters or {} for tool in value or [])
        return value

    def to_generation(self) -> neutral.GenerationRequest:
        """The neutral request the worker runs; no messages at all only loads the model."""
        if not self.messages:
            return self._neutral(prompt="", max_tokens=1, load_only=True)
        for i, message in enumerate(self.messages):
            if message.images:
                raise InvalidRequest(f"The model {self.model} does not support images.", param=f"messages[{i}].images")
        return self._neutral(
            messages=_neutral_messages(self.messages),
            tools=[neutral.Tool(**t.function.model_dump()) for t in self.tools or []],
        )


class GenerateRequest(_GenerationRequest):
    prompt: str | None = Field(default=None, description="None or '': only load (or unload) the model.")
    system: str | None = None
    raw: bool = Field(default=False, description="Send the prompt as it is, without the chat template.")
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None

    def to_generation(self) -> neutral.GenerationRequest:
        """The neutral request: the prompt (and system) through the chat template, or as it is when `raw`."""
        if self.images:
            raise InvalidRequest(f"The model {self.model} does not support images.", param="images")
        if self.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported.", param="suffix")
        if self.template:
            raise InvalidRequest(
                "A per-request template is not supported: Minerva renders each model's own (Jinja) chat template; "
                "an administrator can replace it in the registry, or send raw: true with a prompt you formatted.",
                param="template",
            )
        if self.context:
            raise InvalidRequest(
                "context (an earlier answer's token ids) is not supported; send the conversation to /api/chat.",
                param="context",
            )
        if not self.prompt:
            return self._neutral(prompt="", max_tokens=1, load_only=True)
        if self.raw:
            if self.system:
                raise InvalidRequest("system cannot be combined with raw: true (no template applies it).",
                                     param="system")  # fmt: skip
            return self._neutral(prompt=self.prompt)
        system = [neutral.Message(role="system", content=self.system)] if self.system else []
        return self._neutral(messages=[*system, neutral.Message(role="user", content=self.prompt)])


class EmbedRequest(_Request):
    """/api/embed: one text or several. Ollama cuts an input longer than the context unless `truncate` is false."""

    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="A text, or a list of texts.")
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    options: Options | None = None  # accepted; nothing in it applies to embeddings
    keep_alive: KeepAlive = None

    def to_embedding(self) -> neutral.EmbeddingRequest:
        inputs = [self.input] if isinstance(self.input, str) else self.input
        if not inputs or any(not text for text in inputs):
            raise InvalidRequest("The input must not be empty.", param="input")
        return neutral.EmbeddingRequest(model=_model_name(self.model), inputs=inputs, truncate=self.truncate,
                                        dimensions=self.dimensions, keep_alive=self.keep_alive)  # fmt: skip


class EmbeddingsRequest(_Request):
    """/api/embeddings, the older endpoint: one `prompt`, its vector unnormalised in Ollama (normalised here)."""

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    options: Options | None = None
    keep_alive: KeepAlive = None

    def to_embedding(self) -> neutral.EmbeddingRequest:
        return neutral.EmbeddingRequest(model=_model_name(self.model), inputs=[self.prompt], truncate=True,
                                        keep_alive=self.keep_alive)  # fmt: skip


class ModelRequest(_Request):
    """/api/show and /api/delete: the model's name (`name` is the older spelling)."""

    model: str | None = Field(default=None, min_length=1, max_length=600)
    name: str | None = Field(default=None, min_length=1, max_length=600)
    verbose: bool = False

    def model_name(self) -> str:
        if not (self.model or self.name):
            raise InvalidRequest("Missing required parameter: 'model'.", param="model")
        return _model_name(self.model or self.name)


class PullRequest(ModelRequest):
    """/api/pull: `owner/repo[:QUANT or file.gguf]`, with or without `hf.co/`; NDJSON progress unless `stream`
    is false. `insecure` (Ollama's registry over plain HTTP) has no meaning for the Hub and is ignored."""

    insecure: bool = False
    stream: bool = True


class CopyRequest(_Request):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)

    @field_validator("source", "destination")
    @classmethod
    def _untagged(cls, value: str) -> str:
        return _model_name(value)


def _schema_check(schema: dict) -> None:
    unsupported = _unsupported_schema_keywords(schema)
    if unsupported:
        raise ValueError(f"the schema uses {', '.join(sorted(unsupported))}, which cannot be enforced")


def _neutral_messages(messages: list[Message]) -> list[neutral.Message]:
    """Ollama's messages as neutral ones. Ollama's tool calls have no ids: each call gets one, and the tool results
    that follow an assistant turn answer its calls in order (the k-th result the k-th call)."""
    result, pending = [], []
    for i, m in enumerate(messages):
        calls = [neutral.ToolCall(id=f"call_{i}_{k}", name=c.function.name,
                                  arguments=json.dumps(c.function.arguments, ensure_ascii=False))
                 for k, c in enumerate(m.tool_calls or [])]  # fmt: skip
        if calls:
            pending = [c.id for c in calls]
        call_id = pending.pop(0) if m.role == "tool" and pending else None
        result.append(neutral.Message(role=m.role, content=m.content, tool_calls=calls, tool_call_id=call_id,
                                      name=m.tool_name, reasoning=m.thinking))  # fmt: skip
    return result


# -------------------------------------------------------------------------------------------- responses


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class RunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class ShowResponse(BaseModel):
    license: str = ""
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict
    capabilities: list[str]
    modified_at: str


class TokenLogprob(BaseModel):
    token: str
    logprob: float


class Logprob(TokenLogprob):
    top_logprobs: list[TokenLogprob] | None = None


class Final(BaseModel):
    """The counts and durations (nanoseconds) on a generation's last line."""

    done_reason: str
    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | None = None
    tool_calls: list[dict] | None = None  # {"function": {"name", "arguments": {...}}}
