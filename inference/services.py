"""The request side of a generation: record it, queue it on its model's Celery queue, log what never reached a
worker. The worker side is run.py; neither imports the other's module (the task is looked up by name)."""

import contextlib
import datetime
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone
from redis.exceptions import RedisError

from access.models import ApiKey
from access.services import tokens_reserve, tokens_settle
from core.errors import (
    InvalidRequest,
    ModelInUse,
    ModelNotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from core.generation import EmbeddingRequest, GenerationRequest, TokenizeRequest, parse_keep_alive
from core.redis import get_redis
from models_app.models import LanguageModel
from models_app.selectors import model_generates, model_get, model_n_ctx
from models_app.services import model_files_delete

from .cluster import model_servable_check
from .metrics import metrics_model_label, metrics_record
from .models import RequestLog

logger = logging.getLogger(__name__)

DRAINING_KEY = "minerva:draining:{}"  # set by `serve` (per instance) while it stops: new requests are refused
# Queued tasks are sent from one long-lived thread: Celery sets itself up per thread (a producer, its channel), and
# every ASGI request's sync code runs in a fresh one, where `apply_async` took 1.1 ms instead of 0.4.
_sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enqueue")


def request_create(*, request_id: str, endpoint: str, body: GenerationRequest, api_key: ApiKey | None = None,
                   audit: dict | None = None, task: str = "minerva.run_request") -> RequestLog:  # fmt: skip
    """Record the request and queue it on its model's queue once the row is committed. `body` is the neutral
    request a surface built (`to_generation()`); the worker runs exactly that. `task` names the Celery task that
    runs it: `minerva.run_request`, or one that runs it and then does more on the worker (a stored response)."""
    model = request_model(name=body.model, api_key=api_key, generates=True)
    body = _keep_alive_checked(body, api_key)
    budget = request_token_budget(body=body, n_ctx=model_n_ctx(model)) if _metered(api_key) else None
    return _queue(task=task, request_id=request_id, endpoint=endpoint, model=model,
                  payload={"generation": body.model_dump(mode="json", exclude_defaults=True),
                           "model_updated": model.updated.isoformat()},  # the worker's reuse of its row (run.py)
                  budget=budget, row={"stream": bool(body.stream), "request": _row_params(body),
                       "prompt": _content(body) if settings.LOG_CONTENT else None},
                  api_key=api_key, audit=audit)  # fmt: skip


def embedding_create(*, request_id: str, endpoint: str, body: EmbeddingRequest, api_key: ApiKey | None = None,
                     audit: dict | None = None) -> RequestLog:  # fmt: skip
    """Record an embedding request and queue it on its model's queue, like a generation (same row, limits and
    reservation: its budget is its inputs' tokens); its worker embeds it alongside every other waiting input."""
    model = request_model(name=body.model, api_key=api_key)
    body = _keep_alive_checked(body, api_key)
    budget = embedding_token_budget(body=body, n_ctx=model_n_ctx(model)) if _metered(api_key) else None
    params = body.model_dump(mode="json", exclude={"inputs"}, exclude_defaults=True) | {"inputs": len(body.inputs)}
    return _queue(task="minerva.run_embedding", request_id=request_id, endpoint=endpoint, model=model,
                  payload={"embedding": body.model_dump(mode="json", exclude_defaults=True)}, budget=budget,
                  row={"request": params, "prompt": body.inputs if settings.LOG_CONTENT else None},
                  api_key=api_key, audit=audit)  # fmt: skip


def _keep_alive_checked(body, api_key: ApiKey | None):
    """The request as a key may send it: a key that is not staff keeps the model's own keep-alive, since on a shared
    server one client must neither unload the models others use (keep_alive 0, even a preloaded one) nor pin one in
    memory for good (-1); asking only to unload a model is a 403 for it. No key (keys optional) is the machine's
    owner, as with Ollama."""
    if api_key is None or api_key.staff or body.keep_alive is None:
        return body
    if getattr(body, "load_only", False) and parse_keep_alive(body.keep_alive) == 0:
        raise PermissionDenied("Unloading a model needs a staff key.", code="staff_key_required")
    logger.info("ignoring keep_alive=%r of key %s, which is not staff", body.keep_alive, api_key.prefix)
    return body.model_copy(update={"keep_alive": None})


def tokenize_create(*, request_id: str, endpoint: str, body: TokenizeRequest, api_key: ApiKey | None = None,
                    audit: dict | None = None) -> RequestLog:  # fmt: skip
    """Record a use of a model's tokenizer (tokenize, detokenize, count a chat prompt) and queue it on the model's
    queue: the tokenizer and the chat template live in its worker, never in the web process."""
    model = request_model(name=body.model, api_key=api_key, generates=body.chat is not None)
    op = "count" if body.chat is not None else "tokenize" if body.content is not None else "detokenize"
    return _queue(task="minerva.run_tokenize", request_id=request_id, endpoint=endpoint, model=model,
                  payload={"tokenize": body.model_dump(mode="json", exclude_defaults=True)}, budget=None,
                  row={"request": {"op": op}}, api_key=api_key, audit=audit)  # fmt: skip


def request_model(*, name: str, api_key: ApiKey | None, generates: bool = False) -> LanguageModel:
    """The served model a request names, if its key may use it; with `generates`, one that can generate text."""
    model = model_get(name)  # raises ModelNotFound
    if api_key is not None and not api_key.allows(model.name):
        raise ModelNotFound(name)
    if generates and not model_generates(model):
        raise InvalidRequest(f"The model {model.name} is an embedding model: it does not support chat or text "
                             "generation. Use it with /v1/embeddings.", param="model")  # fmt: skip
    return model


def _metered(api_key: ApiKey | None) -> bool:
    """Whether the key has a tokens-per-minute limit, so a request must reserve its tokens."""
    return api_key is not None and api_key.tpm is not None


def _queue(*, task: str, request_id: str, endpoint: str, model: LanguageModel, payload: dict, budget: int | None,
           row: dict, api_key: ApiKey | None, audit: dict | None) -> RequestLog:  # fmt: skip
    """Refuse while draining or when the model's queue is full, reserve the key's tokens (`budget`, for a metered
    key), write the row, and queue `task` with (row id, payload) once the row is committed."""
    pipe = get_redis().pipeline(transaction=False)  # one round trip for both checks, on every request's path
    pipe.exists(DRAINING_KEY.format(settings.INSTANCE_ID))
    pipe.llen(model.queue)
    draining, waiting = pipe.execute()
    if settings.INSTANCE_ID and draining:
        raise ServiceUnavailable("The server is shutting down; try again shortly.", code="server_shutting_down")
    model_servable_check(model)  # 503 model_unavailable at once when no live worker has the model
    if settings.MAX_QUEUE and waiting >= settings.MAX_QUEUE:
        raise ServiceUnavailable(
            f"Too many requests are waiting for {model.name}; try again shortly.", code="queue_full"
        )
    reservation = None
    if budget is not None:  # raises RateLimited (429) past the key's tokens per minute
        reservation = tokens_reserve(key=api_key, tokens=budget)
    enqueue_failed: list[Exception] = []

    def enqueue() -> None:
        # argsrepr: the message's headers name the row, not a repr of the body (a prompt; and 0.1 ms of saferepr)
        send = functools.partial(current_app.tasks[task].apply_async, args=[log.pk, payload], queue=model.queue,
                                 argsrepr=f"[{log.pk}, {{...}}]", kwargsrepr="{}")  # fmt: skip
        try:
            if current_app.conf.task_always_eager:  # tests: the task runs here, on this thread's database connection
                send()
            else:
                _sender.submit(send).result()
        except Exception as exc:  # Redis went away since the checks above
            enqueue_failed.append(exc)

    try:
        with transaction.atomic():
            log = RequestLog.objects.create(request_id=request_id, endpoint=endpoint, model=model.name, **row,
                                            **(audit or {}))  # fmt: skip
            # The body travels in the task message, not the row: the row keeps parameters, not content.
            payload = {**payload, "reservation": reservation}
            transaction.on_commit(enqueue)
        if enqueue_failed:  # the caller logs the refusal, so this row must not stay
            log.delete()
            raise ServiceUnavailable("The request could not be queued (Redis is unavailable); try again.",
                                     code="redis_unavailable") from enqueue_failed[0]  # fmt: skip
    except Exception:
        if reservation:  # never queued: give the budget back
            with contextlib.suppress(RedisError):
                tokens_settle(reservation=reservation, tokens=0)
        raise
    return log


PROMPT_BYTES_PER_TOKEN = 3  # English runs ~4 bytes a token, code ~3; fewer over-reserves, settled on completion


def request_token_budget(*, body: GenerationRequest, n_ctx: int, prompt_tokens: int | None = None) -> int:
    """The most tokens this request can count against its key: a prompt estimated from its content (the true
    count, `prompt_tokens`, is known only to the worker's tokenizer), capped at the context, plus n times
    max_tokens (without max_tokens, the context the prompt leaves)."""
    if prompt_tokens is not None:
        prompt = prompt_tokens
    elif isinstance(body.prompt, list):
        prompt = len(body.prompt)  # token ids: exact
    else:
        content = json.dumps([_content(body), _params(body).get("tools")], ensure_ascii=False)
        prompt = -(-len(content.encode()) // PROMPT_BYTES_PER_TOKEN)
    prompt = min(prompt, n_ctx)
    limit = body.max_tokens
    completion = min(limit, n_ctx) if limit is not None else max(n_ctx - prompt, 1)
    return prompt + body.n * completion


def embedding_token_budget(*, body: EmbeddingRequest, n_ctx: int) -> int:
    """The tokens an embedding request counts against its key: token ids exactly, texts estimated from their
    bytes, each input capped at the context (a longer one is refused, or truncated when asked)."""
    if body.inputs and isinstance(body.inputs[0], list):
        return sum(min(len(tokens), n_ctx) for tokens in body.inputs)
    return sum(min(-(-len(text.encode()) // PROMPT_BYTES_PER_TOKEN) + 2, n_ctx) for text in body.inputs)


def request_log_record(*, request_id: str, endpoint: str, method: str, model: str, status_code: int,
                       error_type: str = "", error_code: str = "", route: str | None = None,
                       audit: dict | None = None) -> RequestLog:  # fmt: skip
    """Log a request that never reached a worker (listing models, or refused before queueing). `route` is the
    URL pattern it matched, the metrics' label; the row keeps the path (cut to the column's 255 characters)."""
    failed = status_code >= 400
    log = RequestLog.objects.create(
        request_id=request_id,
        endpoint=endpoint[:255],
        method=method[:8],
        model=model,
        status=RequestLog.Status.FAILED if failed else RequestLog.Status.COMPLETED,
        status_code=status_code,
        error_type=error_type,
        error_code=error_code,
        finished=timezone.now(),
        **(audit or {}),
    )
    metrics_record(log, endpoint=route or log.endpoint, model=metrics_model_label(model))
    return log


def request_worker_lost(*, request_id: str, status_code: int) -> int:
    """Finish the row of a request whose worker died mid-run (seen by its view, or by a reaper); 1 if it did."""
    return RequestLog.objects.filter(request_id=request_id, status=RequestLog.Status.RUNNING).update(
        status=RequestLog.Status.FAILED, status_code=status_code, error_type="server_error", error_code="worker_lost",
        finished=timezone.now(),
    )  # fmt: skip


def _params(body: GenerationRequest) -> dict:
    """The request's parameters without its content (messages or prompt), as given."""
    return body.model_dump(mode="json", exclude={"messages", "prompt"}, exclude_defaults=True)


def _row_params(body: GenerationRequest) -> dict:
    """The parameters a log row keeps: without MINERVA_LOG_CONTENT, tools by name only (their descriptions and
    schemas are prompt text, which the template renders)."""
    params = _params(body)
    if not settings.LOG_CONTENT and "tools" in params:
        params["tools"] = [{"name": tool["name"]} for tool in params["tools"]]
    return params


def _content(body: GenerationRequest):
    """The request's content (messages or prompt), stored only when MINERVA_LOG_CONTENT is on."""
    field = "messages" if body.is_chat else "prompt"
    return body.model_dump(mode="json", include={field}, exclude_defaults=True)[field]


# Sent by request_logs_prune with `cutoff`: apps that keep state per request (stored responses) prune it with the log,
# without this module importing them (they sit above it).
logs_pruned = Signal()


def request_logs_prune(*, days: int) -> int:
    """Delete log rows older than `days` (and, through `logs_pruned`, what other apps keep with them); return how
    many log rows went."""
    cutoff = timezone.now() - datetime.timedelta(days=days)
    deleted, _ = RequestLog.objects.filter(created__lt=cutoff).delete()
    logs_pruned.send(sender=RequestLog, cutoff=cutoff)
    return deleted


def model_delete(*, model: LanguageModel) -> list:
    """Delete a pulled model's files and registry row, unless requests for it are queued or running (ModelInUse):
    a worker may be reading the file, and the requests would fail."""
    busy = RequestLog.objects.filter(
        model=model.name, status__in=[RequestLog.Status.QUEUED, RequestLog.Status.RUNNING]
    ).count()
    if busy:
        raise ModelInUse(f"{model.name} has {busy} request(s) queued or running; delete it once they have ended")
    return model_files_delete(model=model)
