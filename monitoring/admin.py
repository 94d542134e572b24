from django.contrib import admin

from .models import GpuSample, RequestMetrics, UsageDaily


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
