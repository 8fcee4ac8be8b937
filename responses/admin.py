from django.contrib import admin

from inference.admin import ReadOnlyAdmin

from .models import StoredResponse


@admin.register(StoredResponse)
class StoredResponseAdmin(ReadOnlyAdmin):
    list_display = ["id", "status", "model", "api_key_prefix", "background", "previous_response_id", "created",
                    "completed_at"]  # fmt: skip
    list_filter = ["status", "background", "model", ("created", admin.DateFieldListFilter)]
    search_fields = ["id", "request_id", "model", "api_key_prefix", "previous_response_id"]
    date_hierarchy = "created"
