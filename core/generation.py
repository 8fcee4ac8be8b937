"""The neutral generation request: what every client surface (OpenAI chat and completions, Ollama, later Anthropic
and Responses) turns its wire format into with `to_generation()`, what travels in the Celery payload, and all the
worker reads. No surface's field names or quirks below this line; the worker never looks at the URL."""

import math
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Ollama's keep_alive: seconds or a duration with one unit; negative = forever. (settings.py checks
# MINERVA_KEEP_ALIVE with the same pattern: settings cannot import app modules.)
KEEP_ALIVE_RE = re.compile(r"-?\d+(\.\d+)?(ms|s|m|h)?")


def _keep_alive_check(value: str | float | None) -> str | float | None:
    if isinstance(value, str) and not KEEP_ALIVE_RE.fullmatch(value.strip()):
        raise ValueError("must be a number of seconds or a duration like '5m' or '1h'")
    return value


FOREVER_SECONDS = 100 * 365 * 86400


def parse_keep_alive(value: str | float | int | None) -> float | None:
    """Ollama's keep_alive: seconds, or a duration like "10m", "1h", "30s"; negative = forever."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        seconds = float(text[: len(text) - len(unit)]) * units.get(unit, 1)
    if math.isnan(seconds):
        raise ValueError("keep_alive must be a number of seconds or a duration like '5m'")
    # Past a century is forever too: no clock shows such an expiry (1e12 s broke /api/ps's dates for everyone).
    return math.inf if seconds < 0 or seconds > FOREVER_SECONDS else seconds


# A request's keep_alive, as every surface that takes one checks it (its 400 names the field).
KeepAlive = Annotated[str | float | None, AfterValidator(_keep_alive_check)]

# The request fields a model's `default_params` may preset (llama.cpp's and OpenAI's names).
SAMPLING_DEFAULTS = {"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repeat_penalty", "max_tokens", "seed", "stop", "reasoning_format"}  # fmt: skip


class _Neutral(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCall(_Neutral):
    """A call an assistant turn made: arguments as the JSON text the model wrote."""

    id: str
    name: str
    arguments: str


class Message(_Neutral):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None
    reasoning: str | None = None  # an assistant turn's thinking, given back to templates that render it


class Tool(_Neutral):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema for the arguments


class GenerationRequest(_Neutral):
    """One generation: a chat (`messages`) or a plain completion (`prompt`), with sampling and output constraints.
    None means "not given": the model's `default_params`, then llama-server's defaults apply in the worker."""

    model: str
    messages: list[Message] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    # sampling
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, ge=0, le=10)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=1_000_000)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: list[str] | None = Field(default=None, max_length=16)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: each token's logprob and the k most likely alternatives
    # tools and structured output
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required", "named"] = "auto"
    tool_name: str | None = None  # the one function a "named" tool_choice forces
    parallel_tool_calls: bool = True
    json_schema: dict | None = None  # the answer is JSON following this schema ({"type": "object"}: any object)
    # reasoning and the model's lifetime
    reasoning_effort: str | None = None
    thinking_required: bool = False  # Ollama's `think`: a model whose template cannot think refuses it (a 400)
    # "none": a <think> thought stays in the content as the model wrote it (llama-server's reasoning_format none)
    reasoning_format: Literal["auto", "none"] | None = None
    keep_alive: str | float | None = None
    load_only: bool = False  # generate nothing: load the model (with keep_alive 0: unload it), Ollama's empty request
    user: str | None = None  # the client's end user, for the request log only

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def tools_active(self) -> bool:
        """Whether the model is offered tools (tool_choice "none" offers none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def offered_tools(self) -> list[Tool]:
        """The tools the model may call: only the named one for a named tool_choice."""
        if self.tool_choice == "named":
            return [t for t in self.tools if t.name == self.tool_name]
        return list(self.tools)

    def tool_call_optional(self) -> bool:
        """Whether the model may answer in words instead of calling a tool."""
        return self.tool_choice == "auto"


def with_defaults(generation: GenerationRequest, defaults: dict) -> GenerationRequest:
    """The request with what it leaves out taken from a model's `default_params` (checked by default_params_check)."""
    missing = {k: _stop_list(v) if k == "stop" else v for k, v in defaults.items()
               if k in SAMPLING_DEFAULTS and getattr(generation, k) is None}  # fmt: skip
    return generation.model_validate({**generation.model_dump(), **missing}) if missing else generation


def default_params_check(params: dict) -> None:
    """Raise ValueError unless `params` are valid sampling defaults for a model (the admin's `default_params`)."""
    unknown = set(params) - SAMPLING_DEFAULTS
    if unknown:
        raise ValueError(f"unknown parameters: {', '.join(sorted(unknown))}")
    if "stop" in params:
        params = {**params, "stop": _stop_list(params["stop"])}
    GenerationRequest.model_validate({"model": "-", "prompt": "", **params})


def _stop_list(value) -> list[str]:
    return [value] if isinstance(value, str) else value


class EmbeddingRequest(_Neutral):
    """Vectors for one or more inputs, each text or token ids: what every surface's embeddings endpoint builds
    (`to_embedding()`) and the worker runs. `truncate` cuts an input longer than the model's context instead of
    refusing it; `dimensions` keeps the first that many components and normalises again."""

    model: str
    inputs: list[str] | list[list[int]] = Field(min_length=1)
    truncate: bool = False
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: str | float | None = None
    user: str | None = None  # the client's end user, for the request log only


class TokenizeRequest(_Neutral):
    """One use of a model's tokenizer, run by its worker: tokenize `content`, detokenize `tokens`, or count the
    prompt tokens of the chat request `chat` (its template applied exactly as a generation would)."""

    model: str
    content: str | None = None
    add_special: bool = False  # BOS (and a BERT model's [CLS] ... [SEP]) around the content
    parse_special: bool = True  # special tokens' text in the content becomes those tokens (llama-server's default)
    with_pieces: bool = False
    tokens: list[int] | None = None
    chat: GenerationRequest | None = None
