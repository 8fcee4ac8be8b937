"""Batches: a file of requests becomes BatchLine rows; each model's worker runs them on at most `batch_slots`
of the model's slots (the others stay free for interactive requests), through the same generation path as the
endpoints; the finished lines become an output file and an error file.

Lines wait in the database, not in Celery: a task on the model's queue (a "lane") claims one waiting line after
another. Claims and results are conditional updates, so no line runs twice at once or records two results.

A batch belongs to the key that created it: its lines run under that key's model scope, rate limits and usage."""

import contextlib
import json
import logging
import threading
import time
import uuid
from datetime import timedelta

from asgiref.sync import async_to_sync
from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Q, Sum
from django.utils import timezone
from pydantic import ValidationError
from redis.exceptions import RedisError

from access.models import ApiKey
from access.services import InvalidApiKey, RateLimited, rate_limit_check
from api.decorators import validation_error
from api.protocol import ChatCompletionRequest, CompletionRequest, CreateEmbeddingRequest
from api.views import check_chat, check_completion, collect_answer, collect_embeddings
from core.errors import InvalidRequest, MinervaError, ModelNotFound, NotFound, ServerError, WorkerLost
from core.redis import get_redis
from core.workers import WORKER_ID, worker_alive, workers_list
from inference.models import RequestLog
from inference.run import embedding_run_inline, request_run_inline
from inference.streams import TokenStream
from models_app.models import LanguageModel
from models_app.selectors import model_get, model_parallel

from .files import _temp_path, batch_input_lines, owned
from .models import Batch, BatchLine, File
from .storage import LocalFile, files_storage

logger = logging.getLogger(__name__)

stopping = threading.Event()  # set by worker.py when the worker starts its shutdown: lanes take no new lines

ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
             "/v1/embeddings": CreateEmbeddingRequest}  # fmt: skip
COMPLETION_WINDOW = timedelta(hours=24)
# Errors that say the line never got a fair run (its worker stopped under it): it waits for another.
RETRY_CODES = {"server_shutting_down", "worker_lost"}
MAX_ERRORS = 100  # validation errors kept on a failed batch
CHUNK_LINES = 500  # lines written per transaction, so other writers (SQLite has one at a time) wait one chunk
# Set while a batch's lines are being written (refreshed per chunk): without it, a batch still `validating` was
# left half-written by a process that died, and the reaper removes it.
CREATING_KEY = "minerva:batch:creating:{}"
CREATING_TTL_SECONDS = 120
# A key past its rate limit for this minute: lanes leave its lines waiting until the key expires with the minute.
THROTTLED_KEY = "minerva:batch:throttled:{}"
MAX_ATTEMPTS = 2  # a line whose worker died under it this many times goes to the error file as worker_lost

Line = BatchLine.Status


def batch_slots(model: LanguageModel) -> int:
    """How many of the model's slots one worker gives batch lines: MINERVA_BATCH_SLOTS, else all but one."""
    slots = model_parallel(model)
    return min(settings.BATCH_SLOTS or max(1, slots - 1), slots)


