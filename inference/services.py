"""Running a generation request: record it, queue it on its model's worker, run it there, finish its log row."""

import json
import logging
import os
import socket
import threading
import time

from django import db
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from pydantic import ValidationError

from api.errors import ContextLengthExceeded, InvalidRequest, OpenAIError, ServerError, ServiceUnavailable
from api.protocol import SAMPLING_DEFAULTS, ChatCompletionRequest, CompletionRequest
from api.tools import tool_instruction, tool_schema, tools_active
from minerva_project.redis import get_redis
from models_app.metadata import estimate_memory
from models_app.models import LanguageModel
from models_app.selectors import LOADED_KEY, model_get, model_n_ctx, model_parallel

from .engine import (
    ContextOverflow,
    ModelCache,
    ModelSpec,
    ModelUnavailable,
    PromptError,
    SamplingParams,
    Sequence,
    parse_keep_alive,
)
from .models import RequestLog
from .streams import RedisStepIO, TokenStream

logger = logging.getLogger(__name__)

GenerationRequest = ChatCompletionRequest | CompletionRequest


def request_create(*, request_id: str, endpoint: str, body: GenerationRequest) -> RequestLog:
    """Record the request and queue it on its model's queue once the row is committed."""
    from .tasks import run_request as run_request_task

    model = model_get(body.model)  # raises ModelNotFound
    if settings.MAX_QUEUE and get_redis().llen(model.queue) >= settings.MAX_QUEUE:
        raise ServiceUnavailable(
            f"Too many requests are waiting for {model.name}; try again shortly.", code="queue_full"
        )
    with transaction.atomic():
        log = RequestLog.objects.create(
            request_id=request_id,
            endpoint=endpoint,
            model=model.name,
            stream=bool(body.stream),
            request=_params(body),
        )
        # The body travels in the task message, not the row: the row keeps parameters, not content.
        payload = {"endpoint": endpoint, "body": body.model_dump(mode="json", exclude_none=True, by_alias=True)}
        transaction.on_commit(lambda: run_request_task.apply_async(args=[log.pk, payload], queue=model.queue))
    return log


def request_log_record(*, request_id: str, endpoint: str, method: str, model: str, status_code: int,
                       error_type: str = "", error_code: str = "") -> RequestLog:  # fmt: skip
    """Log a request that never reached a worker (listing models, or refused before queueing)."""
    failed = status_code >= 400
    return RequestLog.objects.create(
        request_id=request_id,
        endpoint=endpoint[:255],
        method=method[:8],
        model=model,
        status=RequestLog.Status.FAILED if failed else RequestLog.Status.COMPLETED,
        status_code=status_code,
        error_type=error_type,
        error_code=error_code,
        finished=timezone.now(),
    )


