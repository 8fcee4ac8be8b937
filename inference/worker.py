"""What a Celery worker process does besides running tasks: its heartbeat in the worker registry (core.workers:
views watch it to tell a dead worker from a slow one; it says which models this host serves), the models it
consumes (re-read from its models folder and the registry, so a new model needs no restart), putting back the
messages a dead worker held, a reaper for log rows whose worker died (on a thread of its own), recycling after N
requests or past a memory bound, and a bounded drain when it is asked to stop. Wired to Celery's worker signals;
inert elsewhere."""

import json
import logging
import os
import signal
import threading
import time
from datetime import timedelta

import llama_cpp
import psutil
from celery import current_app
from celery.signals import task_postrun, task_prerun, task_received, worker_ready, worker_shutting_down
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from redis.exceptions import RedisError

from core.redis import get_redis
from core.workers import WORKER_ID, worker_alive, worker_forget, worker_records
from models_app.models import LanguageModel
from models_app.pulls import PULL_QUEUE
from models_app.services import models_hosted

from . import run
from .models import RequestLog
from .services import request_worker_lost

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
MODELS_SYNC_SECONDS = 2.0  # how soon a new model file (or a model enabled in the admin) gets consumed
REAP_EVERY_SECONDS = 10
DRAIN_SECONDS = 3.0  # on SIGTERM, running requests get this long to finish before they are ended with an error
DEFAULT_QUEUE = "minerva.default"  # consumed by a worker with no model, so Celery has a queue

_stop = threading.Event()
_beat_now = threading.Event()  # a task was received: the heartbeat announces it without waiting out its second
_tasks_done = 0
_recycling = False  # a recycle lets running requests finish; a stop asked from outside is bounded
_held: dict[str, str] = {}  # task id -> its message's delivery tag, from receipt until the task ends
_running: set[str] = set()  # task ids running now


@worker_ready.connect
def _start(sender, **kwargs) -> None:
    # Threads of their own: the reaper and the model sync wait on the database (a 20 s busy timeout when SQLite is
    # locked), and a heartbeat that waited with them would expire, making this live worker look dead to every view.
    consumer = sender
    run.worker_state.update({
        "celery": consumer.hostname, "started": time.time(),
        "backend": "gpu" if llama_cpp.llama_supports_gpu_offload() else "cpu",
        "queues": sorted(consumer.app.amqp.queues.consume_from),
        "slots": {"total": consumer.controller.concurrency, "busy": 0},
    })  # fmt: skip
    _sync_models(consumer)  # announce what this host serves before the first beat
    preload = _preload_names()
    run.worker_state["preloading"] = preload  # /ready waits for them
    threading.Thread(target=_preload, args=(preload,), name="preload", daemon=True).start()
    threading.Thread(target=_beat, name="heartbeat", daemon=True).start()
    threading.Thread(target=_models, args=(consumer,), name="models", daemon=True).start()
    threading.Thread(target=_restore, name="restore", daemon=True).start()
    threading.Thread(target=_reap, name="request-reaper", daemon=True).start()


def _preload_names() -> list[str]:
    """The models this worker loads as it starts: MINERVA_PRELOAD's and those marked "preload", if their files
    are on this host."""
    try:
        marked = set(LanguageModel.objects.filter(preload=True, enabled=True).values_list("name", flat=True))
    except DatabaseError:
        logger.warning("cannot read which models to preload", exc_info=True)
        marked = set()
    return sorted((set(settings.PRELOAD) | marked) & set(run.hosted))


def _preload(names: list[str]) -> None:
    """Load them, one after another, kept loaded for good (a load that fails is logged; requests load it later)."""
    for name in names:
        try:
            run.model_preload(name)
        except Exception:
            logger.exception("preloading %s failed", name)
        finally:
            run.worker_state["preloading"] = [n for n in run.worker_state["preloading"] if n != name]


@task_received.connect
def _received(request, **kwargs) -> None:
    _held[request.id] = request.message.delivery_tag
    run.worker_state["held"] = list(_held.values())
    # At once, not at the next beat (if this host dies in between, a survivor must know to put it back), but from the
    # heartbeat thread: written here, the record delayed the task itself (~0.4 ms of each first token).
    _beat_now.set()


@task_prerun.connect
def _prerun(task_id, **kwargs) -> None:
    _running.add(task_id)


def _beat() -> None:
    """Announce this worker every second: Redis only, never the database nor the model cache's lock."""
    while not _stop.is_set():
        _beat_now.clear()  # before the record is read: a task received from here on gets a beat of its own
        run.worker_state["slots"]["busy"] = len(_running)
        run.worker_state["held"] = list(_held.values())
        run.worker_state["memory_rss"] = psutil.Process().memory_info().rss
        run.worker_state["loading"] = run.models_loading()
        try:
            run.worker_announce_now()
        except RedisError:  # Redis restarting: the views see us gone and say so; beat again once it is back
            logger.warning("heartbeat failed", exc_info=True)
        _beat_now.wait(HEARTBEAT_SECONDS)


def _models(consumer) -> None:
    while not _stop.wait(MODELS_SYNC_SECONDS):
        try:
            _sync_models(consumer)
        except (DatabaseError, RedisError, OSError):
            logger.warning("reading this host's models failed", exc_info=True)


