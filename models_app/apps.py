from django.apps import AppConfig


class ModelsAppConfig(AppConfig):
    name = "models_app"
    verbose_name = "Model registry"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from . import tasks  # noqa: F401  (registers the pull task in every process: the request side queues it by name)
        from .models import LanguageModel, ModelAlias
        from .services import model_registry_changed

        # Each process keeps the model rows it looked up while the registry's version stands (selectors.model_get).
        for model in (LanguageModel, ModelAlias):
            for name, signal in (("save", post_save), ("delete", post_delete)):
                signal.connect(model_registry_changed, sender=model, dispatch_uid=f"registry-{name}-{model.__name__}")
