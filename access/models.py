from django.db import models as fields
from django.utils import timezone


class ApiKey(fields.Model):
    """A bearer key. Only its SHA-256 and a short visible prefix are stored; the key itself is shown once."""

    name = fields.CharField(max_length=100)
    prefix = fields.CharField(max_length=16, unique=True, help_text="The key's first characters, to recognise it")
    hashed = fields.CharField(max_length=64, unique=True, editable=False)
    models = fields.JSONField(default=list, blank=True, help_text="Model names this key may use; empty: all")
    rpm = fields.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty: unlimited")
    tpm = fields.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute; empty: unlimited")
    staff = fields.BooleanField(default=False, help_text="May read the request history API (/api/...)")
    expires = fields.DateTimeField(null=True, blank=True)
    revoked = fields.DateTimeField(null=True, blank=True)
    created = fields.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def active(self) -> bool:
        now = timezone.now()
        return self.revoked is None and (self.expires is None or self.expires > now)

    def allows(self, model_name: str) -> bool:
        return not self.models or model_name in self.models
