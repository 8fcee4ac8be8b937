"""What a Celery worker does for batches besides running lines: a reaper every few seconds (it relies on the
worker heartbeat of inference/worker.py to tell that another worker's lines are lost), and no new lines once the
worker is stopping. Wired to Celery's worker signals; inert elsewhere (tests call batches_reap() themselves)."""

import logging
import threading

from celery.signals import worker_ready, worker_shutting_down
from django.db import DatabaseError
from redis.exceptions import RedisError

from .services import batches_reap, stopping

logger = logging.getLogger(__name__)

REAP_EVERY_SECONDS = 5


@worker_ready.connect
def _start(**kwargs) -> None:
    threading.Thread(target=_reap, name="batch-reaper", daemon=True).start()


@worker_shutting_down.connect
def _stop(**kwargs) -> None:
    stopping.set()


def _reap() -> None:
    while not stopping.wait(REAP_EVERY_SECONDS):
        try:
            batches_reap()
        except (DatabaseError, RedisError):  # both come back; so do we, at the next round
            logger.warning("batch reaping failed", exc_info=True)
