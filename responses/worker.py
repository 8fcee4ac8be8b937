"""What a Celery worker does for stored responses besides running them: a reaper every few seconds that ends the
responses whose worker died before it could (inference/worker.py ends their requests). Wired to Celery's worker
signals; inert elsewhere (tests call responses_reap() themselves)."""

import logging
import threading

from celery.signals import worker_ready, worker_shutting_down
from django.db import DatabaseError

from .services import responses_reap

logger = logging.getLogger(__name__)

REAP_EVERY_SECONDS = 10
_stopping = threading.Event()


@worker_ready.connect
def _start(**kwargs) -> None:
    threading.Thread(target=_reap, name="responses-reaper", daemon=True).start()


@worker_shutting_down.connect
def _stop(**kwargs) -> None:
    _stopping.set()


def _reap() -> None:
    while not _stopping.wait(REAP_EVERY_SECONDS):
        try:
            responses_reap()
        except DatabaseError:  # it comes back; so do we, at the next round
            logger.warning("response reaping failed", exc_info=True)
