from django.db import models

from core.fields import NulFreeCharField, NulFreeJSONField


class StoredResponse(models.Model):
    """A Responses API response kept with `store`: what it echoes, the conversation it was given (the previous
    response's items and output, then its own input) and its output. Its generation is the RequestLog row and Redis
    stream named `request_id`; whoever ends first (its view, its worker, a cancel) writes the outcome, once."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        IN_PROGRESS = "in_progress"
        COMPLETED = "completed"
        INCOMPLETE = "incomplete"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE = (Status.QUEUED, Status.IN_PROGRESS)

    id = models.CharField(max_length=40, primary_key=True, editable=False)  # resp_<request id>
    request_id = models.CharField(max_length=64, unique=True, help_text="The RequestLog row of its generation")
    # The owner, as for batches' files: the key's prefix, empty for what was made without a key.
    api_key_prefix = models.CharField("API key", max_length=16, blank=True, db_index=True)
    model = NulFreeCharField(max_length=255)
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    background = models.BooleanField(default=False)
    previous_response_id = models.CharField(max_length=40, blank=True)
    params = NulFreeJSONField(default=dict, help_text="What the response echoes: instructions, tools, text, ...")
    input_items = NulFreeJSONField(default=list, help_text="The conversation it was given, as input items")
    output = NulFreeJSONField(default=list)
    usage = NulFreeJSONField(null=True, blank=True)
    error = NulFreeJSONField(null=True, blank=True)
    incomplete_reason = models.CharField(max_length=32, blank=True)
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.id} {self.status}"
