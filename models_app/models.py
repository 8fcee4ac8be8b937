from django.core.exceptions import ValidationError
from django.db import models
from pydantic import ValidationError as PydanticValidationError

from core.generation import KEEP_ALIVE_RE, default_params_check


class LanguageModel(models.Model):
    """A model file (or SafeTensors folder) Minerva can serve; `name` is the id clients send as `model`."""

    name = models.CharField(max_length=255, unique=True, help_text="The API id, e.g. smollm2-135m-instruct")
    path = models.CharField(max_length=4096, help_text="The model file, first shard, or SafeTensors folder")
    format = models.CharField(max_length=16, default="gguf", db_index=True)
    quantization = models.CharField(max_length=32, blank=True, db_index=True, help_text="Q4_K_M, F16, BF16, ...")
    metadata = models.JSONField(default=dict, blank=True, help_text="Read from the file's header")
    context_length = models.PositiveIntegerField(null=True, blank=True, help_text="Trained context length")
    file_size = models.BigIntegerField(default=0, help_text="Bytes, all shards together")
    file_mtime = models.FloatField(default=0, help_text="When the file last changed (rescans compare it)")
    available = models.BooleanField(default=True, help_text="The file was present at the last scan")
    enabled = models.BooleanField(default=True, help_text="Served by the API")
    # Load options (empty = the MINERVA_* default)
    preload = models.BooleanField(default=False, help_text="Load it when a worker starts, and keep it loaded")
    n_ctx = models.PositiveIntegerField(null=True, blank=True, help_text="Context per request; empty = MINERVA_N_CTX")
    n_gpu_layers = models.IntegerField(null=True, blank=True, help_text="Empty = MINERVA_N_GPU_LAYERS")
    n_parallel = models.PositiveIntegerField(null=True, blank=True, help_text="Slots; empty = MINERVA_PARALLEL")
    keep_alive = models.CharField(max_length=16, blank=True, help_text="e.g. 10m, 1h, -1; empty = MINERVA_KEEP_ALIVE")
    chat_template_override = models.TextField(blank=True, help_text="A Jinja chat template replacing the file's")
    tool_format = models.CharField(
        max_length=16,
        blank=True,
        choices=[
            ("generic", "generic (JSON, any template)"),
            ("hermes", "hermes (<tool_call>)"),
            ("llama3", "llama3 (JSON, <|python_tag|>)"),
            ("mistral", "mistral ([TOOL_CALLS], Devstral)"),
            ("qwen3_coder", "qwen3_coder (<function=...>, Qwen3-Coder, Qwen3.5)"),
            ("glm", "glm (<arg_key>, GLM-4.5 - 4.7)"),
            ("minimax_m2", "minimax_m2 (<minimax:tool_call>)"),
            ("deepseek_v3_1", "deepseek_v3_1 (<｜tool▁calls▁begin｜>)"),
            ("deepseek_v3_2", "deepseek_v3_2 (DSML function_calls)"),
            ("deepseek_v4", "deepseek_v4 (DSML tool_calls)"),
            ("kimi_k2", "kimi_k2 (<|tool_calls_section_begin|>)"),
            ("harmony", "harmony (gpt-oss channels)"),
        ],
        help_text="How the model calls tools; empty = detected from the chat template",
    )
    draft_model = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="drafts_for",
        help_text="A small model with this one's tokenizer that drafts tokens for it to verify (speculative decoding, "
        "MINERVA_SPECULATIVE_DRAFT tokens a step, 8 if that is 0); empty = no draft model",
    )
    default_params = models.JSONField(
        default=dict, blank=True, help_text='Sampling defaults for requests that omit them, e.g. {"temperature": 0.2}'
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        try:
            default_params_check(self.default_params or {})
        except PydanticValidationError as exc:
            raise ValidationError({"default_params": str(exc.errors()[0]["msg"])}) from None
        except ValueError as exc:
            raise ValidationError({"default_params": str(exc)}) from None
        if self.draft_model_id is not None and self.draft_model_id == self.pk:
            raise ValidationError({"draft_model": "a model cannot draft for itself"})
        if self.draft_model is not None and self.draft_model.format != "gguf":
            raise ValidationError({"draft_model": "a draft model must be a GGUF file"})
        if self.draft_model is not None:  # the worker checks every token's text when it loads them (DraftModel)
            mine, theirs = (self.metadata or {}).get("vocab_size"), (self.draft_model.metadata or {}).get("vocab_size")
            if mine and theirs and mine != theirs:
                message = (f"{self.draft_model.name} has a vocabulary of {theirs} tokens, this model {mine}: "
                           "a draft model must share the model's tokenizer")  # fmt: skip
                raise ValidationError({"draft_model": message})
        if self.keep_alive and not KEEP_ALIVE_RE.fullmatch(self.keep_alive.strip()):
            raise ValidationError({"keep_alive": "seconds, or a duration like 10m or 1h; negative = forever"})

    @property
    def queue(self) -> str:
        """The Celery queue whose workers serve this model."""
        return f"minerva.model.{self.name}"


class ModelAlias(models.Model):
    """Another name clients may use for a model (e.g. `gpt-4o` for a local one)."""

    model = models.ForeignKey(LanguageModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=255, unique=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "aliases"

    def __str__(self) -> str:
        return self.name
