from django.contrib import admin, messages

from .models import ApiKey
from .services import key_create, key_revoke


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "models", "rpm", "tpm", "staff", "expires", "revoked", "created"]
    list_filter = ["staff", ("revoked", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix"]
    readonly_fields = ["prefix", "revoked", "created"]
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        # A new key goes through the service, which makes the secret; it is shown this once.
        key, raw = key_create(name=obj.name, models=obj.models, rpm=obj.rpm, tpm=obj.tpm, expires=obj.expires,
                              staff=obj.staff)  # fmt: skip
        obj.pk, obj.prefix = key.pk, key.prefix
        messages.warning(request, f"The new key is {raw} — copy it now, it will not be shown again.")

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        for key in queryset.filter(revoked=None):
            key_revoke(key=key)