def batch_create(*, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
                 api_key: ApiKey | None) -> Batch:  # fmt: skip
    """Check every line of the input file (one of `api_key`'s own files) and record one BatchLine each, in chunks
    (the batch stays `validating`, so no worker takes its lines, until all exist); then start the lines' models'
    lanes. Lines that cannot run (bad parameters, a model unknown or outside the key's scope) fail at once."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
    if completion_window != "24h":
        raise InvalidRequest("completion_window must be 24h.", param="completion_window")
    prefix = api_key.prefix if api_key is not None else ""
    # The key's own file, even for a staff key (which sees every file): a batch runs its owner's prompts only.
    file = File.objects.filter(pk=input_file_id, api_key_prefix=prefix).first()
    if file is None:
        raise InvalidRequest(f"No such File object: {input_file_id}", param="input_file_id")
    if file.purpose != File.Purpose.BATCH:
        raise InvalidRequest(f"File {file.id} was not uploaded with purpose batch.", param="input_file_id")
    batch = Batch.objects.create(
        endpoint=endpoint, input_file=file, completion_window=completion_window, metadata=metadata,
        expires_at=timezone.now() + COMPLETION_WINDOW, api_key_prefix=prefix,
    )  # fmt: skip
    try:
        errors, models = _add_lines(batch, api_key)
    except BaseException:
        try:
            _batch_discard(batch_id=batch.id, errors=[_interrupted("The batch could not be recorded.")])
        except Exception:  # the database is away: the reaper removes it once CREATING_KEY expires
            logger.warning("could not remove the half-created batch %s", batch.id, exc_info=True)
        raise
    if errors:
        _batch_discard(batch_id=batch.id, errors=errors)
    else:
        with transaction.atomic():
            started = Batch.objects.filter(pk=batch.pk, status=Batch.Status.VALIDATING).update(
                status=Batch.Status.IN_PROGRESS, in_progress_at=timezone.now(), model=next(iter(models), "")
            )
            # robust: if Redis is away the batch still stands, and the reaper starts its lanes later
            transaction.on_commit(lambda: batch_lanes_start(models=models if started else []), robust=True)
    _creating_done(batch.id)
    batch.refresh_from_db()
    # Every line failed its checks: nothing to wait for. (Not while a line runs: lanes start on commit, and a quick
    # line, an embedding's, is claimed before this check; finalizing then wrote it to the error file as not run.)
    waiting = batch.lines.filter(status__in=[Line.PENDING, Line.RUNNING])
    if batch.status == Batch.Status.IN_PROGRESS and not waiting.exists():
        batch_finalize(batch_id=batch.id)
        batch.refresh_from_db()
    return batch


def _add_lines(batch: Batch, api_key: ApiKey | None) -> tuple[list[dict], list[str]]:
    """Create the batch's lines from its input file, CHUNK_LINES per transaction (never the whole file in memory
    or in one transaction); return the validation errors that fail the batch (after the first, nothing more is
    written), and the models its waiting lines need, in order of appearance."""
    errors, models, lines, refused = [], {}, [], []
    known: dict[str, str | MinervaError] = {}  # the name a line gives -> the model's own name, or why it cannot run

    def write() -> None:
        started = time.monotonic()
        with transaction.atomic():
            BatchLine.objects.bulk_create(lines)
            RequestLog.objects.bulk_create(refused)
        _give_way(started)
        lines.clear()
        refused.clear()
        _creating(batch.id)

    _creating(batch.id)
    try:
        for number, offset, request in _stored_lines(batch.input_file):
            if request["url"] != batch.endpoint:
                if len(errors) < MAX_ERRORS:
                    message = f"The url {request['url']} differs from the batch's endpoint, {batch.endpoint}."
                    errors.append({"code": "mismatched_endpoint", "message": message, "param": "url", "line": number})
                continue
            if errors:  # the batch fails: read on only to name the other faulty lines
                continue
            line = BatchLine(batch=batch, index=number, offset=offset, custom_id=request["custom_id"])
            try:
                body = _parse(batch.endpoint, request["body"])
                line.model = body.model[:255]
                if body.model not in known:
                    known[body.model] = _resolve(body.model, api_key)
                if isinstance(known[body.model], MinervaError):
                    raise known[body.model]
                line.model = known[body.model]
                models.setdefault(line.model, None)
            except MinervaError as exc:
                line.request_id = uuid.uuid4().hex
                line.status, line.output = Line.FAILED, _result(line, exc.status, exc.to_dict())
                refused.append(_refused_log(batch, line, exc))
            lines.append(line)
            if len(lines) >= CHUNK_LINES:
                write()
    except InvalidRequest as exc:  # the file changed since its upload's checks
        errors.append({"code": exc.code or "invalid_file", "message": exc.message, "param": "input_file_id"})
    if not errors:
        write()
    return errors, list(models)


def _stored_lines(file: File):
    """batch_input_lines of a kept File, read from the files storage."""
    with file.open() as f:
        yield from batch_input_lines(f)


def _batch_discard(*, batch_id: str, errors: list[dict]) -> None:
    """Fail a batch that is still `validating` with `errors`, and remove what was written of it, in chunks (the
    refused lines' log rows go too: the batch's creation is the one request logged)."""
    Batch.objects.filter(pk=batch_id, status=Batch.Status.VALIDATING).update(
        status=Batch.Status.FAILED, errors=errors, failed_at=timezone.now()
    )
    for rows in (BatchLine.objects.filter(batch_id=batch_id), RequestLog.objects.filter(batch_id=batch_id)):
        while pks := list(rows.values_list("pk", flat=True)[:CHUNK_LINES]):
            started = time.monotonic()
            rows.model.objects.filter(pk__in=pks).delete()
            _give_way(started)


def _give_way(started: float) -> None:
    """After one chunk of a long run of writes that began at `started`: on SQLite, wait as long as it took, so the
    one write lock is free at least half of the time. (It goes to whoever asks first once freed, and a waiting writer
    asks only every 100 ms: chunks back to back kept interactive requests' log rows waiting for seconds.)"""
    if connection.vendor == "sqlite":
        time.sleep(time.monotonic() - started)


def _interrupted(message: str) -> dict:
    return {"code": "batch_creation_interrupted", "message": f"{message} Create it again.", "param": None}


def _creating(batch_id: str) -> None:
    """Say that this process is still writing the batch's lines (see CREATING_KEY)."""
    try:
        get_redis().set(CREATING_KEY.format(batch_id), "1", ex=CREATING_TTL_SECONDS)
    except RedisError:  # the reaper may then take the batch for abandoned: batch_create sees that at its end
        logger.warning("could not mark batch %s as being created", batch_id, exc_info=True)


def _creating_done(batch_id: str) -> None:
    with contextlib.suppress(RedisError):  # it expires
        get_redis().delete(CREATING_KEY.format(batch_id))


def _resolve(name: str, api_key: ApiKey | None) -> str | MinervaError:
    """The model's own name (an alias resolved), or why a line for it cannot run: unknown, or outside the key's
    scope (the same model_not_found the key's interactive request would get)."""
    try:
        model = model_get(name).name
    except MinervaError as exc:
        return exc
    if api_key is not None and not api_key.allows(model):
        return ModelNotFound(name)
    return model


def _parse(endpoint: str, body: dict) -> ChatCompletionRequest | CompletionRequest | CreateEmbeddingRequest:
    """The line's body as its endpoint would take it (same schema, same checks); never streamed."""
    try:
        request = ENDPOINTS[endpoint].model_validate({**body, "stream": False})
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    if isinstance(request, ChatCompletionRequest):
        check_chat(request)
    elif isinstance(request, CompletionRequest):
        check_completion(request)
    return request


def _refused_log(batch: Batch, line: BatchLine, exc: MinervaError) -> RequestLog:
    """The request-history row of a line refused before it reached a model."""
    return RequestLog(
        request_id=line.request_id, endpoint=batch.endpoint, model=line.model, status=RequestLog.Status.FAILED,
        status_code=exc.status, error_type=exc.type, error_code=exc.code or "", batch_id=batch.id,
        api_key_prefix=batch.api_key_prefix, finished=timezone.now(),
    )  # fmt: skip


def _result(line: BatchLine, status_code: int, body: dict) -> str:
    """A line of the output or error file."""
    response = {"status_code": status_code, "request_id": f"req_{line.request_id}", "body": body}
    return json.dumps({"id": f"batch_req_{line.request_id}", "custom_id": line.custom_id, "response": response,
                       "error": None}, ensure_ascii=False)  # fmt: skip


def _not_run(line: BatchLine) -> str:
    """The error-file line of a line that never ran (its batch was cancelled or expired first)."""
    code = "batch_expired" if line.status == Line.EXPIRED else "batch_cancelled"
    message = "The batch expired before this request ran." if code == "batch_expired" else (
        "The batch was cancelled before this request ran.")  # fmt: skip
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None,
                       "error": {"code": code, "message": message}}, ensure_ascii=False)  # fmt: skip


