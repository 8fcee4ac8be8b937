"""The worker side of a generation: run a queued request on its model's scheduler and finish its log row."""

import base64
import ctypes
import hashlib
import json
import logging
import math
import re
import threading
import time

import llama_cpp
import numpy as np
from django import db
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone
from pydantic import ValidationError
from redis.exceptions import RedisError

from access.models import ApiKey
from access.services import tokens_record, tokens_reserve, tokens_settle
from core.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    MinervaError,
    ServerError,
    ServiceUnavailable,
)
from core.generation import EmbeddingRequest, GenerationRequest, TokenizeRequest, parse_keep_alive, with_defaults
from core.workers import WORKER_ID, worker_announce
from models_app.metadata import estimate_memory
from models_app.models import LanguageModel
from models_app.selectors import memory_budget, model_generates, model_n_ctx, model_parallel, model_shared_cells

from .engine import (
    ContextFull,
    ContextOverflow,
    GrammarDeadEnd,
    GrammarUncompilable,
    ModelCache,
    ModelSpec,
    ModelUnavailable,
    PromptError,
    SamplingParams,
    Sequence,
    embedding_context_bytes,
)
from .engine.host import Device, gpu_devices, offloaded_fraction, unified_memory
from .metrics import metrics_record
from .models import RequestLog
from .services import _keep_alive_checked, _row_params, embedding_token_budget, request_model, request_token_budget
from .streams import CANCEL_OVERFLOW, CANCEL_TIMEOUT, RedisStepIO, TokenStream, timed_out
from .tools import (
    MARKERS,
    THINK_CLOSE,
    THINK_OPEN,
    json_schema_grammar,
    offered_tools,
    template_thinks,
    tool_format_for,
    tool_grammar,
    tool_instruction,
)

logger = logging.getLogger(__name__)

DB_RETRY_SECONDS = 120  # how long a worker keeps trying to write a finished request's row while the DB is away
shutting_down = False  # set in a worker whose drain ran out: unfinished requests say why they end


def request_run(*, log_id: int, payload: dict) -> None:
    """Generate for one queued request: hand it to its model's scheduler and wait until it finishes."""
    claimed = _claim(log_id, payload)
    if claimed is None:
        return
    log, stream = claimed

    body = GenerationRequest.model_validate(payload["generation"])
    param = "messages" if body.is_chat else "prompt"
    sequences: list[Sequence] = []
    try:
        model = _retrying(lambda: _model_row(log.model, payload.get("model_updated")))
        keep_alive = parse_keep_alive(body.keep_alive if body.keep_alive is not None else model.keep_alive or None)
        if body.load_only:
            return _load_only(log, stream, model, keep_alive)
        with model_cache().use(_spec(model), keep_alive=keep_alive) as engine:
            syntax = _tool_format(model, engine) if body.is_chat else None  # the template's, tools or not
            tool_format = syntax if body.tools_active() else None
            if body.thinking_required and not template_thinks(engine.chat_template and engine.chat_template.source):
                raise InvalidRequest(f'"{model.name}" does not support thinking', param="think")  # Ollama's words
            prompt = _prompt(engine, body, tool_format, syntax)
            _reservation_exact(log, body, len(prompt), engine.n_ctx)
            sampling = _sampling(body, model.default_params, tool_format, think=_think(engine, prompt),
                                 preserved=_preserved_tokens(engine, syntax, tool_format))  # fmt: skip
            _check_vocabulary(engine, sampling.logit_bias)
            info = {"tool_format": tool_format} if tool_format else {}
            if syntax == "harmony":  # the view splits the answer's channels (inference/reasoning.py)
                info["reasoning"] = "harmony"
            elif (body.reasoning_format or (model.default_params or {}).get("reasoning_format")) == "none":
                info["reasoning"] = "none"  # the view leaves a <think> thought in the content
            sequences = engine.submit_many(log.request_id, prompt, sampling, body.n, info=info)
            if _holds_a_server_connection():  # this thread may now wait for minutes: free the connection
                db.connection.close()
            for sequence in sequences:
                sequence.wait()
    except ContextOverflow as exc:
        return _fail(log, stream, ContextLengthExceeded(str(exc), param=param), sequences)
    except GrammarUncompilable as exc:
        return _fail(log, stream, InvalidRequest(str(exc), param=_constraint_param(body)), sequences)
    except PromptError as exc:
        return _fail(log, stream, InvalidRequest(str(exc), param="n" if "slots" in str(exc) else param), sequences)
    except ModelUnavailable as exc:
        return _fail(log, stream, ServiceUnavailable(str(exc), code="model_unavailable"), sequences)
    except MinervaError as exc:
        return _fail(log, stream, exc, sequences)
    except Exception:
        logger.exception("generation failed for request %s", log.request_id)
        return _fail(log, stream, ServerError(), sequences)

    errors = [s.error for s in sequences if s.error is not None]
    if errors and shutting_down:
        error = ServiceUnavailable("The server is shutting down; try again shortly.", code="server_shutting_down")
        return _fail(log, stream, error, sequences)
    if errors and isinstance(errors[0], ContextFull):
        return _fail(log, stream, ServiceUnavailable(str(errors[0]), code="context_full"), sequences)
    if errors and isinstance(errors[0], GrammarDeadEnd):
        error = InvalidRequest(str(errors[0]), param=_constraint_param(body), code="grammar_dead_end")
        return _fail(log, stream, error, sequences)
    if errors and isinstance(errors[0], RedisError):  # the IO thread could not publish: retryable, not our bug
        logger.error("request %s lost Redis while generating: %s", log.request_id, errors[0])
        error = ServiceUnavailable(
            "Lost the connection to Redis while generating; try again.", code="redis_unavailable"
        )
        return _fail(log, stream, error, sequences)
    if errors:
        logger.error("request %s failed in the scheduler: %s", log.request_id, errors[0])
        return _fail(log, stream, ServerError(), sequences)
    try:  # read even when every choice ended: an overflowing stream lost its `done`
        reason = stream.cancelled()
    except RedisError:  # Redis went away just now: its reader fails as well; the row still ends
        logger.warning("could not read the cancel flag of request %s", log.request_id, exc_info=True)
        reason = None
    if reason == CANCEL_OVERFLOW:
        error = InvalidRequest(f"The answer passed this server's limit of {settings.STREAM_MAXLEN} events per "
                               "request (MINERVA_STREAM_MAXLEN); ask for fewer tokens or choices.", param="max_tokens",
                               code="stream_too_long")  # fmt: skip
        return _fail(log, stream, error, sequences)
    if reason == CANCEL_TIMEOUT and any(s.finish_reason == "cancelled" for s in sequences):
        return _fail(log, stream, timed_out(), sequences)
    _count(log, sequences)
    if any(s.finish_reason == "cancelled" for s in sequences):
        _finish(log, RequestLog.Status.CANCELLED, status_code=499)
    else:
        log.finish_reason = sequences[0].finish_reason
        _finish(log, RequestLog.Status.COMPLETED, status_code=200)


