from django.db import models


class RequestLog(models.Model):
    """One row per API request: the audit log. Generation requests are also the unit of work a worker runs."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"

    request_id = models.CharField(max_length=64, unique=True, help_text="Sent back as x-request-id")
    endpoint = models.CharField(max_length=255)
    method = models.CharField(max_length=8, default="POST")
    model = models.CharField(max_length=255, blank=True, db_index=True)
    stream = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True, db_index=True)
    request = models.JSONField(default=dict, blank=True, help_text="The validated request body")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0, help_text="Prompt tokens reused from the KV cache")
    finish_reason = models.CharField(max_length=32, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Time to first token, from arrival")
    latency_ms = models.FloatField(null=True, blank=True, help_text="Total time, from arrival")
    error_type = models.CharField(max_length=64, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.request_id} {self.endpoint} {self.status}"
