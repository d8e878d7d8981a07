from django.contrib import admin

from api.models import ApiToken, IdempotencyRecord
from common.admin import DeclaredFiltersMixin


@admin.register(ApiToken)
class ApiTokenAdmin(DeclaredFiltersMixin, admin.ModelAdmin):
    """Tokens are created with `manage.py api_token create` (the secret is shown once)."""

    list_display = ["id", "prefix", "name", "user", "created_at", "revoked_at"]
    list_filter = ["revoked_at"]
    list_select_related = ["user"]
    search_fields = ["prefix", "name", "user__username"]
    readonly_fields = ["user", "prefix", "digest", "created_at", "revoked_at"]
    fields = ["user", "name", "prefix", "digest", "created_at", "revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        revoked = queryset.revoke()
        self.message_user(request, f"{revoked} token(s) revoked.")


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(DeclaredFiltersMixin, admin.ModelAdmin):
    """Read-only; delete a record to free its key (for example after a crash mid-request)."""

    list_display = ["key", "user", "status_code", "created_at"]
    list_select_related = ["user"]
    search_fields = ["key", "user__username"]
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        return super().get_queryset(request).defer("response")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