_model_rows: dict[str, LanguageModel] = {}  # name -> the row last read here, reused while it is the current one


def _model_row(name: str, updated: str | None = None) -> LanguageModel:
    """The model's row, and its draft model's if it has one, read here (under the caller's retry). `updated`: the
    row's version (its `updated`, which every change to a model or its aliases moves) that the view read when it
    queued the request; a row this process read before at that version is used again without a query (0.7-0.9 ms
    of each first token on a 2-core box), unless it has a draft model, whose own changes would not show."""
    cached = _model_rows.get(name)
    if cached is not None and updated is not None and cached.updated.isoformat() == updated:
        return cached
    model = LanguageModel.objects.get(name=name)
    if model.draft_model_id is not None:
        model.draft_model  # noqa: B018 (fetched and cached on the instance)
    else:
        _model_rows[name] = model
    return model


def _claim(log_id: int, payload: dict) -> tuple[RequestLog, TokenStream] | None:
    """Take a queued request's row and mark it running (None: it must not run, and its row is already ended)."""
    log = _retrying(lambda: _running(log_id))
    if log is None:
        # A redelivery (acks_late, after a worker died), or a message put back after its host was lost that another
        # worker took first (one back from a network cut): interactive requests are never run twice.
        row = RequestLog.objects.filter(pk=log_id).values_list("request_id", "status").first()
        logger.warning("request %s was delivered again in state %s; not running it", *(row or (log_id, "deleted")))
        return None
    log.reservation = payload.get("reservation")  # its tokens-per-minute budget, settled in _finish
    stream = TokenStream(log.request_id)
    if reason := stream.cancelled():  # the client left (or its wait timed out) while it was in the queue
        if reason == CANCEL_TIMEOUT:
            _fail(log, stream, timed_out(), [])
        else:
            _finish(log, RequestLog.Status.CANCELLED, status_code=499)
        return None
    stream.publish("accepted", worker=WORKER_ID)  # the view watches this worker's heartbeat from now on
    return log, stream


def _running(log_id: int) -> RequestLog | None:
    """The row of a queued request, marked running in the same statement (UPDATE ... RETURNING, one query where a
    read and a conditional update took two on every request's path to its first token), or None when it is not
    queued: exactly one of two workers that got the same message runs it."""
    quote, meta = db.connection.ops.quote_name, RequestLog._meta
    table, pk, status = quote(meta.db_table), quote(meta.pk.column), quote(meta.get_field("status").column)
    sql = f"UPDATE {table} SET {status} = %s WHERE {pk} = %s AND {status} = %s RETURNING *"
    rows = list(RequestLog.objects.raw(sql, [RequestLog.Status.RUNNING, log_id, RequestLog.Status.QUEUED]))
    return rows[0] if rows else None


