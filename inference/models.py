"""What is asked of the model and what it answered.

A Generation is one run of the model: chat turns, long-context jobs and API calls all
create one, and a worker process turns it into text. The database row is the source
of truth; the websocket stream is a live view of it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

from mixtralweb import namespace

from . import streams
from .gguf import files_summary

KV_CACHE_TYPES = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")]
FLASH_ATTN_CHOICES = [("auto", "auto"), ("on", "on"), ("off", "off")]
# llama.cpp's split modes (llama.h: LLAMA_SPLIT_MODE_*): how a model spreads over GPUs.
SPLIT_MODE_CHOICES = [("none", "none"), ("layer", "layer"), ("row", "row")]


class LanguageModel(models.Model):
    """A GGUF file registered for serving, with the options llama.cpp loads it with."""

    name = models.SlugField(max_length=100, unique=True)
    path = models.CharField(max_length=1000, help_text="Absolute path of the GGUF file.")
    description = models.CharField(max_length=200, blank=True)
    enabled = models.BooleanField(default=True)

    # Load options, passed to llama.cpp as they are.
    n_ctx = models.PositiveIntegerField(default=8192)
    n_gpu_layers = models.IntegerField(default=0, help_text="-1 puts every layer on the GPU.")
    flash_attn = models.CharField(
        max_length=4,
        choices=FLASH_ATTN_CHOICES,
        default="auto",
        help_text="auto: llama.cpp uses flash attention where the device supports it.",
    )
    type_k = models.CharField(max_length=8, choices=KV_CACHE_TYPES, default="f16")
    type_v = models.CharField(max_length=8, choices=KV_CACHE_TYPES, default="f16")
    n_threads = models.PositiveIntegerField(
        default=0, help_text="Threads for decoding; 0: the machine's physical cores."
    )
    n_threads_batch = models.PositiveIntegerField(
        default=0, help_text="Threads for prompt evaluation; 0: the same as n_threads."
    )
    n_batch = models.PositiveIntegerField(
        default=512, help_text="Most prompt tokens evaluated in one step (a prefill chunk)."
    )
    # Continuous batching: one context serves this many sequences at once, sharing
    # one KV pool of n_ctx tokens (llama.cpp's unified KV cache).
    n_parallel = models.PositiveSmallIntegerField(
        default=4, help_text="Sequences decoded together (llama.cpp's --parallel)."
    )
    job_sequences = models.PositiveSmallIntegerField(
        default=1, help_text="Of those, at most this many serve long-context job passes."
    )
    # Several GPUs (llama.cpp's --split-mode, --main-gpu, --tensor-split).
    split_mode = models.CharField(
        max_length=5,
        choices=SPLIT_MODE_CHOICES,
        default="layer",
        help_text="layer: layers spread over GPUs; row: matrices split; none: main_gpu.",
    )
    main_gpu = models.PositiveSmallIntegerField(
        default=0, help_text="With split_mode none: the visible GPU (CUDA's numbering) to use."
    )
    tensor_split = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text='Share of each visible GPU, e.g. "3,1"; empty: by free memory.',
    )

    # Read from the GGUF file when the model is registered.
    architecture = models.CharField(max_length=50, blank=True)
    context_length_trained = models.PositiveIntegerField(null=True, blank=True)
    has_chat_template = models.BooleanField(default=False)
    inspection = models.JSONField(default=dict, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def files_summary(self) -> str:
        """The whole model's size and files, from its inspection: "67.8 GB in 5 files"."""
        return files_summary(self.inspection)

    @property
    def queue_name(self) -> str:
        """The Celery queue for interactive work (chat, API) on this model."""
        return namespace.model_queue(self.name)

    @property
    def bulk_queue_name(self) -> str:
        """The queue for background work (long-context jobs)."""
        return namespace.bulk_queue(self.name)


