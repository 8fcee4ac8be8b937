"""The pull task, on its own queue (`minerva.pull`), consumed by the worker `serve` starts. The task only starts the
pull on a thread of its own and returns: a worker's task threads are its models' slots (they serve every queue it
consumes), and a download of minutes must not hold one."""

import logging
import threading

from celery import shared_task
from django.db import connections

from .pulls import pull_run

logger = logging.getLogger(__name__)

PULLS_AT_ONCE = 2  # per worker process; more wait for a turn (their lock says "queued" meanwhile)
_turns = threading.BoundedSemaphore(PULLS_AT_ONCE)


@shared_task(name="minerva.pull_model", ignore_result=True, bind=True)
def pull_model(self, key: str, ref: str) -> None:
    """Pull `ref` from the Hub, publishing progress under `key`, on a thread of its own (inline when eager)."""
    if self.request.is_eager:
        pull_run(key=key, ref=ref)
        return
    threading.Thread(target=_pull, args=(key, ref), name=f"pull:{ref}"[:60], daemon=True).start()


def _pull(key: str, ref: str) -> None:
    with _turns:
        try:
            pull_run(key=key, ref=ref)
        finally:
            connections.close_all()  # this thread's own connections