MAX_EMBEDDING_TOKENS = 300_000  # all inputs of one request together, as OpenAI limits them
EMBEDDING_EVENT_FLOATS = 1 << 16  # components per stream event (256 KiB as float32): a few events per request


def embedding_run(*, log_id: int, payload: dict) -> None:
    """Embed one queued request's inputs on its model's embedding context, where they share llama.cpp batches
    with every other request's; publish the vectors (float32, little-endian, base64) in a few `embedding`
    events, then `done` with the token count."""
    claimed = _claim(log_id, payload)
    if claimed is None:
        return
    log, stream = claimed
    body = EmbeddingRequest.model_validate(payload["embedding"])
    try:
        model = _retrying(lambda: LanguageModel.objects.get(name=log.model))
        keep_alive = parse_keep_alive(body.keep_alive if body.keep_alive is not None else model.keep_alive or None)
        with model_cache().use(_spec(model, embedding=True), keep_alive=keep_alive) as engine:
            inputs = [engine.tokenize(i) if isinstance(i, str) else i for i in body.inputs]
            total = sum(min(len(t), engine.n_ctx) if body.truncate else len(t) for t in inputs)
            if total > MAX_EMBEDDING_TOKENS:
                raise InvalidRequest(f"The inputs have {total} tokens together; at most {MAX_EMBEDDING_TOKENS} "
                                     "may be embedded in one request.", param="input")  # fmt: skip
            if body.dimensions is not None and body.dimensions > engine.n_embd:
                raise InvalidRequest(f"dimensions is {body.dimensions}, but the model {model.name} has "
                                     f"{engine.n_embd}.", param="dimensions")  # fmt: skip
            if _holds_a_server_connection():  # the batch may wait behind others: free the connection
                db.connection.close()
            vectors = np.asarray(engine.embed(inputs, truncate=body.truncate), dtype=np.float64)
    except ContextOverflow as exc:
        return _fail(log, stream, ContextLengthExceeded(str(exc), param="input"), [])
    except PromptError as exc:
        return _fail(log, stream, InvalidRequest(str(exc), param="input"), [])
    except ModelUnavailable as exc:
        return _fail(log, stream, ServiceUnavailable(str(exc), code="model_unavailable"), [])
    except MinervaError as exc:
        return _fail(log, stream, exc, [])
    except Exception:
        logger.exception("embedding failed for request %s", log.request_id)
        return _fail(log, stream, ServerError(), [])
    log.prompt_tokens = total  # only once embedded: a refused request counts no tokens, as a refused chat
    if body.dimensions is not None:  # Matryoshka-style: the first components, normalised again
        vectors = vectors[:, : body.dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1)
    # Few events, whatever the count (MINERVA_STREAM_MAXLEN counts events): as many vectors each as fit.
    per_event = max(1, EMBEDDING_EVENT_FLOATS // vectors.shape[1], -(-len(vectors) // (settings.STREAM_MAXLEN - 3)))
    try:
        for start in range(0, len(vectors), per_event):
            chunk = vectors[start : start + per_event].astype("<f4")
            stream.publish("embedding", index=start, dimensions=chunk.shape[1],
                           data=base64.b64encode(chunk.tobytes()).decode())  # fmt: skip
        stream.publish("done", index=0, prompt_tokens=log.prompt_tokens, finish_reason="stop", completion_tokens=0)
    except RedisError:  # its reader fails as well; the row still ends
        logger.warning("could not publish the vectors of request %s", log.request_id, exc_info=True)
        error = ServiceUnavailable("Redis is unavailable; try again shortly.", code="redis_unavailable")
        return _fail(log, stream, error, [])
    _finish(log, RequestLog.Status.COMPLETED, status_code=200)


def embedding_run_inline(*, request_id: str, endpoint: str, body: EmbeddingRequest, batch_id: str,
                         api_key: ApiKey | None = None) -> RequestLog:  # fmt: skip
    """A batch line's embedding request, recorded and run on this thread like request_run_inline's generation."""
    model = request_model(name=body.model, api_key=api_key)
    body = _keep_alive_checked(body, api_key)
    reservation = None
    if api_key is not None and api_key.tpm is not None:  # raises RateLimited, as for an interactive request
        reservation = tokens_reserve(key=api_key, tokens=embedding_token_budget(body=body, n_ctx=model_n_ctx(model)))
    log = RequestLog.objects.create(
        request_id=request_id, endpoint=endpoint, model=model.name, batch_id=batch_id,
        request=body.model_dump(mode="json", exclude={"inputs"}, exclude_defaults=True) | {"inputs": len(body.inputs)},
        api_key_prefix=api_key.prefix if api_key is not None else "",
    )  # fmt: skip
    payload = {"embedding": body.model_dump(mode="json", exclude_defaults=True), "reservation": reservation}
    embedding_run(log_id=log.pk, payload=payload)
    log.refresh_from_db()
    return log


def tokenize_run(*, log_id: int, payload: dict) -> None:
    """Tokenize, detokenize or count a chat prompt with the model's own tokenizer and template; publish the
    answer as the `done` event. A generating model's context serves it (loaded for chat anyway); an embedding
    model's its embedding context."""
    claimed = _claim(log_id, payload)
    if claimed is None:
        return
    log, stream = claimed
    body = TokenizeRequest.model_validate(payload["tokenize"])
    try:
        model = _retrying(lambda: _model_row(log.model))
        spec = _spec(model) if model_generates(model) else _spec(model, embedding=True)
        with model_cache().use(spec) as engine:
            answer = _tokenize(engine, model, body)
    except ContextOverflow as exc:
        return _fail(log, stream, ContextLengthExceeded(str(exc), param="messages"), [])
    except PromptError as exc:
        return _fail(log, stream, InvalidRequest(str(exc), param="messages"), [])
    except ModelUnavailable as exc:
        return _fail(log, stream, ServiceUnavailable(str(exc), code="model_unavailable"), [])
    except MinervaError as exc:
        return _fail(log, stream, exc, [])
    except Exception:
        logger.exception("tokenizing failed for request %s", log.request_id)
        return _fail(log, stream, ServerError(), [])
    try:
        stream.publish("done", index=0, finish_reason="stop", prompt_tokens=0, completion_tokens=0, **answer)
    except RedisError:  # its reader fails as well; the row still ends
        logger.warning("could not publish the answer of request %s", log.request_id, exc_info=True)
        return _fail(log, stream, ServiceUnavailable("Redis is unavailable; try again shortly.",
                                                     code="redis_unavailable"), [])  # fmt: skip
    _finish(log, RequestLog.Status.COMPLETED, status_code=200)


def _tokenize(engine, model: LanguageModel, body: TokenizeRequest) -> dict:
    llama = engine.model  # llama-cpp-python's LlamaModel, of a generating or an embedding context alike
    if body.chat is not None:
        syntax = _tool_format(model, engine)
        tool_format = syntax if body.chat.tools_active() else None
        return {"count": len(_prompt(engine, body.chat, tool_format, syntax))}
    if body.content is not None:
        tokens = llama.tokenize(body.content.encode(), add_bos=body.add_special, special=body.parse_special)
        if not body.with_pieces:
            return {"tokens": tokens}
        pieces = []
        for token in tokens:
            piece = _piece(engine, token)
            try:  # llama-server's shape: the text, or the bytes when a token is part of a UTF-8 character
                pieces.append({"id": token, "piece": piece.decode()})
            except UnicodeDecodeError:
                pieces.append({"id": token, "piece": list(piece)})
        return {"tokens": pieces}
    tokens = body.tokens or []
    if (bad := _outside_vocabulary(engine, tokens)) is not None:  # llama.cpp would abort the process on it
        raise InvalidRequest(f"Token id {bad} is outside the vocabulary (0..{engine.n_vocab - 1}).", param="tokens")
    return {"content": b"".join(_piece(engine, t) for t in tokens).decode(errors="replace")}


def _constraint_param(body: GenerationRequest) -> str:
    """The parameter a grammar's failure is the fault of."""
    return "tools" if body.tools_active() else "response_format"


def _reservation_exact(log: RequestLog, body: GenerationRequest, prompt_tokens: int, n_ctx: int) -> None:
    """Make a metered request's reservation exact once its prompt is tokenized: the view estimated the prompt from
    its bytes, without the chat template's text (a default system prompt, each message's markers), and requests
    admitted later in the minute must see what this one really holds. Settled again to what it used in _finish."""
    reservation = getattr(log, "reservation", None)
    if not reservation:
        return
    exact = request_token_budget(body=body, n_ctx=n_ctx, prompt_tokens=prompt_tokens)
    try:
        tokens_settle(reservation=reservation, tokens=exact)
    except RedisError:  # the estimate stands; the request runs (its end settles what it used)
        logger.warning("could not correct the token reservation of request %s", log.request_id, exc_info=True)
    else:
        reservation["tokens"] = exact


def _outside_vocabulary(engine, tokens) -> int | None:
    """The first of `tokens` the model does not have, if any."""
    return next((t for t in tokens if not 0 <= t < engine.n_vocab), None)


def _check_vocabulary(engine, logit_bias: dict[int, float]) -> None:
    """Refuse a bias on a token the model does not have (OpenAI's 400; the engine would drop it unsaid)."""
    if (bad := _outside_vocabulary(engine, logit_bias)) is not None:
        raise InvalidRequest(f"logit_bias names token {bad}, outside the vocabulary (0..{engine.n_vocab - 1}).",
                             param="logit_bias")  # fmt: skip


def _piece(engine, token: int) -> bytes:
    """The bytes of one token, special tokens as their text."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(engine.vocab, token, buf, 64, 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(engine.vocab, token, buf, -n, 0, True)
    return buf.raw[:n]


def request_run_inline(*, request_id: str, endpoint: str, body: GenerationRequest, batch_id: str,
                       api_key: ApiKey | None = None) -> RequestLog:  # fmt: skip
    """Record a batch line's request (as its batch's key) and run it on this thread (its batch task already holds
    a worker thread, so it skips the queue and its limit); return the finished row. Its events are in its
    TokenStream."""
    model = request_model(name=body.model, api_key=api_key, generates=True)
    body = _keep_alive_checked(body, api_key)
    reservation = None
    if api_key is not None and api_key.tpm is not None:  # raises RateLimited, as for an interactive request
        reservation = tokens_reserve(key=api_key, tokens=request_token_budget(body=body, n_ctx=model_n_ctx(model)))
    log = RequestLog.objects.create(
        request_id=request_id, endpoint=endpoint, model=model.name, request=_row_params(body), batch_id=batch_id,
        api_key_prefix=api_key.prefix if api_key is not None else "",
    )  # fmt: skip
    payload = {"generation": body.model_dump(mode="json", exclude_defaults=True), "reservation": reservation}
    request_run(log_id=log.pk, payload=payload)
    log.refresh_from_db()
    return log


_cache: ModelCache | None = None
_cache_lock = threading.Lock()


def model_cache() -> ModelCache:
    """This worker's loaded models (created on first use)."""
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = ModelCache(
                budget_bytes=memory_budget(),
                device_budget_bytes=device_budget(),
                default_keep_alive=parse_keep_alive(settings.KEEP_ALIVE),
                io_factory=RedisStepIO,
                on_change=_report_loaded,
            )
        return _cache