def request_run(*, log_id: int, payload: dict) -> None:
    """Generate for one queued request: hand it to its model's scheduler and wait until it finishes."""
    log = RequestLog.objects.get(pk=log_id)
    stream = TokenStream(log.request_id)
    if log.status != RequestLog.Status.QUEUED:
        logger.warning("request %s was delivered again in state %s; not re-running", log.request_id, log.status)
        return
    if stream.cancelled():  # the client left while the request waited in the queue
        _finish(log, RequestLog.Status.CANCELLED, status_code=499)
        return
    log.status = RequestLog.Status.RUNNING
    log.save(update_fields=["status"])

    is_chat = payload["endpoint"].endswith("/chat/completions")
    param = "messages" if is_chat else "prompt"
    sequences: list[Sequence] = []
    try:
        model = LanguageModel.objects.get(name=log.model)
        body = (ChatCompletionRequest if is_chat else CompletionRequest).model_validate(payload["body"])
        keep_alive = parse_keep_alive(body.keep_alive if body.keep_alive is not None else model.keep_alive or None)
        with model_cache().use(_spec(model), keep_alive=keep_alive) as engine:
            prompt = _prompt(engine, body, is_chat)
            sequences = engine.submit_many(log.request_id, prompt, _sampling(body, model.default_params), body.n or 1)
            if not db.connection.in_atomic_block:  # this thread may now wait for minutes: free the connection
                db.connection.close()
            for sequence in sequences:
                sequence.wait()
    except ContextOverflow as exc:
        return _fail(log, stream, ContextLengthExceeded(str(exc), param=param), sequences)
    except PromptError as exc:
        return _fail(log, stream, InvalidRequest(str(exc), param="n" if "slots" in str(exc) else param), sequences)
    except ModelUnavailable as exc:
        return _fail(log, stream, ServiceUnavailable(str(exc), code="model_unavailable"), sequences)
    except OpenAIError as exc:
        return _fail(log, stream, exc, sequences)
    except Exception:
        logger.exception("generation failed for request %s", log.request_id)
        return _fail(log, stream, ServerError(), sequences)

    errors = [s.error for s in sequences if s.error is not None]
    if errors:
        logger.error("request %s failed in the scheduler: %s", log.request_id, errors[0])
        return _fail(log, stream, ServerError(), sequences)
    _count(log, sequences)
    if any(s.finish_reason == "cancelled" for s in sequences):
        _finish(log, RequestLog.Status.CANCELLED, status_code=499)
    else:
        log.finish_reason = sequences[0].finish_reason
        _finish(log, RequestLog.Status.COMPLETED, status_code=200)


_cache: ModelCache | None = None
_cache_lock = threading.Lock()


def model_cache() -> ModelCache:
    """This worker's loaded models (created on first use)."""
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = ModelCache(
                budget_bytes=settings.MEMORY_BUDGET or int(_physical_memory() * 0.75),
                default_keep_alive=parse_keep_alive(settings.KEEP_ALIVE),
                io_factory=RedisStepIO,
                on_change=_report_loaded,
            )
        return _cache


def _report_loaded(loaded: list[dict]) -> None:
    """Publish which models this worker holds, for /v1/models' `loaded` (read by model_loaded_names)."""
    get_redis().hset(
        LOADED_KEY, f"{socket.gethostname()}:{os.getpid()}", json.dumps({"at": time.time(), "models": loaded})
    )


def _spec(model: LanguageModel) -> ModelSpec:
    n_ctx, n_parallel = model_n_ctx(model), model_parallel(model)
    return ModelSpec(
        name=model.name,
        path=model.path,
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        n_gpu_layers=model.n_gpu_layers if model.n_gpu_layers is not None else settings.N_GPU_LAYERS,
        n_threads=settings.N_THREADS or None,
        n_batch=settings.N_BATCH,
        chat_template=model.chat_template_override or None,
        estimated_bytes=estimate_memory(model.metadata, n_ctx * n_parallel),
    )


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _prompt(engine, body: GenerationRequest, is_chat: bool) -> list[int]:
    if is_chat:
        template_vars = {"reasoning_effort": body.reasoning_effort} if body.reasoning_effort else {}
        return engine.chat_prompt(_template_messages(body), **template_vars)
    if isinstance(body.prompt, str):
        return engine.text_prompt(body.prompt)
    if body.prompt and isinstance(body.prompt[0], str):
        return engine.text_prompt(body.prompt[0])
    return list(body.prompt)


def _template_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as chat templates expect them: plain-text content, and one system message at the front
    (`developer` is a system message; several are merged, since Qwen-style templates reject any other)."""
    system = [m.text() for m in body.messages if m.role in ("system", "developer")]
    if tools_active(body):
        system.append(tool_instruction(body))
    rest = [
        {"role": m.role, "content": _tool_calls_as_answer(m.tool_calls) if m.tool_calls else m.text()}
        | ({"reasoning_content": m.reasoning_content or m.reasoning} if m.reasoning_content or m.reasoning else {})
        | ({"name": m.name} if m.name else {})
        | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})
        for m in body.messages
        if m.role not in ("system", "developer")
    ]
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + rest


def _tool_calls_as_answer(calls) -> str:
    """An earlier assistant turn's tool calls, written the way the model was asked to answer."""

    def arguments(text: str):
        try:
            return json.loads(text)
        except ValueError:
            return text

    return json.dumps({"tool_calls": [{"name": c.function.name, "arguments": arguments(c.function.arguments)}
                                      for c in calls]}, ensure_ascii=False)  # fmt: skip