class WorkerHeartbeat(models.Model):
    """The last word of each model worker process: what it serves and how it is.

    Liveness comes from Redis (a key per worker with a TTL, inference/workers.py):
    a worker that dies simply stops refreshing it. This table keeps the last state
    of every worker, dead ones included, for the workers page and the admin.
    """

    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    FAILED = "failed"
    STOPPED = "stopped"
    STATE_CHOICES = [
        (LOADING, "Loading"),
        (READY, "Ready"),
        (BUSY, "Busy"),
        (FAILED, "Failed"),
        (STOPPED, "Stopped"),
    ]
    SERVING_STATES = {LOADING, READY, BUSY}

    host = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    # The model's name, not a foreign key: the record of a worker outlives a model
    # that is deleted or registered again.
    model_name = models.CharField(max_length=100, db_index=True)
    device = models.CharField(max_length=100, help_text='"cpu" or "gpu:<index>".')
    state = models.CharField(max_length=10, choices=STATE_CHOICES, default=LOADING)
    load_progress = models.FloatField(null=True, blank=True, help_text="0 to 1 while loading.")
    reason = models.TextField(blank=True, help_text="Why it failed, in plain words.")
    generation_id = models.BigIntegerField(null=True, blank=True, help_text="Running now.")
    started_at = models.DateTimeField(default=timezone.now)
    seen_at = models.DateTimeField(default=timezone.now)
    # Which of its stores ("redis") the worker could not reach at its last
    # heartbeat; the Redis entry says the same of "database" (inference/workers.py).
    unreachable = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["model_name", "host", "pid"]
        constraints = [
            models.UniqueConstraint(fields=["host", "pid"], name="one_heartbeat_per_process")
        ]

    def __str__(self) -> str:
        return f"{self.model_name} worker {self.host}:{self.pid} ({self.state})"


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    team = models.ForeignKey(
        "accounts.Team",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="conversations",
        help_text="Shared with this team's members.",
    )
    title = models.CharField(max_length=200, blank=True)
    model = models.ForeignKey(LanguageModel, on_delete=models.PROTECT, related_name="+")
    system_prompt = models.TextField(blank=True)
    params = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Preset(models.Model):
    """A saved system prompt and sampling parameters (and, optionally, a model) that
    fill the chat's settings. Its owner's, and seen by a team's members when shared.
    Who sees and changes it: mixtralweb/accounts/access.py."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="presets"
    )
    team = models.ForeignKey(
        "accounts.Team",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="presets",
        help_text="Shared with this team's members.",
    )
    name = models.CharField(max_length=100)
    system_prompt = models.TextField(blank=True)
    # As services.clean_params returns them: every parameter, defaults filled in.
    params = models.JSONField(default=dict, blank=True)
    # A name, not a key: a preset outlives the model it names (the chat then keeps
    # the model picked).
    model_name = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="one_preset_name_per_owner")
        ]

    def __str__(self) -> str:
        return self.name


class GenerationQuerySet(models.QuerySet):
    def of_deleted_conversations(self):
        """Chat answers whose conversation is gone (every chat answer has one)."""
        return self.filter(
            source__in=[Generation.SOURCE_CHAT, Generation.SOURCE_IMPORT],
            conversation__isnull=True,
        )

    def forget_text(self) -> int:
        """Blank what was asked and answered; the counts and metrics stay for usage."""
        return self.update(input_messages=[], prompt_text="", text="")


class Generation(models.Model):
    """One run of the model, from queued to a final state."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # finish_reason when max_tokens (or the context's end) ended it, as the engine says.
    FINISH_LENGTH = "length"
    STATE_CHOICES = [
        (QUEUED, "Queued"),
        (RUNNING, "Running"),
        (DONE, "Done"),
        (FAILED, "Failed"),
        (CANCELLED, "Stopped"),
    ]
    FINAL_STATES = {DONE, FAILED, CANCELLED}

    SOURCE_CHAT = "chat"
    SOURCE_JOB = "job"
    SOURCE_API = "api"
    # A line of an API batch (inference/jobs/batches.py): background work, like a job pass.
    SOURCE_BATCH = "batch"
    # An answer of an imported conversation (inference/exchange.py): its text only,
    # never run here, so neither usage nor quotas count it.
    SOURCE_IMPORT = "import"
    SOURCE_CHOICES = [
        (SOURCE_CHAT, "Chat"),
        (SOURCE_JOB, "Job"),
        (SOURCE_API, "API"),
        (SOURCE_BATCH, "Batch"),
        (SOURCE_IMPORT, "Imported"),
    ]
    # Sources that run at job priority, on the model's bulk queue.
    BACKGROUND_SOURCES = (SOURCE_JOB, SOURCE_BATCH)

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="generations"
    )
    team = models.ForeignKey(
        "accounts.Team", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    model = models.ForeignKey(LanguageModel, on_delete=models.PROTECT, related_name="generations")
    source = models.CharField(max_length=8, choices=SOURCE_CHOICES, default=SOURCE_CHAT)
    # SET_NULL: deleting a conversation keeps its generations' usage history.
    conversation = models.ForeignKey(
        Conversation, on_delete=models.SET_NULL, null=True, blank=True, related_name="generations"
    )

    api_key_name = models.CharField(max_length=100, blank=True, help_text="Source API key.")

    # The whole input, fixed when the generation is created, so that a retry on
    # another worker asks exactly the same question. A raw completion (no chat
    # template) sets prompt_text instead of input_messages.
    input_messages = models.JSONField(
        default=list, blank=True, help_text="[{role, content}, ...] in chat-template form."
    )
    prompt_text = models.TextField(blank=True, help_text="Raw prompt, used as it is.")
    params = models.JSONField(default=dict, blank=True)

    state = models.CharField(max_length=10, choices=STATE_CHOICES, default=QUEUED, db_index=True)
    text = models.TextField(blank=True)
    finish_reason = models.CharField(max_length=20, blank=True)
    reason = models.TextField(blank=True, help_text="Why it failed or stopped, in plain words.")
    attempts = models.PositiveSmallIntegerField(default=0)
    # What it cost in tokens, set when it ends: the quotas count these.
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True, help_text="host:pid of the worker.")
    cancel_requested = models.BooleanField(default=False)
    stopped_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="Who pressed Stop (a team-mate, in a shared conversation).",
    )

    queued_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Written with every partial flush: a running generation whose worker died stops
    # moving, and the reaper fails it.
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    objects = GenerationQuerySet.as_manager()

    class Meta:
        ordering = ["-queued_at"]
        indexes = [models.Index(fields=["user", "-queued_at"])]

    def __str__(self) -> str:
        return f"Generation {self.pk} ({self.state})"

    @property
    def is_final(self) -> bool:
        return self.state in self.FINAL_STATES

    @property
    def is_background(self) -> bool:
        """A job pass or a batch line: the bulk queue, at job priority."""
        return self.source in self.BACKGROUND_SOURCES

    @property
    def tenant(self) -> str:
        """Whose cached prompt tokens this generation may reuse, and who may reuse
        its own: the team's for work shared with a team, else its user's alone."""
        return f"team:{self.team_id}" if self.team_id else f"user:{self.user_id}"

    # --- the lifecycle: queued -> running -> done, failed or cancelled ------------------
    def claim(self, worker: str) -> bool:
        """Mark the queued generation running on `worker`. False if it is not queued
        any more (stopped meanwhile, or started by another worker): of two claimers,
        only one wins."""
        now = timezone.now()
        changes = {"state": self.RUNNING, "started_at": now, "heartbeat_at": now, "worker": worker}
        queued = Generation.objects.filter(pk=self.pk, state=self.QUEUED)
        if not queued.update(attempts=F("attempts") + 1, **changes):
            return False
        for name, value in changes.items():
            setattr(self, name, value)
        self.attempts += 1
        return True

    def resume(self, worker: str, seen_text: str | None, max_attempts: int) -> bool:
        """Take over a running generation whose worker died: it continues from the
        text the user already saw. After max_attempts it fails instead, keeping that
        text. False if there is nothing to continue."""
        with transaction.atomic():
            locked = Generation.objects.select_for_update().filter(pk=self.pk).first()
            if locked is None or locked.state != self.RUNNING:
                return False
            if seen_text is not None and len(seen_text) > len(locked.text):
                locked.text = seen_text
            if locked.attempts >= max_attempts:
                locked.finish(
                    self.FAILED,
                    f"The worker stopped during this answer {locked.attempts} times; "
                    "it was not tried again.",
                )
                self.refresh_from_db()
                return False
            locked.attempts += 1
            locked.worker = worker
            locked.heartbeat_at = timezone.now()
            locked.save(update_fields=["attempts", "worker", "heartbeat_at", "text"])
        self.refresh_from_db()
        return True

    def finish(self, state: str, reason: str = "", *, stats=None) -> None:
        """Record the end: its state, why, and (from a run's stats) what it took."""
        self.state = state
        self.reason = reason
        self.finished_at = timezone.now()
        fields = ["state", "reason", "finished_at", "text"]
        if stats is not None:
            self.finish_reason = stats.finish_reason
            self.prompt_tokens = stats.prompt_tokens
            self.completion_tokens = stats.completion_tokens
            fields += ["finish_reason", "prompt_tokens", "completion_tokens", "first_token_at"]
        Generation.objects.filter(pk=self.pk).update(**{f: getattr(self, f) for f in fields})
        # Its conversation may have been deleted while it ran: its text goes too.
        Generation.objects.filter(pk=self.pk).of_deleted_conversations().forget_text()

    def request_stop(self, by=None) -> bool:
        """Ask its worker to stop it; a generation still queued is cancelled at once
        (True then: nobody else will announce its end). by: who asked."""
        # The row first: the final event the worker then sends says who stopped it.
        Generation.objects.filter(pk=self.pk).update(cancel_requested=True, stopped_by=by)
        streams.request_stop(self)
        cancelled = Generation.objects.filter(pk=self.pk, state=self.QUEUED).update(
            state=self.CANCELLED, reason="Stopped before it started.", finished_at=timezone.now()
        )
        self.refresh_from_db()
        return bool(cancelled)


