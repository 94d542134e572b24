from django.contrib import admin

from .models import RequestMetrics


@admin.register(RequestMetrics)
class RequestMetricsAdmin(admin.ModelAdmin):
    list_display = [
        "generation",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "decode_tokens_per_s",
    ]