def _sampling(body: GenerationRequest, model_defaults: dict) -> SamplingParams:
    """The request's sampling parameters; what it leaves out comes from the model's defaults, then ours."""
    missing = {k: v for k, v in model_defaults.items() if k in SAMPLING_DEFAULTS and getattr(body, k) is None}
    if missing:
        try:
            body = type(body).model_validate({**body.model_dump(exclude_none=True), **missing})
        except ValidationError:  # LanguageModel.clean() refuses these in admin; a hand-edited row may not
            logger.warning("ignoring invalid default_params %s", missing)
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=body.token_limit(),
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=body.top_k if body.top_k is not None else defaults.top_k,
        min_p=body.min_p if body.min_p is not None else defaults.min_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repeat_penalty=body.repeat_penalty if body.repeat_penalty is not None else defaults.repeat_penalty,
        seed=body.seed,
        stop=body.stop_list(),
        logit_bias={int(token): bias for token, bias in (body.logit_bias or {}).items()},
        ignore_eos=bool(body.ignore_eos),
        logprobs=body.logprobs_top(),
        grammar=_grammar(body),
    )


def _grammar(body: GenerationRequest) -> str | None:
    """A GBNF grammar for `response_format`: any JSON object, or JSON following the given schema."""
    response_format = getattr(body, "response_format", None)
    if isinstance(body, ChatCompletionRequest) and tools_active(body):
        schema = tool_schema(body)
    elif response_format is None or response_format.type == "text":
        return None
    else:
        schema = response_format.json_schema.schema_ if response_format.json_schema else None
        if response_format.type == "json_object" or not schema:
            schema = {"type": "object"}  # any object; the converter's grammar also bounds runs of whitespace
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter's own errors are ValueError, AssertionError, KeyError, ...
        raise InvalidRequest(
            f"The JSON schema cannot be turned into a grammar: {exc}", param="response_format"
        ) from None


def _count(log: RequestLog, sequences: list[Sequence]) -> None:
    if not sequences:
        return
    log.prompt_tokens, log.cached_tokens = len(sequences[0].prompt), sequences[0].cached_tokens
    log.completion_tokens = sum(s.completion_tokens for s in sequences)
    first = min((s.first_token_at for s in sequences if s.first_token_at is not None), default=None)
    if first is not None:
        log.ttft_ms = round(_ms_since(log) - (time.monotonic() - first) * 1000, 1)


def _fail(log: RequestLog, stream: TokenStream, exc: OpenAIError, sequences: list[Sequence]) -> None:
    stream.publish("error", **exc.to_dict()["error"], status=exc.status)
    _count(log, sequences)
    log.error_type, log.error_code = exc.type, exc.code or ""
    # A stream that already started has sent its 200; the error travels as an SSE frame.
    started = log.stream and any(s.first_token_at is not None for s in sequences)
    _finish(log, RequestLog.Status.FAILED, status_code=200 if started else exc.status)


def _finish(log: RequestLog, status: str, *, status_code: int) -> None:
    log.status, log.status_code = status, status_code
    log.finished = timezone.now()
    log.latency_ms = _ms_since(log)
    log.save()


def _ms_since(log: RequestLog) -> float:
    return round((timezone.now() - log.created).total_seconds() * 1000, 1)


def _params(body: GenerationRequest) -> dict:
    """The request's parameters without its content (messages or prompt), safe for any database."""
    params = body.model_dump(mode="json", exclude={"messages", "prompt"}, exclude_none=True, by_alias=True)
    return _strip_nul(params)


def _strip_nul(value):
    # PostgreSQL's jsonb cannot hold U+0000.
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {k.replace("\x00", ""): _strip_nul(v) for k, v in value.items()}
    return value
