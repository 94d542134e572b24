from django.contrib import admin

from .models import Alert, GpuSample, RequestMetrics, UsageDaily


@admin.register(RequestMetrics)
class RequestMetricsAdmin(admin.ModelAdmin):
    list_display = [
        "generation",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "decode_tokens_per_s",
    ]


@admin.register(GpuSample)
class GpuSampleAdmin(admin.ModelAdmin):
    list_display = ["sampled_at", "host", "gpu_index", "memory_used_bytes", "temperature_c"]
    list_filter = ["host", "gpu_index"]
    date_hierarchy = "sampled_at"


@admin.register(UsageDaily)
class UsageDailyAdmin(admin.ModelAdmin):
    list_display = ["day", "user", "team", "model", "source", "requests", "completion_tokens"]
    list_filter = ["source", "model"]
    date_hierarchy = "day"
    raw_id_fields = ["user"]


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """Read-only: the evaluation owns these rows (acknowledge on /alerts/)."""

    list_display = ["subject", "kind", "opened_at", "fired_at", "resolved_at", "times_sent"]
    list_filter = ["kind"]
    date_hierarchy = "opened_at"
    readonly_fields = [f.name for f in Alert._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False
