from django.contrib import admin

from .models import LanguageModel


@admin.register(LanguageModel)
class LanguageModelAdmin(admin.ModelAdmin):
    list_display = ["name", "format", "context_length", "available", "enabled", "updated"]
    list_filter = ["enabled", "available", "format"]
    search_fields = ["name", "path"]
    readonly_fields = ["path", "format", "metadata", "context_length", "available", "created", "updated"]
    actions = ["enable", "disable"]

    @admin.action(description="Enable selected models")
    def enable(self, request, queryset):
        queryset.update(enabled=True)

    @admin.action(description="Disable selected models")
    def disable(self, request, queryset):
        queryset.update(enabled=False)
