"""Records of what each generation cost."""

from django.db import models


class RequestMetrics(models.Model):
    """What one generation cost. Written once by the worker when the run ends.

    GPU fields are NULL when the worker has no NVIDIA GPU: unknown, never zero.
    Timestamps (queued, started, first token, finished) live on the Generation.
    """

    generation = models.OneToOneField(
        "inference.Generation", on_delete=models.CASCADE, related_name="metrics"
    )

    # Tokens
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0, help_text="Prompt tokens reused.")
    completion_tokens = models.PositiveIntegerField(default=0)
    n_ctx = models.PositiveIntegerField(default=0)
    context_used = models.PositiveIntegerField(default=0, help_text="Prompt + completion.")

    # Time
    queue_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Started to first token.")
    prompt_eval_ms = models.FloatField(null=True, blank=True)
    prompt_tokens_per_s = models.FloatField(null=True, blank=True)
    decode_ms = models.FloatField(null=True, blank=True)
    decode_tokens_per_s = models.FloatField(null=True, blank=True)
    itl_p50_ms = models.FloatField(null=True, blank=True, help_text="Inter-token latency.")
    itl_p95_ms = models.FloatField(null=True, blank=True)

    # Where it ran
    host = models.CharField(max_length=200, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    gpu_index = models.PositiveSmallIntegerField(null=True, blank=True)
    gpu_uuid = models.CharField(max_length=64, blank=True)

    # GPU (NVML), NULL without an NVIDIA GPU
    vram_process_start_bytes = models.BigIntegerField(null=True, blank=True)
    vram_process_peak_bytes = models.BigIntegerField(null=True, blank=True)
    vram_process_end_bytes = models.BigIntegerField(null=True, blank=True)
    vram_device_start_bytes = models.BigIntegerField(null=True, blank=True)
    vram_device_peak_bytes = models.BigIntegerField(null=True, blank=True)
    vram_device_end_bytes = models.BigIntegerField(null=True, blank=True)
    gpu_util_mean_pct = models.FloatField(null=True, blank=True)
    power_mean_w = models.FloatField(null=True, blank=True)
    energy_j = models.FloatField(null=True, blank=True)
    temperature_max_c = models.FloatField(null=True, blank=True)
    sm_clock_mean_mhz = models.FloatField(null=True, blank=True)
    mem_clock_mean_mhz = models.FloatField(null=True, blank=True)
    throttle_reasons = models.JSONField(default=list, blank=True)

    # CPU (psutil), always recorded
    cpu_mean_pct = models.FloatField(null=True, blank=True)
    rss_peak_bytes = models.BigIntegerField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "request metrics"

    def __str__(self) -> str:
        return f"Metrics of generation {self.generation_id}"

    @property
    def has_gpu(self) -> bool:
        return self.gpu_index is not None
