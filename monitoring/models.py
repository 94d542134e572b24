"""Records of what each generation cost, of what the GPUs did, and their rollups."""

from django.conf import settings
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
    e2e_ms = models.FloatField(null=True, blank=True, help_text="Queued to finished.")

    # Continuous batching: how many sequences shared the steps that decoded it.
    batch_size_mean = models.FloatField(null=True, blank=True)
    batch_size_max = models.PositiveSmallIntegerField(null=True, blank=True)

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


class UsageSums(models.Model):
    """Sums over a set of generations. Means are kept as sum and count so that any
    grouping of rows can be averaged exactly."""

    requests = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    decode_tps_sum = models.FloatField(default=0)
    decode_tps_count = models.PositiveIntegerField(default=0)
    ttft_ms_sum = models.FloatField(default=0)
    ttft_ms_count = models.PositiveIntegerField(default=0)
    queue_ms_sum = models.FloatField(default=0)
    queue_ms_count = models.PositiveIntegerField(default=0)
    e2e_ms_sum = models.FloatField(default=0)
    e2e_ms_count = models.PositiveIntegerField(default=0)
    vram_peak_max_bytes = models.BigIntegerField(null=True, blank=True)
    energy_j_sum = models.FloatField(null=True, blank=True)

    class Meta:
        abstract = True


class UsageDaily(UsageSums):
    """Generations of one day, user, team, model and source, summed.

    The usage pages read these rows instead of every generation (a million rows
    answer slowly; their daily sums answer at once). monitoring.rollup rebuilds a
    (user, day) slice whenever a generation of it ends.
    """

    day = models.DateField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    team = models.ForeignKey(
        "accounts.Team", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    model = models.ForeignKey("inference.LanguageModel", on_delete=models.CASCADE, related_name="+")
    source = models.CharField(max_length=8)

    class Meta:
        verbose_name_plural = "daily usage"
        indexes = [
            models.Index(fields=["day"]),
            models.Index(fields=["user", "day"]),
            models.Index(fields=["team", "day"]),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.user_id} {self.model_id} {self.source}"


class UsageDailyTotal(UsageSums):
    """UsageDaily summed over users: one row per day, team, model and source.

    The admin overview's totals, charts and breakdowns read these (dozens of rows
    a day, whatever the number of users); rebuilt with UsageDaily, in the same
    transaction.
    """

    day = models.DateField(db_index=True)
    team = models.ForeignKey(
        "accounts.Team", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    model = models.ForeignKey("inference.LanguageModel", on_delete=models.CASCADE, related_name="+")
    source = models.CharField(max_length=8)

    class Meta:
        verbose_name_plural = "daily usage totals"

    def __str__(self) -> str:
        return f"{self.day} {self.team_id} {self.model_id} {self.source}"


class UsageDailyUser(UsageSums):
    """UsageDaily summed over models, sources and teams: one row per day and user.

    The admin overview ranks top users from these (a few hundred rows a day);
    rebuilt with UsageDaily, in the same transaction.
    """

    day = models.DateField()
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")

    class Meta:
        verbose_name_plural = "daily usage per user"
        indexes = [models.Index(fields=["day"])]

    def __str__(self) -> str:
        return f"{self.day} {self.user_id}"


class GpuSample(models.Model):
    """One reading of one GPU, taken every few seconds by its host's telemetry thread.

    Raw samples are kept for GPU_RAW_RETENTION_HOURS, then only their 1-minute
    means (GpuMinute) remain.
    """

    host = models.CharField(max_length=200)
    gpu_index = models.PositiveSmallIntegerField()
    gpu_uuid = models.CharField(max_length=64, blank=True)
    name = models.CharField(max_length=100, blank=True)
    sampled_at = models.DateTimeField(db_index=True)

    memory_used_bytes = models.BigIntegerField()
    memory_total_bytes = models.BigIntegerField()
    utilization_pct = models.FloatField(null=True, blank=True)
    temperature_c = models.FloatField(null=True, blank=True)
    power_w = models.FloatField(null=True, blank=True)
    power_limit_w = models.FloatField(null=True, blank=True)
    sm_clock_mhz = models.FloatField(null=True, blank=True)
    mem_clock_mhz = models.FloatField(null=True, blank=True)
    throttle_reasons = models.JSONField(default=list, blank=True)
    ecc_errors = models.BigIntegerField(null=True, blank=True, help_text="Uncorrected, volatile.")
    processes = models.JSONField(default=list, blank=True, help_text="[{pid, used_bytes}]")

    class Meta:
        indexes = [models.Index(fields=["host", "gpu_index", "sampled_at"])]

    def __str__(self) -> str:
        return f"{self.host} GPU {self.gpu_index} at {self.sampled_at}"


class GpuMinute(models.Model):
    """The mean of one GPU's raw samples over one minute. Kept GPU_MINUTE_RETENTION_DAYS."""

    host = models.CharField(max_length=200)
    gpu_index = models.PositiveSmallIntegerField()
    gpu_uuid = models.CharField(max_length=64, blank=True)
    minute = models.DateTimeField(db_index=True)
    samples = models.PositiveIntegerField()

    memory_used_bytes = models.BigIntegerField()
    memory_total_bytes = models.BigIntegerField()
    utilization_pct = models.FloatField(null=True, blank=True)
    temperature_c = models.FloatField(null=True, blank=True)
    temperature_max_c = models.FloatField(null=True, blank=True)
    power_w = models.FloatField(null=True, blank=True)
    power_limit_w = models.FloatField(null=True, blank=True)
    sm_clock_mhz = models.FloatField(null=True, blank=True)
    mem_clock_mhz = models.FloatField(null=True, blank=True)
    throttle_reasons = models.JSONField(default=list, blank=True, help_text="Any seen.")
    ecc_errors = models.BigIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["host", "gpu_index", "minute"], name="one_gpu_minute")
        ]

    def __str__(self) -> str:
        return f"{self.host} GPU {self.gpu_index} minute {self.minute}"