class MessageQuerySet(models.QuerySet):
    def current(self):
        """The turns that make up the conversation now (not replaced)."""
        return self.filter(superseded_at__isnull=True)

    def in_context(self):
        """The current turns that are sent to the model."""
        return self.current().filter(dropped_from_context=False)


class Message(models.Model):
    """A turn in a conversation. An assistant turn's text is its generation's text."""

    USER = "user"
    ASSISTANT = "assistant"
    ROLE_CHOICES = [(USER, "User"), (ASSISTANT, "Assistant")]

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=10, choices=ROLE_CHOICES)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    content = models.TextField(blank=True)
    generation = models.OneToOneField(
        Generation, on_delete=models.CASCADE, null=True, blank=True, related_name="message"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Set when a regenerate or an edit replaced this turn. Replaced turns leave the
    # conversation but stay in the database: their generations' metrics are history.
    superseded_at = models.DateTimeField(null=True, blank=True)
    edited_from = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The user message this one replaced by an edit.",
    )

    # Set when the user chose to drop the oldest turns to fit the context: the turn
    # stays visible, marked, but is no longer sent to the model.
    dropped_from_context = models.BooleanField(default=False)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.role} message {self.pk}"

    @property
    def text(self) -> str:
        if self.role == self.ASSISTANT and self.generation_id:
            return self.generation.text
        return self.content