def batch_lanes_start(*, models: list[str]) -> None:
    """Queue one lane per batch slot of each live worker that has the model, on its queue (a lane finding its
    worker's slots taken just ends), so the lines of a batch spread over every host that serves the model."""
    lane = current_app.tasks["minerva.run_batch_lines"]  # by name: tasks.py imports this module
    workers = workers_list()
    for model in LanguageModel.objects.filter(name__in=models):
        hosts = sum(1 for worker in workers if model.name in worker.get("models", {}))
        for _ in range(batch_slots(model) * max(hosts, 1)):
            lane.apply_async(args=[model.name], queue=model.queue)


def batch_lines_run(*, model_name: str) -> int:
    """A lane: run the model's waiting lines one after another while this worker has a batch slot; return how many."""
    model = LanguageModel.objects.filter(name=model_name).first()
    ran = 0
    while model is not None and not stopping.is_set() and (line := batch_line_claim(model=model)) is not None:
        ran += batch_line_run(line=line)
    return ran


_claim_lock = threading.Lock()  # the slot count below is per worker, so only this process's threads race on it
# The request ids of the lines this process's lanes hold, from before their claim until batch_line_run is done with
# them. A line the database says this worker runs and no lane holds was orphaned (the reply to its claim was lost, or
# its result could not be written): the reaper puts it back, as it does a dead worker's lines.
_held: set[str] = set()


