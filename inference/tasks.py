from celery import shared_task

from . import worker  # noqa: F401  (connects the worker process's signals: heartbeat, reaper, recycling, drain)
from .run import embedding_run, request_run, tokenize_run


@shared_task(name="minerva.run_request", ignore_result=True)
def run_request(log_id: int, payload: dict) -> None:
    """Run one generation request on this worker."""
    request_run(log_id=log_id, payload=payload)


@shared_task(name="minerva.run_embedding", ignore_result=True)
def run_embedding(log_id: int, payload: dict) -> None:
    """Embed one request's inputs on this worker (batched with whatever else is waiting)."""
    embedding_run(log_id=log_id, payload=payload)


@shared_task(name="minerva.run_tokenize", ignore_result=True)
def run_tokenize(log_id: int, payload: dict) -> None:
    """Tokenize, detokenize or count a chat prompt with a model's tokenizer on this worker."""
    tokenize_run(log_id=log_id, payload=payload)
