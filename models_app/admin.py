from django.contrib import admin, messages
from django.http import Http404
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from .hub import HubError
from .models import LanguageModel, ModelAlias
from .pulls import pull_start, pull_state
from .services import RegistryError, model_is_pulled, model_refresh_metadata, models_scan, models_set_enabled

LOAD_OPTIONS = [
    "preload",
    "n_ctx",
    "n_gpu_layers",
    "n_parallel",
    "keep_alive",
    "default_params",
    "chat_template_override",
    "tool_format",
    "draft_model",
]


class ModelAliasInline(admin.TabularInline):
    model = ModelAlias
    extra = 1


@admin.register(LanguageModel)
class LanguageModelAdmin(admin.ModelAdmin):
    list_display = ["name", "format", "quantization", "parameters", "context_length", "size", "enabled", "available"]
    list_filter = ["format", "quantization", "enabled", "available"]
    search_fields = ["name", "path", "aliases__name"]
    inlines = [ModelAliasInline]
    readonly_fields = [
        "path", "format", "quantization", "context_length", "file_size", "available", "metadata_panel", "created",
        "updated",
    ]  # fmt: skip
    fieldsets = [
        (None, {"fields": ["name", "enabled", "available", "path", "format", "quantization", "context_length"]}),
        ("Load options", {"fields": LOAD_OPTIONS}),
        ("Metadata", {"fields": ["metadata_panel", "file_size", "created", "updated"]}),
    ]
    actions = ["rescan", "refresh_metadata", "enable", "disable", "pull_again"]

    @admin.display(description="parameters")
    def parameters(self, obj: LanguageModel) -> str:
        count = obj.metadata.get("parameter_count") or 0
        return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"

    @admin.display(description="size", ordering="file_size")
    def size(self, obj: LanguageModel) -> str:
        return f"{obj.file_size / 2**30:.2f} GiB"

    @admin.display(description="metadata")
    def metadata_panel(self, obj: LanguageModel) -> str:
        rows = [(key, value) for key, value in obj.metadata.items() if key != "files"]
        return format_html("<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows))

    @admin.action(description="Rescan the models folder")
    def rescan(self, request, queryset):
        result = models_scan()
        self.message_user(
            request,
            f"added {len(result.added)}, changed {len(result.changed)}, unavailable {len(result.unavailable)}, "
            f"skipped {len(result.errors)}",
        )

    @admin.action(description="Refresh metadata from the files")
    def refresh_metadata(self, request, queryset):
        for model in queryset:
            try:
                model_refresh_metadata(model=model)
            except RegistryError as exc:
                self.message_user(request, f"{model.name}: {exc}", level=messages.ERROR)

    @admin.action(description="Enable selected models")
    def enable(self, request, queryset):
        models_set_enabled(names=[m.name for m in queryset], enabled=True)

    @admin.action(description="Disable selected models")
    def disable(self, request, queryset):
        models_set_enabled(names=[m.name for m in queryset], enabled=False)

    @admin.action(description="Pull selected pulled models again (new files on the Hub, or an interrupted pull)")
    def pull_again(self, request, queryset):
        for model in queryset:
            if not model_is_pulled(model):
                self.message_user(request, f"{model.name} was not pulled", level=messages.WARNING)
                continue
            key = pull_start(ref=model.name.removeprefix("hf.co/"))
            url = reverse("admin:models_app_languagemodel_pull_progress", args=[key])
            self.message_user(request, format_html('Pulling {}: <a href="{}">progress</a>', model.name, url))

    def get_urls(self):
        return [
            path("pull/", self.admin_site.admin_view(self.pull_view), name="models_app_languagemodel_pull"),
            path("pull/<str:key>/", self.admin_site.admin_view(self.pull_progress_view),
                 name="models_app_languagemodel_pull_progress"),
            *super().get_urls(),
        ]  # fmt: skip

    def pull_view(self, request):
        """A form for `owner/repo:QUANT`; the pull runs on the workers' pull queue, this page only starts it."""
        if request.method == "POST":
            try:
                key = pull_start(ref=request.POST.get("ref", ""))
            except HubError as exc:
                self.message_user(request, exc.message, level=messages.ERROR)
            else:
                return redirect("admin:models_app_languagemodel_pull_progress", key=key)
        return self._pull_page(request, state=None)

    def pull_progress_view(self, request, key: str):
        """The pull's latest line, refreshed every second until it ends."""
        state = pull_state(key) if key.isalnum() and len(key) <= 64 else None
        if state is None:
            raise Http404("no such pull")
        return self._pull_page(request, state=state)

    def _pull_page(self, request, *, state: dict | None):
        percent = int(100 * state["completed"] / state["total"]) if state and state.get("total") else None
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "state": state,
                   "percent": percent, "title": "Pull a model from Hugging Face"}  # fmt: skip
        return TemplateResponse(request, "admin/models_app/languagemodel/pull.html", context)
