from celery import shared_task

from .services import request_run


@shared_task(name="minerva.run_request", ignore_result=True)
def run_request(log_id: int, payload: dict) -> None:
    """Run one generation request on this worker."""
    request_run(log_id=log_id, payload=payload)