def batch_line_claim(*, model: LanguageModel) -> BatchLine | None:
    """Take the oldest waiting line for the model of a batch in progress whose key is not past its rate limit,
    unless this worker already runs `batch_slots` of the model's lines."""
    with _claim_lock:
        running = BatchLine.objects.filter(model=model.name, status=Line.RUNNING, worker=WORKER_ID).count()
        if running >= batch_slots(model):
            return None
        # Not the lines of a batch still `validating` (some may be missing) or cancelling.
        waiting = BatchLine.objects.filter(
            model=model.name, status=Line.PENDING, batch__status=Batch.Status.IN_PROGRESS
        )
        throttled: set[str] = set()
        while True:
            candidates = waiting.exclude(batch__api_key_prefix__in=throttled) if throttled else waiting
            order = ("batch__created", "batch_id", "index")
            row = candidates.order_by(*order).values_list("pk", "batch__api_key_prefix").first()
            if row is None:
                return None
            pk, prefix = row
            if prefix and get_redis().exists(THROTTLED_KEY.format(prefix)):
                throttled.add(prefix)  # the next key's lines go first, this one's wait for its next minute
                continue
            # Conditional: another worker may take the same line between the two queries. On the line's own row,
            # not through `waiting`: an UPDATE filtered across a join is `WHERE id IN (SELECT ...)`, whose subquery
            # PostgreSQL does not re-check after waiting on the row's lock, so two workers could both take it.
            request_id = uuid.uuid4().hex
            _held.add(request_id)
            try:
                claimed = BatchLine.objects.filter(pk=pk, status=Line.PENDING).update(
                    status=Line.RUNNING, worker=WORKER_ID, request_id=request_id, attempts=F("attempts") + 1
                )
                if claimed:
                    return BatchLine.objects.select_related("batch").get(pk=pk, request_id=request_id)
            except BaseException:
                _held.discard(request_id)
                raise
            _held.discard(request_id)


def batch_line_run(*, line: BatchLine) -> bool:
    """Run one claimed line through its endpoint's generation path, as its batch's key, and record its result line;
    a line whose key is past its rate limit goes back to wait for the key's next minute. Whether it ran."""
    try:
        return _line_run(line)
    finally:
        _held.discard(line.request_id)


