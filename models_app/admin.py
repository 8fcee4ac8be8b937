from django.contrib import admin, messages
from django.utils.html import format_html, format_html_join

from .models import LanguageModel, ModelAlias
from .services import RegistryError, model_refresh_metadata, models_scan, models_set_enabled

LOAD_OPTIONS = [
    "n_ctx",
    "n_gpu_layers",
    "n_parallel",
    "keep_alive",
    "default_params",
    "chat_template_override",
    "tool_format",
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
    actions = ["rescan", "refresh_metadata", "enable", "disable"]

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
