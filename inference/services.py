"""Running a generation request: record it, queue it on its model's worker, run it there, finish its log row."""

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from api.errors import ContextLengthExceeded, InvalidRequest, OpenAIError, ServerError
from api.protocol import ChatCompletionRequest, CompletionRequest
from models_app.models import LanguageModel
from models_app.selectors import model_get, model_n_ctx

from .engine import ContextOverflow, PromptError, SamplingParams, get_model
from .models import RequestLog
from .streams import TokenStream

logger = logging.getLogger(__name__)

GenerationRequest = ChatCompletionRequest | CompletionRequest


def request_create(*, request_id: str, endpoint: str, body: GenerationRequest) -> RequestLog:
    """Record the request and queue it on its model's queue once the row is committed."""
    from .tasks import run_request as run_request_task

    model = model_get(body.model)  # raises ModelNotFound
    with transaction.atomic():
        log = RequestLog.objects.create(
            request_id=request_id,
            endpoint=endpoint,
            model=model.name,
            stream=bool(body.stream),
            request=_params(body),
        )
        # The body travels in the task message, not the row: the row keeps parameters, not content.
        payload = {"endpoint": endpoint, "body": body.model_dump(mode="json", exclude_none=True)}
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
    """Generate for one queued request, publishing its events to the request's TokenStream."""
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

    generation = None
    try:
        generation, prompt_tokens = _start(log, payload)
        stream.publish("start", prompt_tokens=prompt_tokens)
        log.prompt_tokens = prompt_tokens
        for text in generation:
            if log.ttft_ms is None:
                log.ttft_ms = _ms_since(log)
            stream.publish("token", text=text)
    except OpenAIError as exc:
        _fail(log, stream, exc, generation)
        return
    except Exception:
        logger.exception("generation failed for request %s", log.request_id)
        _fail(log, stream, ServerError(), generation)
        return

    log.completion_tokens = generation.completion_tokens
    if generation.finish_reason == "cancelled":
        _finish(log, RequestLog.Status.CANCELLED, status_code=499)
        return
    log.finish_reason = generation.finish_reason or "length"
    stream.publish(
        "done",
        finish_reason=log.finish_reason,
        prompt_tokens=log.prompt_tokens,
        completion_tokens=log.completion_tokens,
    )
    _finish(log, RequestLog.Status.COMPLETED, status_code=200)


def _start(log: RequestLog, payload: dict):
    """Load the model (once per worker), build the prompt and check that it fits."""
    model = LanguageModel.objects.get(name=log.model)
    engine = get_model(
        model.path,
        n_ctx=model_n_ctx(model),
        n_gpu_layers=model.n_gpu_layers if model.n_gpu_layers is not None else settings.N_GPU_LAYERS,
        n_threads=settings.N_THREADS or None,
    )
    is_chat = payload["endpoint"].endswith("/chat/completions")
    body = (ChatCompletionRequest if is_chat else CompletionRequest).model_validate(payload["body"])
    try:
        if is_chat:
            prompt = engine.chat_prompt(_template_messages(body))
        elif isinstance(body.prompt, str):
            prompt = engine.text_prompt(body.prompt)
        elif body.prompt and isinstance(body.prompt[0], str):
            prompt = engine.text_prompt(body.prompt[0])
        else:
            prompt = list(body.prompt)
        generation = engine.generate(prompt, _sampling(body), cancelled=TokenStream(log.request_id).cancelled)
    except ContextOverflow as exc:
        raise ContextLengthExceeded(str(exc), param="messages" if is_chat else "prompt") from None
    except PromptError as exc:
        raise InvalidRequest(str(exc), param="messages" if is_chat else "prompt") from None
    return generation, len(prompt)


def _template_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template expects them: plain-text content; `developer` is a system message."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        | ({"name": m.name} if m.name else {})
        | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})
        for m in body.messages
    ]


def _sampling(body: GenerationRequest) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=body.token_limit(),
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        stop=body.stop_list(),
    )


def _fail(log: RequestLog, stream: TokenStream, exc: OpenAIError, generation) -> None:
    stream.publish("error", **exc.to_dict()["error"], status=exc.status)
    if generation is not None:
        log.completion_tokens = generation.completion_tokens
    log.error_type, log.error_code = exc.type, exc.code or ""
    # A stream that already started has sent its 200; the error travels as an SSE frame.
    started = log.stream and log.prompt_tokens > 0
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
    params = body.model_dump(mode="json", exclude={"messages", "prompt"}, exclude_none=True)
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