def _line_run(line: BatchLine) -> bool:
    batch = line.batch
    status, output = Line.FAILED, ""
    try:
        try:  # refused before a request row was written: log it here, as the endpoint would have
            api_key = _owner_key(batch)
            if api_key is not None and not _admitted(api_key):
                status = Line.PENDING
            else:
                with batch.input_file.open() as f:
                    f.seek(line.offset)
                    body = _parse(batch.endpoint, json.loads(f.readline(settings.MAX_BODY_BYTES + 1))["body"])
                embedding = isinstance(body, CreateEmbeddingRequest)
                # On this thread; an embedding line's inputs share the engine's batches with any other request's.
                run, neutral = ((embedding_run_inline, body.to_embedding()) if embedding
                                else (request_run_inline, body.to_generation()))  # fmt: skip
                try:
                    log = run(request_id=line.request_id, endpoint=batch.endpoint, body=neutral, batch_id=batch.id,
                              api_key=api_key)  # fmt: skip
                except RateLimited as exc:  # its tokens do not fit what is left of the key's minute
                    _throttle(api_key, exc)
                    status = Line.PENDING
        except MinervaError as exc:
            RequestLog.objects.bulk_create([_refused_log(batch, line, exc)])
            raise
        if status == Line.PENDING:
            pass
        elif log.status == RequestLog.Status.CANCELLED:
            status = Line.CANCELLED
        else:  # the stream holds its `done` or `error` events by now
            collect = collect_embeddings if embedding else collect_answer
            output = _result(line, 200, async_to_sync(collect)(line.request_id, body))
            status = Line.COMPLETED
    except MinervaError as exc:
        if exc.code in RETRY_CODES:
            status = Line.PENDING
        else:
            output = _result(line, exc.status, exc.to_dict())
    except Exception:
        logger.exception("batch %s line %s failed", batch.id, line.index)
        output = _result(line, 500, ServerError().to_dict())
    fields = {"status": status, "output": output}
    if status == Line.PENDING:  # not run, or stopped by a shutdown: neither is a death of its worker
        fields.update(worker="", request_id="", attempts=F("attempts") - 1)
    # Only the attempt that still holds the line records it: a reaped attempt's late result is dropped.
    BatchLine.objects.filter(pk=line.pk, status=Line.RUNNING, request_id=line.request_id).update(**fields)
    if not batch.lines.filter(status__in=[Line.PENDING, Line.RUNNING]).exists():
        batch_finalize(batch_id=batch.id)
    return status != Line.PENDING


def _owner_key(batch: Batch) -> ApiKey | None:
    """The key a batch's lines run as (None for a batch made without one); its lines fail once it is gone."""
    if not batch.api_key_prefix:
        return None
    key = ApiKey.objects.filter(prefix=batch.api_key_prefix).first()
    if key is None or not key.active:
        raise InvalidApiKey("The API key that created this batch was revoked, has expired or was deleted.")
    return key


def _admitted(api_key: ApiKey) -> bool:
    """Count a line as one of the key's requests this minute, as its interactive requests are; past the key's rpm
    or tpm, mark the key throttled until the minute ends (its lines wait, the batch is not refused). A line also
    reserves its tokens in request_run_inline, as an interactive request does at admission."""
    try:
        rate_limit_check(key=api_key)
    except RateLimited as exc:
        _throttle(api_key, exc)
        return False
    return True


def _throttle(api_key: ApiKey, exc: RateLimited) -> None:
    """Hold the key's lines until its minute ends (the reaper restarts their lanes)."""
    seconds = int(exc.headers.get("Retry-After", 1))
    get_redis().set(THROTTLED_KEY.format(api_key.prefix), "1", ex=max(1, seconds))


def batch_cancel(*, batch: Batch) -> Batch:
    """Cancel a batch: its waiting lines at once, its running ones through their requests' cancel flags."""
    if batch.status in (Batch.Status.CANCELLING, Batch.Status.CANCELLED):
        return batch
    with transaction.atomic():
        if not Batch.objects.filter(pk=batch.pk, status=Batch.Status.IN_PROGRESS).update(
            status=Batch.Status.CANCELLING, cancelling_at=timezone.now()
        ):
            batch.refresh_from_db()
            raise InvalidRequest(f"Cannot cancel a batch that is {batch.status}.", param="batch_id")
        batch.lines.filter(status=Line.PENDING).update(status=Line.CANCELLED)
    # After the commit: a line claimed before it is running now and is seen here; none can be claimed after.
    running = list(batch.lines.filter(status=Line.RUNNING).values_list("request_id", flat=True))
    if running:
        pipe = get_redis().pipeline(transaction=False)
        for request_id in running:
            pipe.set(TokenStream(request_id).cancel_key, "1", ex=settings.STREAM_TTL)
        pipe.execute()
    else:
        batch_finalize(batch_id=batch.id)
    batch.refresh_from_db()
    return batch