_devices: list[Device] | None = None


def devices() -> list[Device]:
    """The GPUs this worker offloads to, as llama.cpp reported them at its first load ([] on Apple Silicon,
    whose unified memory is counted as system memory, and on CPU-only builds)."""
    global _devices
    if _devices is None:
        _devices = [] if unified_memory() else gpu_devices()
    return _devices


def device_budget() -> int:
    """GPU memory for models: MINERVA_GPU_MEMORY_BUDGET, else 90% of what the GPUs report free (0 without one)."""
    if not devices():
        return 0
    return settings.GPU_MEMORY_BUDGET or int(sum(d.free for d in devices()) * 0.9)


# What this worker process tells the registry (core.workers) in its heartbeat. worker.py fills `worker_state` (its
# Celery name, queues, slots, the messages it holds) and `hosted` (the models whose files this host has: name ->
# {"path", "hash"}); the model cache's reports fill `_loaded`. In-process tests have only the cache's reports.
worker_state: dict = {}
hosted: dict[str, dict] = {}
_loaded: tuple[float, list[dict]] = (0.0, [])
_announce_lock = threading.Lock()


def _report_loaded(loaded: list[dict]) -> None:
    """The cache's report (after each load and unload, and every 5 s): announced at once, so /v1/models' `loaded`
    follows a load without waiting for the next beat."""
    global _loaded
    _loaded = (time.time(), loaded)
    worker_announce_now()


