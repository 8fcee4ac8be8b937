from django.db import models

from core.fields import NulFreeCharField, NulFreeJSONField


class RequestLog(models.Model):
    """One row per API request: the audit log. Generation requests are also the unit of work a worker runs."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"

    request_id = models.CharField(max_length=64, unique=True, help_text="Sent back as x-request-id")
    endpoint = NulFreeCharField(max_length=255)
    method = models.CharField(max_length=8, default="POST")
    model = NulFreeCharField(max_length=255, blank=True, db_index=True)
    stream = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True, db_index=True)
    request = NulFreeJSONField(default=dict, blank=True, help_text="The validated request body")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0, help_text="Prompt tokens reused from the KV cache")
    finish_reason = models.CharField(max_length=32, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Time to first token, from arrival")
    latency_ms = models.FloatField(null=True, blank=True, help_text="Total time, from arrival")
    error_type = models.CharField(max_length=64, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    batch_id = models.CharField(max_length=40, blank=True, db_index=True, help_text="The batch this is a line of")
    # Who asked: never the key itself or an Authorization header, only the key's visible prefix.
    api_key_prefix = models.CharField("API key", max_length=16, blank=True, db_index=True)
    client_ip = NulFreeCharField(max_length=64, blank=True)
    user_agent = NulFreeCharField(max_length=255, blank=True)
    retry_count = models.PositiveSmallIntegerField(default=0, help_text="x-stainless-retry-count: SDK retries")
    prompt = NulFreeJSONField(null=True, blank=True, help_text="Messages or prompt, with MINERVA_LOG_CONTENT=1")
    completion = NulFreeJSONField(null=True, blank=True, help_text="Text per choice, with MINERVA_LOG_CONTENT=1")
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.request_id} {self.endpoint} {self.status}"