class Alert(models.Model):
    """One occurrence of an alert condition, from the evaluation that first saw it
    to the one that saw it end (monitoring/alerting.py).

    At most one open row (resolved_at NULL) per key: the evaluation finds it, sends
    it again at most every ALERT_REPEAT_MIN, and closes it with a "resolved" message.
    A row whose condition must hold a while first (the queue wait) is pending until
    then (fired_at NULL); one that ends while pending is deleted, never sent.
    """

    GPU_TEMPERATURE = "gpu_temperature"
    GPU_THROTTLE = "gpu_throttle"
    GPU_VRAM = "gpu_vram"
    WORKER_GONE = "worker_gone"
    MODEL_UNSERVED = "model_unserved"
    QUEUE_WAIT = "queue_wait"
    JOB_FAILED = "job_failed"
    DATABASE_UNREACHABLE = "database_unreachable"
    REDIS_UNREACHABLE = "redis_unreachable"
    KIND_CHOICES = [
        (GPU_TEMPERATURE, "GPU temperature"),
        (GPU_THROTTLE, "GPU clock throttling"),
        (GPU_VRAM, "GPU memory headroom"),
        (WORKER_GONE, "Worker gone"),
        (MODEL_UNSERVED, "Model without a live worker"),
        (QUEUE_WAIT, "Queue wait"),
        (JOB_FAILED, "Job failed"),
        (DATABASE_UNREACHABLE, "Database unreachable from a worker"),
        (REDIS_UNREACHABLE, "Redis unreachable from a worker"),
    ]
    # An event, not a condition: it lasts until staff acknowledge it.
    EVENT_KINDS = {JOB_FAILED}

    key = models.CharField(max_length=300, help_text="What it is about, e.g. gpu_vram:host/0.")
    kind = models.CharField(max_length=30, choices=KIND_CHOICES)
    subject = models.CharField(max_length=300)
    message = models.TextField(help_text="The latest details.")
    details = models.JSONField(default=dict, blank=True, help_text="Structured fields.")
    opened_at = models.DateTimeField(help_text="First seen.")
    fired_at = models.DateTimeField(null=True, blank=True, help_text="First sent.")
    last_sent_at = models.DateTimeField(null=True, blank=True)
    times_sent = models.PositiveIntegerField(default=0)
    resolved_at = models.DateTimeField(null=True, blank=True, db_index=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-opened_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["key"],
                condition=models.Q(resolved_at__isnull=True),
                name="one_open_alert_per_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.subject} ({'resolved' if self.resolved_at else 'open'})"

    @property
    def is_event(self) -> bool:
        return self.kind in self.EVENT_KINDS
