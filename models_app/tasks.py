"""The pull task: on its own queue (`minerva.pull`), so a download never waits behind, or holds up, a model's
requests."""

from celery import shared_task

from .pulls import pull_run


@shared_task(name="minerva.pull_model", ignore_result=True)
def pull_model(key: str, ref: str) -> None:
    """Pull `ref` from the Hub, publishing progress under `key` (a redelivered message resumes the download)."""
    pull_run(key=key, ref=ref)
