from celery import shared_task

from . import worker  # noqa: F401  (connects the worker process's signals: heartbeat, reaper, recycling, drain)
from .run import request_run


@shared_task(name="minerva.run_request", ignore_result=True)
def run_request(log_id: int, payload: dict) -> None:
    """Run one generation request on this worker."""
    request_run(log_id=log_id, payload=payload)
