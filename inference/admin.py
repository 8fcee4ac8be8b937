import csv
import uuid

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from access.services import client_address
from core.errors import MinervaError
from models_app import admin as models_admin
from models_app.models import LanguageModel

from .cluster import cluster_get
from .models import RequestLog
from .serving import model_load

CSV_FIELDS = ["created", "request_id", "endpoint", "method", "model", "api_key_prefix", "client_ip", "user_agent",
              "retry_count", "stream", "status", "status_code", "prompt_tokens", "completion_tokens", "cached_tokens",
              "finish_reason", "ttft_ms", "latency_ms", "error_type", "error_code"]  # fmt: skip


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows that only the API, the workers and management commands change (the batches' admin uses it too)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(RequestLog)
class RequestLogAdmin(ReadOnlyAdmin):
    list_display = ["created", "request_id", "endpoint", "model", "api_key_prefix", "stream", "status", "status_code",
                    "prompt_tokens", "completion_tokens", "ttft_ms", "latency_ms", "error_code"]  # fmt: skip
    list_filter = [
        "model",
        "api_key_prefix",
        "status",
        "status_code",
        "endpoint",
        "stream",
        ("created", admin.DateFieldListFilter),
    ]
    search_fields = ["request_id"]
    date_hierarchy = "created"
    actions = ["export_csv"]

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl")
        if changelist is not None:  # totals for whatever the filters and date drill-down select
            rows = changelist.queryset.order_by()
            sums = {"requests": Count("id"), "prompt": Sum("prompt_tokens"), "completion": Sum("completion_tokens")}
            response.context_data["totals_by_model"] = rows.values("model").annotate(**sums).order_by("model")
            response.context_data["totals_by_key"] = (
                rows.values("api_key_prefix").annotate(**sums).order_by("api_key_prefix")
            )
        return response

    @admin.action(description="Export the selected rows as CSV")
    def export_csv(self, request, queryset):
        response = HttpResponse(content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="requests.csv"'
        writer = csv.writer(response)
        writer.writerow(CSV_FIELDS)
        for row in queryset.values_list(*CSV_FIELDS):
            writer.writerow(row)
        return response


class LanguageModelAdmin(models_admin.LanguageModelAdmin):
    """The registry's admin, with the actions that run on a worker: load and unload now (models_app cannot
    import inference, so they are added here, the way the API's POST /minerva/api/models/<name>/load does)."""

    actions = [*models_admin.LanguageModelAdmin.actions, "load_now", "unload_now"]

    @admin.action(description="Load the selected models now")
    def load_now(self, request, queryset):
        self._load(request, queryset, unload=False)

    @admin.action(description="Unload the selected models")
    def unload_now(self, request, queryset):
        self._load(request, queryset, unload=True)

    def _load(self, request, queryset, *, unload: bool) -> None:
        audit = {"client_ip": client_address(request.META), "user_agent": request.headers.get("User-Agent", "")[:255]}
        for model in queryset:
            try:
                done = async_to_sync(model_load)(
                    request_id=uuid.uuid4().hex,
                    endpoint=request.path,
                    name=model.name,
                    unload=unload,
                    api_key=None,
                    audit=audit,
                    on_queued=lambda: None,
                )
                self.message_user(request, f"{done}ed {model.name}")
            except MinervaError as exc:
                self.message_user(request, f"{model.name}: {exc.message}", level=messages.ERROR)


admin.site.unregister(LanguageModel)
admin.site.register(LanguageModel, LanguageModelAdmin)


def cluster_view(request: HttpRequest) -> TemplateResponse:
    """The cluster, read-only: each worker (host, models it has and holds loaded, slots, memory, backend) and each
    model's hosts and queue; the page refreshes itself every 5 s."""
    context = {**admin.site.each_context(request), "title": "Cluster", "cluster": cluster_get()}
    return TemplateResponse(request, "admin/inference/cluster.html", context)
