from django.apps import AppConfig


class ResponsesConfig(AppConfig):
    name = "responses"
    verbose_name = "Stored responses"

    def ready(self) -> None:
        # Register the Celery task (and the worker signals its module connects) in every process: the request side
        # queues it by name. Stored responses are pruned with the request log they belong to.
        from inference.services import logs_pruned

        from . import tasks  # noqa: F401
        from .services import responses_prune

        logs_pruned.connect(responses_prune, dispatch_uid="responses_prune")
