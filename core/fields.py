"""Columns for what clients send. PostgreSQL's text and jsonb cannot hold U+0000 (SQLite can): these drop it on the
way in, for every write (save, update, bulk_create), so a request with a NUL in its path, model or parameters is
logged the same on either database. Only columns where a dropped NUL loses nothing use them (the request log, a batch
line's model name); values a client gets back verbatim (a batch's custom_id and metadata) refuse NUL with a 400."""

from django.db import models


def strip_nul(value):
    """`value` with U+0000 removed from every string in it (JSON keys included)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {strip_nul(k): strip_nul(v) for k, v in value.items()}
    return value


class _NulFree:
    plain_path: str  # the Django field it stores like

    def get_prep_value(self, value):
        return super().get_prep_value(strip_nul(value))

    def deconstruct(self):  # the same column as the plain field: no migration
        name, _path, args, kwargs = super().deconstruct()
        return name, self.plain_path, args, kwargs


class NulFreeCharField(_NulFree, models.CharField):
    plain_path = "django.db.models.CharField"


class NulFreeJSONField(_NulFree, models.JSONField):
    plain_path = "django.db.models.JSONField"
