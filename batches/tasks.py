from celery import shared_task

from . import worker  # noqa: F401  (connects the worker's signals: heartbeat, reaper, stop)
from .services import batch_lines_run


@shared_task(name="minerva.run_batch_lines", ignore_result=True)
def run_batch_lines(model_name: str) -> None:
    """A lane: run this model's waiting batch lines while this worker has a batch slot free."""
    batch_lines_run(model_name=model_name)