def batch_finalize(*, batch_id: str, taking_over: str = "") -> None:
    """Write the result files of a batch with no line left to run and give it its final status. Claimed by a
    conditional update, so one caller writes them; `taking_over` names a dead finalizer the reaper replaces."""
    claimed = Batch.objects.filter(
        pk=batch_id, finalizer=taking_over,
        status__in=[Batch.Status.IN_PROGRESS, Batch.Status.FINALIZING, Batch.Status.CANCELLING],
    ).update(finalizer=WORKER_ID)  # fmt: skip
    if not claimed:
        return
    now = timezone.now()
    Batch.objects.filter(pk=batch_id, status=Batch.Status.IN_PROGRESS).update(
        status=Batch.Status.FINALIZING, finalizing_at=now
    )
    batch = Batch.objects.get(pk=batch_id)
    lines = batch.lines.order_by("index")
    temps = {"output": _temp_path(".output-"), "error": _temp_path(".error-")}
    try:
        with temps["output"].open("w", encoding="utf-8") as out, temps["error"].open("w", encoding="utf-8") as err:
            for line in lines.only("custom_id", "status", "output").iterator(chunk_size=1000):
                if line.status == Line.COMPLETED:
                    out.write(line.output + "\n")
                else:
                    err.write((line.output or _not_run(line)) + "\n")
        with transaction.atomic():
            batch.output_file = _keep(temps["output"], f"{batch.id}_output.jsonl", batch.api_key_prefix)
            batch.error_file = _keep(temps["error"], f"{batch.id}_error.jsonl", batch.api_key_prefix)
            if batch.cancelling_at:
                batch.status, batch.cancelled_at = Batch.Status.CANCELLED, now
            elif lines.filter(status=Line.EXPIRED).exists():
                batch.status, batch.expired_at = Batch.Status.EXPIRED, now
            else:
                batch.status, batch.completed_at = Batch.Status.COMPLETED, now
            batch.finalizer = ""
            batch.save()
            lines.update(output="")  # the files hold the results now
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def _keep(temp, filename: str, api_key_prefix: str) -> File | None:
    """A result file, which belongs to the batch's owner."""
    size = temp.stat().st_size
    if not size:
        return None
    file = File.objects.create(filename=filename, purpose=File.Purpose.BATCH_OUTPUT, bytes=size,
                               api_key_prefix=api_key_prefix)  # fmt: skip
    with LocalFile(temp) as content:
        files_storage().save(file.id, content)
    return file


def batches_reap() -> None:
    """Run by every worker every few seconds: lines whose worker died wait again (or, the second time, fail as
    worker_lost), overdue batches expire, batches with nothing left to run are finalized, half-created batches
    whose creator died are removed, and models with waiting lines but no lane get new lanes."""
    for worker in set(BatchLine.objects.filter(status=Line.RUNNING).values_list("worker", flat=True)):
        if not worker_alive(worker):
            lost = BatchLine.objects.filter(status=Line.RUNNING, worker=worker)
            logger.warning("requeueing %d batch line(s) of worker %s, which is gone", lost.count(), worker)
            _requeue(lost)
    with _claim_lock:  # no claim between reading _held and the update
        orphans = BatchLine.objects.filter(status=Line.RUNNING, worker=WORKER_ID).exclude(request_id__in=list(_held))
        if orphans.exists():
            logger.warning("requeueing %d batch line(s) that this worker lost track of", orphans.count())
            _requeue(orphans)
    abandoned = timezone.now() - timedelta(seconds=CREATING_TTL_SECONDS)
    for batch_id in Batch.objects.filter(status=Batch.Status.VALIDATING, created__lt=abandoned).values_list(
        "id", flat=True
    ):
        if not get_redis().exists(CREATING_KEY.format(batch_id)):
            logger.warning("removing batch %s, whose creation was interrupted", batch_id)
            _batch_discard(batch_id=batch_id, errors=[_interrupted("The server stopped while recording the batch.")])
    overdue = Batch.objects.filter(status=Batch.Status.IN_PROGRESS, expires_at__lt=timezone.now())
    # By the lines' own column, not across the join (see batch_line_claim): a line claimed meanwhile stays claimed.
    BatchLine.objects.filter(batch_id__in=list(overdue.values_list("pk", flat=True)), status=Line.PENDING).update(
        status=Line.EXPIRED
    )
    active = Batch.objects.filter(status__in=[Batch.Status.IN_PROGRESS, Batch.Status.FINALIZING,
                                              Batch.Status.CANCELLING])  # fmt: skip
    for batch_id, finalizer in active.values_list("id", "finalizer"):
        if finalizer and worker_alive(finalizer):
            continue
        if not BatchLine.objects.filter(batch_id=batch_id, status__in=[Line.PENDING, Line.RUNNING]).exists():
            batch_finalize(batch_id=batch_id, taking_over=finalizer)
    pending = BatchLine.objects.filter(status=Line.PENDING, batch__status=Batch.Status.IN_PROGRESS)
    waiting = set(pending.values_list("model", flat=True))
    running = set(BatchLine.objects.filter(status=Line.RUNNING).values_list("model", flat=True))
    for model in LanguageModel.objects.filter(name__in=waiting - running):
        if not get_redis().llen(model.queue):  # lanes already queued there will get to it
            batch_lanes_start(models=[model.name])


