"""A long-context job and the passes of the model it takes."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Job(models.Model):
    """A document and an instruction, answered in one pass or by map-reduce.

    A job is created as a draft (counted, not queued); the user then runs it or
    discards it. Once accepted it always ends done, failed (with a reason) or
    cancelled.
    """

    DRAFT = "draft"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STATE_CHOICES = [
        (DRAFT, "Draft"),
        (QUEUED, "Queued"),
        (RUNNING, "Running"),
        (DONE, "Done"),
        (FAILED, "Failed"),
        (CANCELLED, "Cancelled"),
    ]
    ACTIVE_STATES = {QUEUED, RUNNING}
    FINAL_STATES = {DONE, FAILED, CANCELLED}

    SINGLE = "single"
    MAP_REDUCE = "map_reduce"
    # An API batch (Batch below): each line of its input file is one pass.
    BATCH = "batch"
    STRATEGY_CHOICES = [(SINGLE, "One pass"), (MAP_REDUCE, "Map-reduce"), (BATCH, "API batch")]

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs"
    )
    team = models.ForeignKey(
        "accounts.Team",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="jobs",
        help_text="Shared with this team's members.",
    )
    model = models.ForeignKey(
        "inference.LanguageModel", on_delete=models.PROTECT, related_name="jobs"
    )
    title = models.CharField(max_length=200)
    instruction = models.TextField()
    document = models.TextField()
    document_name = models.CharField(max_length=255, blank=True, help_text="Uploaded file name.")
    document_tokens = models.PositiveIntegerField(default=0)
    # Tokens of the whole one-pass prompt (template, instruction and document).
    prompt_tokens = models.PositiveIntegerField(default=0)
    max_tokens = models.PositiveIntegerField(default=512, help_text="New tokens per pass.")
    n_ctx = models.PositiveIntegerField(default=0, help_text="The model's context when counted.")

    strategy = models.CharField(max_length=12, choices=STRATEGY_CHOICES, blank=True)
    state = models.CharField(max_length=10, choices=STATE_CHOICES, default=DRAFT, db_index=True)
    reason = models.TextField(blank=True, help_text="Why it failed or was cancelled.")
    result = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)

    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # When the owner saw the finished job; unset means an unread notification.
    seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "inference_job"
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "-created_at"])]

    def __str__(self) -> str:
        return self.title or f"Job {self.pk}"

    @property
    def is_final(self) -> bool:
        return self.state in self.FINAL_STATES

    @property
    def fits(self) -> bool:
        return self.prompt_tokens + self.max_tokens <= self.n_ctx


class JobChunk(models.Model):
    """One pass of the model in a job.

    Level 0 passes read the document: `start`..`end` are character offsets into
    it. A pass at level L > 0 combines the answers of level L-1 passes
    `start`..`end` (indexes, end excluded). The job's answer is the answer of the
    only pass of its last level.

    In a batch the document is the input file and each pass is one of its lines
    (level 0, `start`..`end` the line); a line refused when the batch was counted is
    a failed pass without a generation, its answer the error ({"code", "message"}).
    """

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STATE_CHOICES = [
        (PENDING, "Pending"),
        (RUNNING, "Running"),
        (DONE, "Done"),
        (FAILED, "Failed"),
    ]

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="chunks")
    level = models.PositiveSmallIntegerField(default=0)
    index = models.PositiveIntegerField()
    start = models.PositiveIntegerField()
    end = models.PositiveIntegerField()
    prompt_tokens = models.PositiveIntegerField(default=0, help_text="Counted when planned.")
    state = models.CharField(max_length=10, choices=STATE_CHOICES, default=PENDING)
    # The latest attempt; earlier ones stay linked through JobChunk.generations.
    generation = models.OneToOneField(
        "inference.Generation",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="job_chunk",
    )
    generations = models.ManyToManyField(
        "inference.Generation",
        blank=True,
        related_name="+",
        db_table="inference_jobchunk_generations",
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    answer = models.TextField(blank=True)

    class Meta:
        db_table = "inference_jobchunk"
        ordering = ["level", "index"]
        constraints = [
            models.UniqueConstraint(fields=["job", "level", "index"], name="one_chunk_per_place")
        ]

    def __str__(self) -> str:
        return f"Job {self.job_id} pass {self.level}.{self.index}"


def batch_file_path(instance, filename: str) -> str:
    # The stored name is not the uploaded one: a user's file name never becomes a path.
    return f"batch-files/{instance.user_id}/{uuid.uuid4().hex}.jsonl"


class BatchFile(models.Model):
    """A file of the OpenAI Files API: a batch's input, uploaded by a script, or the
    output or errors it produced. Private to its user (any of their keys)."""

    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"
    PURPOSE_CHOICES = [(BATCH, "Batch input"), (BATCH_OUTPUT, "Batch output")]

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batch_files"
    )
    purpose = models.CharField(max_length=20, choices=PURPOSE_CHOICES)
    filename = models.CharField(max_length=255)
    content = models.FileField(upload_to=batch_file_path)
    bytes = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"file-{self.pk} ({self.filename})"


class Batch(models.Model):
    """The OpenAI Batches API's view of a job whose strategy is Job.BATCH: what the
    request named, and the files it produced. Its state and progress are the job's."""

    job = models.OneToOneField(Job, on_delete=models.CASCADE, related_name="batch")
    # The key that created it: its own limits apply to every line (SET_NULL: a key
    # deleted later leaves the batch, its lines then count as the user's alone).
    api_key = models.ForeignKey(
        "accounts.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    api_key_name = models.CharField(max_length=100, blank=True)
    input_file = models.ForeignKey(BatchFile, on_delete=models.PROTECT, related_name="+")
    output_file = models.ForeignKey(
        BatchFile, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    error_file = models.ForeignKey(
        BatchFile, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    endpoint = models.CharField(max_length=100)
    completion_window = models.CharField(max_length=10)
    metadata = models.JSONField(null=True, blank=True)

    def __str__(self) -> str:
        return f"batch_{self.job_id}"