def models_loading() -> dict[str, float]:
    """The models this worker is loading now and how far each is (0 to 1); read without the cache's lock."""
    cache = _cache
    return {name: round(value, 3) for name, value in dict(cache.loading).items()} if cache is not None else {}


def worker_announce_now() -> None:
    """Write this worker's record to the registry (its heartbeat): never touches the model cache's lock, which a
    load holds for seconds, nor the database."""
    loaded_at, loaded = _loaded
    with _announce_lock:
        worker_announce({
            **worker_state,
            "models": {name: {"hash": info["hash"]} for name, info in hosted.items()},
            "loaded": loaded, "loaded_at": loaded_at,
            "memory": _memory(loaded),
        })  # fmt: skip


def _memory(loaded: list[dict]) -> dict:
    """The worker's budgets and what its loaded models take of them (estimates, bytes), and its GPUs."""
    device = sum(m.get("device_bytes", 0) for m in loaded)
    return {"budget_bytes": memory_budget(), "used_bytes": sum(m["estimated_bytes"] for m in loaded) - device,
            "device_budget_bytes": device_budget(), "device_used_bytes": device,
            "devices": [d.to_dict() for d in devices()]}  # fmt: skip


# Tokens a draft model proposes per step when MINERVA_SPECULATIVE_DRAFT leaves it to the model (0).
DRAFT_MODEL_TOKENS = 8