def _sync_models(consumer) -> None:
    """Serve the models this host has now (MINERVA_WORKER_MODELS limits them): consume a new model's queue and
    stop consuming a removed or disabled one's, through Celery's add_consumer / cancel_consumer control commands
    (addressed to this worker; they run on its consumer's thread)."""
    allowed = os.environ.get("MINERVA_WORKER_MODELS", "")
    names = None if allowed in ("", "*") else set(allowed.split(","))
    run.hosted = models_hosted(names=names)
    wanted = ({LanguageModel(name=name).queue for name in run.hosted} or {DEFAULT_QUEUE}) | {PULL_QUEUE}
    consuming = set(consumer.app.amqp.queues.consume_from)
    control = current_app.control
    for queue in sorted(wanted - consuming):
        logger.info("consuming %s", queue)
        control.add_consumer(queue, destination=[consumer.hostname])
    for queue in sorted(consuming - wanted):
        logger.info("no longer consuming %s", queue)
        control.cancel_consumer(queue, destination=[consumer.hostname])
    run.worker_state["queues"] = sorted(wanted)


def _restore() -> None:
    while not _stop.wait(HEARTBEAT_SECONDS):
        try:
            workers_restore()
        except RedisError:
            logger.warning("restoring a dead worker's messages failed", exc_info=True)


def workers_restore() -> int:
    """Put back in their queues the messages that dead workers had taken and not acknowledged, and forget those
    workers. With acks late, kombu keeps such a message in its `unacked` hash and would restore it only after
    the visibility timeout (an hour); the dead worker's record names its messages' delivery tags, so they go
    back within a heartbeat timeout. A message whose task had already started comes back too, and is dropped by
    request_run's claim (its row is no longer queued); a batch lane is a wake-up, and the batch reaper requeues
    its line."""
    restored = 0
    dead = [record for record, alive in worker_records() if not alive and record["id"] != WORKER_ID]
    if not dead:
        return 0
    with current_app.connection_for_write() as connection:
        qos = connection.default_channel.qos
        for record in dead:
            for tag in record.get("held", []):
                qos.restore_by_tag(tag, leftmost=False)  # the queue's head: it was taken first
                restored += 1
            if worker_forget(record["id"]):
                logger.warning("worker %s is gone; put back the %d message(s) it held", record["id"],
                               len(record.get("held", [])))  # fmt: skip
    return restored


def _reap() -> None:
    while not _stop.is_set():
        try:
            requests_reap()
        except (DatabaseError, RedisError):
            logger.warning("reaping lost requests failed", exc_info=True)
        _stop.wait(REAP_EVERY_SECONDS)


def requests_reap() -> int:
    """Fail the log rows of requests whose worker died (nobody else will finish them): running on a worker
    without a heartbeat, or queued for so long that their message must be gone (Redis restarted)."""
    reaped = 0
    running = RequestLog.objects.filter(status=RequestLog.Status.RUNNING).values_list("request_id", "created")
    stale = timezone.now() - timedelta(seconds=settings.STREAM_TTL)
    for request_id, created in running:
        owner = _owner(request_id)
        if (owner is not None and not worker_alive(owner)) or (owner is None and created < stale):
            reaped += request_worker_lost(request_id=request_id, status_code=500)
    lost = timezone.now() - timedelta(seconds=2 * settings.REQUEST_TIMEOUT)
    reaped += RequestLog.objects.filter(status=RequestLog.Status.QUEUED, created__lt=lost).update(
        status=RequestLog.Status.FAILED, status_code=504, error_type="server_error", error_code="lost",
        finished=timezone.now(),
    )  # fmt: skip
    if reaped:
        logger.warning("reaped %d request(s) whose worker or queue message was lost", reaped)
    return reaped


def _owner(request_id: str) -> str | None:
    """The worker that accepted a request (its stream's `accepted` event), if the stream still exists."""
    for _id, fields in get_redis().xrange(f"minerva:request:{request_id}", count=2):
        if fields.get("event") == "accepted":
            return json.loads(fields["data"])["worker"]
    return None


@task_postrun.connect
def _recycle(task_id, **kwargs) -> None:
    """After MINERVA_WORKER_MAX_REQUESTS requests, or once its memory passes MINERVA_WORKER_MAX_RSS, the worker
    stops itself gracefully (running requests finish) and `serve` starts a fresh one. The threads pool has no
    --max-tasks-per-child, hence this."""
    global _tasks_done, _recycling
    _held.pop(task_id, None)
    _running.discard(task_id)
    _tasks_done += 1
    too_many = settings.WORKER_MAX_REQUESTS and _tasks_done >= settings.WORKER_MAX_REQUESTS
    rss = psutil.Process().memory_info().rss
    too_big = settings.WORKER_MAX_RSS and rss >= settings.WORKER_MAX_RSS
    if too_many or too_big:
        logger.warning("recycling this worker after %d requests at %d MiB", _tasks_done, rss // 2**20)
        _tasks_done, _recycling = -(10**9), True  # one recycle per process
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown; `serve` restarts the worker


@worker_shutting_down.connect
def _drain(**kwargs) -> None:
    """Give running requests DRAIN_SECONDS, then end the rest with a `server_shutting_down` error, so that
    Celery's warm shutdown (which waits for every task) is bounded and every client hears why."""

    def abort() -> None:
        time.sleep(DRAIN_SECONDS)
        run.shutting_down = True
        if run._cache is not None:
            run._cache.close()

    if not _recycling:
        threading.Thread(target=abort, name="drain", daemon=True).start()
