from django.db import models


class LanguageModel(models.Model):
    """A model file Minerva can serve; `name` is the id clients send as `model`."""

    name = models.CharField(max_length=255, unique=True, help_text="The API id, e.g. smollm2-135m-instruct")
    path = models.CharField(max_length=4096, help_text="Absolute path of the model file")
    format = models.CharField(max_length=16, default="gguf")
    metadata = models.JSONField(default=dict, blank=True, help_text="Read from the file's header")
    context_length = models.PositiveIntegerField(null=True, blank=True, help_text="Trained context length")
    available = models.BooleanField(default=True, help_text="The file was present at the last scan")
    enabled = models.BooleanField(default=True, help_text="Served by the API")
    n_ctx = models.PositiveIntegerField(null=True, blank=True, help_text="Context size; empty = MINERVA_N_CTX")
    n_gpu_layers = models.IntegerField(null=True, blank=True, help_text="Empty = MINERVA_N_GPU_LAYERS")
    n_parallel = models.PositiveIntegerField(null=True, blank=True, help_text="Slots; empty = MINERVA_PARALLEL")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        """The Celery queue whose workers serve this model."""
        return f"minerva.model.{self.name}"
