import uuid

from django.db import models

from core.fields import NulFreeCharField


def _file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def _batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


class File(models.Model):
    """An uploaded file (or a batch's results): the row describes it, the bytes live in the files storage under its
    id (batches/storage.py: FILES_DIR on this host's disk, or the database, which every host of a cluster reaches)."""

    class Purpose(models.TextChoices):
        BATCH = "batch"
        BATCH_OUTPUT = "batch_output"
        USER_DATA = "user_data"

    id = models.CharField(max_length=40, primary_key=True, default=_file_id, editable=False)
    filename = models.CharField(max_length=255)  # Django drops non-printable characters from upload names
    purpose = models.CharField(max_length=16, choices=Purpose.choices, db_index=True)
    bytes = models.BigIntegerField(default=0)
    # The owner: the key that uploaded it, or whose batch wrote it; empty for what was made without a key. A prefix,
    # not a foreign key, so a deleted key's files stay its own (seen by staff only) instead of falling to "no key".
    api_key_prefix = models.CharField("API key", max_length=16, blank=True, db_index=True)
    created = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.id} {self.filename}"

    def open(self):
        """Its bytes, for reading (seekable)."""
        from .storage import files_storage

        return files_storage().open(self.id, "rb")


class Batch(models.Model):
    """A file of requests run in the background, below interactive traffic. Its lines are BatchLine rows."""

    class Status(models.TextChoices):
        VALIDATING = "validating"
        FAILED = "failed"
        IN_PROGRESS = "in_progress"
        FINALIZING = "finalizing"
        COMPLETED = "completed"
        EXPIRED = "expired"
        CANCELLING = "cancelling"
        CANCELLED = "cancelled"

    ACTIVE = (Status.VALIDATING, Status.IN_PROGRESS, Status.FINALIZING, Status.CANCELLING)

    id = models.CharField(max_length=40, primary_key=True, default=_batch_id, editable=False)
    endpoint = models.CharField(max_length=64)
    # The ids outlive the files (a deleted file's id still shows), hence no database constraint.
    input_file = models.ForeignKey(File, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    completion_window = models.CharField(max_length=8, default="24h")
    metadata = models.JSONField(null=True, blank=True)
    model = models.CharField(max_length=255, blank=True, help_text="The first line's model")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.VALIDATING, db_index=True)
    errors = models.JSONField(null=True, blank=True, help_text="Why validation failed: [{code, message, line}]")
    output_file = models.ForeignKey(File, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                    related_name="+")  # fmt: skip
    error_file = models.ForeignKey(File, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                   related_name="+")  # fmt: skip
    finalizer = models.CharField(max_length=255, blank=True, help_text="The worker writing the result files")
    # The owner, as for File: its lines run under this key's model scope, rate limits and usage.
    api_key_prefix = models.CharField("API key", max_length=16, blank=True, db_index=True)
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        verbose_name_plural = "batches"

    def __str__(self) -> str:
        return f"{self.id} {self.status}"


class BatchLine(models.Model):
    """One request of a batch: where it sits in the input file, who runs it, and its result line.

    `request_id` names the current attempt; a worker records a result only if the line still carries the id it
    claimed it with, so an attempt that was given up on (its worker looked dead) can never write a second result."""

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"
        EXPIRED = "expired"

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    index = models.PositiveIntegerField(help_text="Line number in the input file, from 1")
    offset = models.BigIntegerField(help_text="Byte offset of the line in the input file")
    custom_id = models.CharField(max_length=512)
    model = NulFreeCharField(max_length=255, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    worker = models.CharField(max_length=255, blank=True, help_text="host:pid of the worker running it")
    request_id = models.CharField(max_length=64, blank=True, help_text="The RequestLog row of the current attempt")
    output = models.TextField(blank=True, help_text="The line for the output or error file, once it ran")
    attempts = models.PositiveSmallIntegerField(default=0, help_text="How many times a worker took it")

    class Meta:
        ordering = ["batch", "index"]
        constraints = [models.UniqueConstraint(fields=["batch", "custom_id"], name="batch_line_unique_custom_id")]
        indexes = [models.Index(fields=["model", "status"]), models.Index(fields=["batch", "status"])]

    def __str__(self) -> str:
        return f"{self.batch_id} line {self.index} ({self.custom_id})"


class StoredChunk(models.Model):
    """A piece of a file kept in the database (MINERVA_FILES_STORAGE=database, batches/storage.py): every host of a
    cluster reads and writes the files there, with no shared disk."""

    name = models.CharField(max_length=255, db_index=True)
    index = models.PositiveIntegerField()
    data = models.BinaryField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["name", "index"], name="stored_chunk_name_index")]
