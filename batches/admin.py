from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html

from core.errors import MinervaError
from inference.admin import ReadOnlyAdmin

from .models import Batch, File
from .services import batch_cancel, batch_counts
from .views import file_download


def _file_link(file_id: str | None):
    if not file_id:
        return "-"
    # The admin's own download (a staff login), not /v1/files/ (which wants an API key once keys are on)
    return format_html('<a href="{}">{}</a>', reverse("admin:batches_file_content", args=[file_id]), file_id)


@admin.register(Batch)
class BatchAdmin(ReadOnlyAdmin):
    list_display = ["id", "status", "progress", "model", "endpoint", "api_key_prefix", "created", "completed_at",
                    "input", "output", "errors_file"]  # fmt: skip
    list_filter = ["status", "endpoint", "model", ("created", admin.DateFieldListFilter)]
    search_fields = ["id", "model", "api_key_prefix"]
    date_hierarchy = "created"
    actions = ["cancel"]

    @admin.display(description="done / failed / total")
    def progress(self, batch: Batch) -> str:
        counts = batch_counts(batch)
        return f"{counts['completed']} / {counts['failed']} / {counts['total']}"

    @admin.display(description="input file")
    def input(self, batch: Batch):
        return _file_link(batch.input_file_id)

    @admin.display(description="output file")
    def output(self, batch: Batch):
        return _file_link(batch.output_file_id)

    @admin.display(description="error file")
    def errors_file(self, batch: Batch):
        return _file_link(batch.error_file_id)

    @admin.action(description="Cancel the selected batches")
    def cancel(self, request, queryset):
        for batch in queryset:
            try:
                batch_cancel(batch=batch)
            except MinervaError as exc:
                self.message_user(request, f"{batch.id}: {exc.message}", messages.WARNING)
        self.message_user(request, "Cancelling: waiting lines stop now, running ones within a few tokens.")


@admin.register(File)
class FileAdmin(ReadOnlyAdmin):
    list_display = ["id", "filename", "purpose", "bytes", "api_key_prefix", "created", "download"]
    list_filter = ["purpose", ("created", admin.DateFieldListFilter)]
    search_fields = ["id", "filename", "api_key_prefix"]

    @admin.display(description="content")
    def download(self, file: File):
        return _file_link(file.id)

    def get_urls(self):
        content = path("<str:file_id>/content/", self.admin_site.admin_view(self.content),
                       name="batches_file_content")  # fmt: skip
        return [content, *super().get_urls()]

    def content(self, request, file_id: str):
        if not self.has_view_permission(request):
            raise PermissionDenied
        return file_download(get_object_or_404(File, pk=file_id))
