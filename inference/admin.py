from django.contrib import admin

from .models import RequestLog


@admin.register(RequestLog)
class RequestLogAdmin(admin.ModelAdmin):
    list_display = ["created", "request_id", "endpoint", "model", "stream", "status", "status_code",
                    "prompt_tokens", "completion_tokens", "ttft_ms", "latency_ms", "error_code"]  # fmt: skip
    list_filter = [
        "model",
        "status",
        "status_code",
        "endpoint",
        "stream",
        ("created", admin.DateFieldListFilter),
    ]
    search_fields = ["request_id"]
    date_hierarchy = "created"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