def _requeue(lost) -> None:
    """Put running lines no worker runs any more back to wait. A line that was running each time its worker died
    (or lost it) may be what kills it: no third try, it fails as worker_lost."""
    for line in lost.filter(attempts__gte=MAX_ATTEMPTS).only("pk", "custom_id", "request_id"):
        logger.error("batch line %s failed: its worker died under it %d times", line.pk, MAX_ATTEMPTS)
        output = _result(line, WorkerLost.status, _worker_lost().to_dict())
        lost.filter(pk=line.pk, request_id=line.request_id).update(status=Line.FAILED, output=output)
    lost.update(status=Line.PENDING, worker="", request_id="")


def _worker_lost() -> WorkerLost:
    error = WorkerLost()
    error.message = f"The worker running this request stopped unexpectedly {MAX_ATTEMPTS} times; it is not retried."
    return error


def batch_get(batch_id: str, *, api_key: ApiKey | None, operator: bool = False) -> Batch:
    """The batch with that id if `api_key` may see it (an operator sees every batch), or a 404."""
    batches = Batch.objects.all() if operator else owned(Batch.objects.all(), api_key=api_key)
    batch = batches.filter(pk=batch_id).first()
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


def batch_counts(batch: Batch) -> dict:
    """request_counts, counted from the lines (cancelled and expired lines are neither completed nor failed)."""
    return batch.lines.aggregate(
        total=Count("id"),
        completed=Count("id", filter=Q(status=Line.COMPLETED)),
        failed=Count("id", filter=Q(status=Line.FAILED)),
    )


def batch_object(batch: Batch) -> dict:
    """The OpenAI Batch object."""

    def at(moment):
        return int(moment.timestamp()) if moment else None

    tokens = RequestLog.objects.filter(batch_id=batch.id, status=RequestLog.Status.COMPLETED).aggregate(
        input=Sum("prompt_tokens", default=0), output=Sum("completion_tokens", default=0),
        cached=Sum("cached_tokens", default=0),
    )  # fmt: skip
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model or None,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": at(batch.created),
        "in_progress_at": at(batch.in_progress_at),
        "expires_at": at(batch.expires_at),
        "finalizing_at": at(batch.finalizing_at),
        "completed_at": at(batch.completed_at),
        "failed_at": at(batch.failed_at),
        "expired_at": at(batch.expired_at),
        "cancelling_at": at(batch.cancelling_at),
        "cancelled_at": at(batch.cancelled_at),
        "request_counts": batch_counts(batch),
        "metadata": batch.metadata,
        "usage": {
            "input_tokens": tokens["input"],
            "input_tokens_details": {"cached_tokens": tokens["cached"]},
            "output_tokens": tokens["output"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens["input"] + tokens["output"],
        },
    }
