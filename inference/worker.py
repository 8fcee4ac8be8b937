"""What a Celery worker process does besides running tasks: a heartbeat in Redis (views watch it to tell a dead
worker from a slow one), a reaper for log rows whose worker died (on a thread of its own), recycling after N
requests or past a memory bound, and a bounded drain when it is asked to stop. Wired to Celery's worker signals;
inert elsewhere."""

import json
import logging
import os
import signal
import threading
import time
from datetime import timedelta

import psutil
from celery.signals import task_postrun, worker_ready, worker_shutting_down
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from redis.exceptions import RedisError

from core.redis import get_redis

from . import run
from .heartbeat import WORKER_ID, WORKER_TTL_SECONDS, worker_alive, worker_key
from .models import RequestLog
from .services import request_worker_lost

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
REAP_EVERY_SECONDS = 10
DRAIN_SECONDS = 3.0  # on SIGTERM, running requests get this long to finish before they are ended with an error

_stop = threading.Event()
_tasks_done = 0
_recycling = False  # a recycle lets running requests finish; a stop asked from outside is bounded


@worker_ready.connect
def _start(**kwargs) -> None:
    # Two threads: the reaper waits on the database (a 20 s busy timeout when SQLite is locked), and a heartbeat
    # that waited with it would expire, making this live worker look dead to every view and batch reaper.
    threading.Thread(target=_beat, name="heartbeat", daemon=True).start()
    threading.Thread(target=_reap, name="request-reaper", daemon=True).start()


def _beat() -> None:
    """Refresh this worker's key every second; Redis only, never the database."""
    while not _stop.is_set():
        try:
            get_redis().set(worker_key(WORKER_ID), "1", ex=WORKER_TTL_SECONDS)
        except RedisError:  # Redis restarting: the views see us gone and say so; beat again once it is back
            logger.warning("heartbeat failed", exc_info=True)
        _stop.wait(HEARTBEAT_SECONDS)


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
def _recycle(**kwargs) -> None:
    """After MINERVA_WORKER_MAX_REQUESTS requests, or once its memory passes MINERVA_WORKER_MAX_RSS, the worker
    stops itself gracefully (running requests finish) and `serve` starts a fresh one. The threads pool has no
    --max-tasks-per-child, hence this."""
    global _tasks_done, _recycling
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
