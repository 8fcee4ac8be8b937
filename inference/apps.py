from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        # Register the Celery tasks (and the worker signals their module connects) in every process: the request
        # side queues them by name, so that it never imports the worker side.
        from . import tasks  # noqa: F401
