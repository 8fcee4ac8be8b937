from django.apps import AppConfig


class ModelsAppConfig(AppConfig):
    name = "models_app"
    verbose_name = "Model registry"

    def ready(self) -> None:
        # Register the pull task in every process: the request side queues it by name.
        from . import tasks  # noqa: F401