def _spec(model: LanguageModel, *, embedding: bool = False) -> ModelSpec:
    """How a worker loads the model: to generate, or (`embedding`) to embed, in a context of its own whose batch
    holds MINERVA_EMBEDDING_BATCH inputs and n_ctx tokens (the most one input may have)."""
    n_ctx, n_parallel, shared = model_n_ctx(model), model_parallel(model), model_shared_cells(model)
    cells = n_ctx if shared else n_ctx * n_parallel
    if embedding:
        n_seq = settings.EMBEDDING_BATCH
        return ModelSpec(
            name=model.name, path=_local_path(model), n_ctx=n_ctx, n_parallel=n_seq, embedding=True,
            n_gpu_layers=model.n_gpu_layers if model.n_gpu_layers is not None else settings.N_GPU_LAYERS,
            n_threads=settings.N_THREADS or None,
            estimated_bytes=(size := model.file_size + embedding_context_bytes(model.metadata, n_ctx, n_seq)),
            device_bytes=_device_share(model, size),
        )  # fmt: skip
    draft = model.draft_model if model.draft_model_id and model.draft_model.available else None
    return ModelSpec(
        name=model.name,
        path=_local_path(model),
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        n_gpu_layers=model.n_gpu_layers if model.n_gpu_layers is not None else settings.N_GPU_LAYERS,
        n_threads=settings.N_THREADS or None,
        n_batch=settings.N_BATCH,
        chat_template=model.chat_template_override or None,
        shared_cells=shared,
        cache_type=settings.KV_CACHE_TYPE,
        draft_max=settings.SPECULATIVE_DRAFT or (DRAFT_MODEL_TOKENS if draft else 0),
        draft_path=_local_path(draft) if draft else None,
        cache_ram_bytes=settings.CACHE_RAM_MIB << 20,
        backend_sampling=settings.BACKEND_SAMPLING,
        estimated_bytes=(
            size := estimate_memory(model.metadata, cells, settings.KV_CACHE_TYPE)
            + (estimate_memory(draft.metadata, cells) if draft else 0)  # its cache is f16 (DraftModel)
        ),
        device_bytes=_device_share(model, size),
    )


def _device_share(model: LanguageModel, size: int) -> int:
    """The bytes of a loaded model that sit on GPUs: its offloaded layers' share (0 without a GPU)."""
    if not devices():
        return 0
    n_gpu_layers = model.n_gpu_layers if model.n_gpu_layers is not None else settings.N_GPU_LAYERS
    return int(size * offloaded_fraction(n_gpu_layers, (model.metadata or {}).get("block_count")))


def _local_path(model: LanguageModel) -> str:
    """The model's file on this host: each worker host has its own models folder, so the row's path (where it was
    first registered) is only a fallback."""
    return hosted.get(model.name, {}).get("path") or model.path


def _tool_format(model: LanguageModel, engine) -> str:
    """The admin's choice for this model, else the syntax its chat template was written for."""
    return model.tool_format or tool_format_for(engine.chat_template.source if engine.chat_template else None)


def _prompt(engine, body: GenerationRequest, tool_format: str | None, syntax: str | None = None) -> list[int]:
    """The prompt's tokens: a chat through the model's template (tools in its `tools` variable, earlier calls in
    its family's syntax `syntax`), or a completion's text or tokens."""
    if body.is_chat:
        template_vars = {"reasoning_effort": body.reasoning_effort} if body.reasoning_effort else {}
        if tool_format not in (None, "generic"):
            template_vars["tools"] = offered_tools(body)
        source = engine.chat_template.source if engine.chat_template else ""
        describe = tool_format == "generic" or (tool_format == "deepseek_v3_1" and not _TOOLS.search(source))
        messages = _template_messages(body, tool_format, syntax=syntax, describe_tools=describe)
        return engine.chat_prompt(messages, **template_vars)
    if isinstance(body.prompt, str):
        return engine.text_prompt(body.prompt)
    return list(body.prompt or [])


_TOOLS = re.compile(r"\btools\b")  # a template that never names `tools` does not render them


