from django.apps import AppConfig


class BatchesConfig(AppConfig):
    name = "batches"
    verbose_name = "Files and batches"

    def ready(self) -> None:
        # Register the Celery tasks (and the worker signals their module connects) in every process: the request
        # side queues them by name, so that it never imports the worker side.
        from . import tasks  # noqa: F401