def _template_messages(body: GenerationRequest, tool_format: str | None = None, *, syntax: str | None = None,
                       describe_tools: bool | None = None) -> list[dict]:  # fmt: skip
    """Messages as chat templates expect them: plain-text content, and one system message at the front
    (several are merged, since Qwen-style templates reject any other). Earlier tool calls go back in the template's
    syntax (`syntax`, else `tool_format`): as the template's own `tool_calls` (arguments as objects, which is what
    templates' `tojson` expects, and ids as the family writes them), or for the generic format as the JSON answer.
    `describe_tools` (the generic format's default): the tools are described in the system message."""
    syntax = syntax or tool_format
    system = [m.content for m in body.messages if m.role == "system"]
    if describe_tools if describe_tools is not None else tool_format == "generic":
        system.append(tool_instruction(body, tool_format))
    ids = _call_ids(body, syntax)
    rest = []
    for m in body.messages:
        if m.role == "system":
            continue
        message = {"role": m.role, "content": m.content}
        if m.tool_calls and syntax in (None, "generic"):
            message["content"] = _tool_calls_as_answer(m.tool_calls)
        elif m.tool_calls:
            message["tool_calls"] = [{"id": ids.get(c.id, c.id), "type": "function",
                                      "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                     for c in m.tool_calls]  # fmt: skip
        if m.reasoning:
            message["reasoning_content"] = m.reasoning
            if syntax == "harmony":  # gpt-oss's template reads `thinking`, and refuses it beside content in a call
                message["thinking"] = m.reasoning
                if m.tool_calls:
                    message["content"] = ""
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = ids.get(m.tool_call_id, m.tool_call_id)
        rest.append(message)
    if syntax in ("harmony", "llama3"):  # their templates render one call per assistant turn
        rest = _one_call_per_turn(rest)
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + rest


def _call_ids(body: GenerationRequest, syntax: str | None) -> dict[str, str]:
    """Earlier calls' ids as the family writes them, for templates that check them or write them back: Mistral's
    nine letters and digits (its templates refuse others), Kimi's `functions.NAME:INDEX`."""
    ids: dict[str, str] = {}
    for m in body.messages:
        for index, call in enumerate(m.tool_calls):
            if syntax == "mistral" and not (len(call.id) == 9 and call.id.isalnum()):
                ids[call.id] = hashlib.sha256(call.id.encode()).hexdigest()[:9]
            elif syntax == "kimi_k2":
                ids[call.id] = f"functions.{call.name}:{index}"
    return ids


def _one_call_per_turn(messages: list[dict]) -> list[dict]:
    """gpt-oss's template renders one call per assistant turn (Harmony has no parallel calls) and names a result
    after the call before it; Llama 3.1's refuses a turn with more: a turn with several calls becomes one turn per
    call, each followed by its result."""
    out: list[dict] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        calls = message.get("tool_calls") or []
        i += 1
        if len(calls) < 2:
            out.append(message)
            continue
        results = []
        while i < len(messages) and messages[i]["role"] == "tool":
            results.append(messages[i])
            i += 1
        for k, call in enumerate(calls):
            turn = dict(message, tool_calls=[call]) if k == 0 else {"role": "assistant", "content": "",
                                                                      "tool_calls": [call]}  # fmt: skip
            out.append(turn)
            out += [r for r in results if r.get("tool_call_id") == call["id"]]
        out += [r for r in results if r.get("tool_call_id") not in {c["id"] for c in calls}]
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _tool_calls_as_answer(calls) -> str:
    """An earlier assistant turn's tool calls, written the way the generic format asks the model to answer."""
    return json.dumps({"tool_calls": [{"name": c.name, "arguments": _arguments(c.arguments)} for c in calls]},
                      ensure_ascii=False)  # fmt: skip


def _think(engine, prompt: list[int]) -> str | None:
    """How a thought may come before a required call: "open" when the prompt leaves the model inside <think>,
    "optional" when its template knows <think> (the model may open one), None when it knows none or closed it
    (DeepSeek's `<think></think>` when thinking is off)."""
    if engine.chat_template is None or THINK_OPEN not in engine.chat_template.source:
        return None
    end = engine.detokenize(prompt[-4:]).rstrip()
    return "open" if end.endswith(THINK_OPEN) else None if end.endswith(THINK_CLOSE) else "optional"


def _preserved_tokens(engine, syntax: str | None, tool_format: str | None) -> frozenset[int]:
    """The special tokens the answer's parser must see as text (a format's markers: <|channel|>, [TOOL_CALLS],
    ...): those of the template's syntax when tools are offered, and Harmony's always (its channels carry the
    reasoning)."""
    if tool_format is None and syntax != "harmony":
        return frozenset()
    tokens = set()
    for marker in MARKERS.get(syntax, ()):
        ids = engine.model.tokenize(marker.encode(), add_bos=False, special=True)
        if len(ids) == 1:  # a single token: a special one, or one that renders anyway
            tokens.add(ids[0])
    return frozenset(tokens)


def _sampling(body: GenerationRequest, model_defaults: dict, tool_format: str | None = None, *,
              think: str | None = None, preserved: frozenset[int] = frozenset()) -> SamplingParams:  # fmt: skip
    """The request's sampling parameters; what it leaves out comes from the model's defaults, then ours."""
    try:
        body = with_defaults(body, model_defaults)
    except ValidationError:  # LanguageModel.clean() refuses these in admin; a hand-edited row may not
        logger.warning("ignoring invalid default_params %s", model_defaults)
    defaults = SamplingParams()
    grammar, triggers = _grammar(body, tool_format, think)
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=body.top_k if body.top_k is not None else defaults.top_k,
        min_p=body.min_p if body.min_p is not None else defaults.min_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repeat_penalty=body.repeat_penalty if body.repeat_penalty is not None else defaults.repeat_penalty,
        repeat_last_n=body.repeat_last_n if body.repeat_last_n is not None else defaults.repeat_last_n,
        seed=body.seed,
        stop=list(body.stop or []),
        logit_bias=dict(body.logit_bias),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
        grammar=grammar,
        grammar_triggers=triggers,
        preserved_tokens=preserved,
    )


def _grammar(
    body: GenerationRequest, tool_format: str | None, think: str | None = None
) -> tuple[str | None, list[str]]:
    """A GBNF grammar (and its lazy triggers) for the request's tools, or for its JSON schema."""
    try:
        if tool_format is not None:
            return tool_grammar(body, tool_format, think=think)
        if body.json_schema is None:
            return None, []
        return json_schema_grammar(body.json_schema), []
    except ValueError as exc:
        raise InvalidRequest(f"The JSON schema cannot be turned into a grammar: {exc}",
                             param=_constraint_param(body)) from None  # fmt: skip


def model_preload(name: str) -> None:
    """Load a model as the worker starts and keep it loaded (keep-alive forever), as Ollama's keep_alive -1 does."""
    model = LanguageModel.objects.get(name=name, enabled=True, available=True)
    started = time.monotonic()
    with model_cache().use(_spec(model), keep_alive=math.inf):
        logger.info("preloaded %s in %.1f s", name, time.monotonic() - started)


def _load_only(log: RequestLog, stream: TokenStream, model: LanguageModel, keep_alive: float | None) -> None:
    """Load the model and generate nothing; keep_alive 0 unloads it instead (once its running requests end). Its
    one `done` event says which, as its finish reason: "load" or "unload"."""
    if keep_alive == 0:
        model_cache().release(model.name)
        reason = "unload"
    else:
        with model_cache().use(_spec(model), keep_alive=keep_alive):
            reason = "load"
    stream.publish("done", index=0, finish_reason=reason, prompt_tokens=0, cached_tokens=0, completion_tokens=0)
    log.finish_reason = reason
    _finish(log, RequestLog.Status.COMPLETED, status_code=200)


def _count(log: RequestLog, sequences: list[Sequence]) -> None:
    if not sequences:
        return
    log.prompt_tokens, log.cached_tokens = len(sequences[0].prompt), sequences[0].cached_tokens
    log.completion_tokens = sum(s.completion_tokens for s in sequences)
    # Not columns: speculative decoding's counts go to the metrics only (metrics_record).
    log.drafted_tokens = sum(s.drafted for s in sequences)
    log.accepted_draft_tokens = sum(s.accepted for s in sequences)
    first = min((s.first_token_at for s in sequences if s.first_token_at is not None), default=None)
    if first is not None:
        log.ttft_ms = round(_ms_since(log) - (time.monotonic() - first) * 1000, 1)


def _fail(log: RequestLog, stream: TokenStream, exc: MinervaError, sequences: list[Sequence]) -> None:
    try:
        stream.publish("error", **exc.to_dict()["error"], status=exc.status)
    except RedisError:  # Redis is away: the view's read fails too and tells the client; the row still ends
        logger.warning("could not publish the error of request %s", log.request_id, exc_info=True)
    _count(log, sequences)
    log.error_type, log.error_code = exc.type, exc.code or ""
    # A stream that already started has sent its 200; the error travels as an SSE frame.
    started = log.stream and any(s.first_token_at is not None for s in sequences)
    _finish(log, RequestLog.Status.FAILED, status_code=200 if started else exc.status)


def _finish(log: RequestLog, status: str, *, status_code: int) -> None:
    log.status, log.status_code = status, status_code
    log.finished = timezone.now()
    log.latency_ms = _ms_since(log)
    try:
        if settings.LOG_CONTENT:
            log.completion = TokenStream(log.request_id).text()
    except RedisError:
        logger.warning("could not read the completion of request %s for the log", log.request_id, exc_info=True)
    _retrying(log.save)
    try:  # counters are best effort: the row above is the record
        used = log.prompt_tokens + log.completion_tokens
        reservation = getattr(log, "reservation", None)
        if reservation:  # admitted against the key's budget: the real count replaces the estimate
            tokens_settle(reservation=reservation, tokens=used)
        else:
            tokens_record(prefix=log.api_key_prefix, tokens=used)
        metrics_record(log)
        TokenStream(log.request_id).finished()  # after the save: a batch line reads the stream once its row is done
    except RedisError:
        logger.warning("could not count request %s in the metrics", log.request_id, exc_info=True)


def _retrying(write, *, seconds: float = DB_RETRY_SECONDS):
    """Run a database call, retrying while the database is unreachable or locked, so a request that ran
    while it was away still gets its row once it is back (a worker has no client to return a 503 to)."""
    deadline = time.monotonic() + seconds
    delay = 0.2
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError):  # not IntegrityError and the like: those do not heal
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("database unavailable; retrying in %.1f s", delay, exc_info=True)
            db.close_old_connections()
            if not db.connection.in_atomic_block:
                db.connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _holds_a_server_connection() -> bool:
    """Whether this thread's connection is worth freeing while it waits: a database server's (PostgreSQL keeps a
    process per connection), not SQLite's (a file handle, which costs ~1 ms of the worker's GIL to open again)."""
    return db.connection.vendor != "sqlite" and not db.connection.in_atomic_block


def _ms_since(log: RequestLog) -> float:
    return round((timezone.now() - log.created).total_seconds() * 1000, 1)
