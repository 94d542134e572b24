"""What is asked of the model and what it answered.

A Generation is one run of the model: chat turns, long-context jobs and API calls all
create one, and a worker process turns it into text. The database row is the source
of truth; the websocket stream is a live view of it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import connections, models
from django.db.models import F, Q
from django.utils import timezone

KV_CACHE_TYPES = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")]
FLASH_ATTN_CHOICES = [("auto", "auto"), ("on", "on"), ("off", "off")]


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
    def queue_name(self) -> str:
        """The Celery queue for interactive work (chat, API) on this model."""
        return f"model.{self.name}"

    @property
    def bulk_queue_name(self) -> str:
        """The queue for background work (long-context jobs). Workers consume it only
        when the interactive queue is empty (queue_order_strategy "priority")."""
        return f"model.{self.name}.bulk"


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

    class Meta:
        ordering = ["model_name", "host", "pid"]
        constraints = [
            models.UniqueConstraint(fields=["host", "pid"], name="one_heartbeat_per_process")
        ]

    def __str__(self) -> str:
        return f"{self.model_name} worker {self.host}:{self.pid} ({self.state})"


class ConversationQuerySet(models.QuerySet):
    def visible_to(self, user):
        """Conversations the user owns, or that are shared with one of their teams."""
        if not user.is_authenticated:
            return self.none()
        return self.filter(Q(owner=user) | Q(team__memberships__user=user)).distinct()


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

    objects = ConversationQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class GenerationQuerySet(models.QuerySet):
    def claim_queued(
        self, pk: int, worker: str, one_statement: bool | None = None
    ) -> Generation | None:
        """Mark the queued generation `pk` running on `worker`, and return it with its
        model; None if it is not queued. One conditional UPDATE: of two claimers,
        only one can match.

        On PostgreSQL (one_statement None: the default there) the UPDATE also
        returns the row and its model: one round trip on every answer's way to its
        first token instead of two. Elsewhere the row is read after the UPDATE."""
        now = timezone.now()
        changes = {"state": Generation.RUNNING, "started_at": now, "heartbeat_at": now}
        changes["worker"] = worker
        connection = connections[self.db]
        if one_statement is None:
            one_statement = connection.vendor == "postgresql"
        if not one_statement:
            queued = self.filter(pk=pk, state=Generation.QUEUED)
            if not queued.update(attempts=F("attempts") + 1, **changes):
                return None
            return self.select_related("model").get(pk=pk)
        qn = connection.ops.quote_name
        gen_fields = Generation._meta.concrete_fields
        model_fields = LanguageModel._meta.concrete_fields
        setting = [f"{qn(name)} = %s" for name in changes]
        setting.append(f"{qn('attempts')} = {qn('attempts')} + 1")
        params = [
            Generation._meta.get_field(name).get_db_prep_save(value, connection)
            for name, value in changes.items()
        ]
        sql = (
            f"WITH claimed AS (UPDATE {qn(Generation._meta.db_table)} SET {', '.join(setting)} "
            f"WHERE {qn('id')} = %s AND {qn('state')} = %s "
            f"RETURNING {', '.join(qn(f.column) for f in gen_fields)}) "
            f"SELECT claimed.*, {', '.join('m.' + qn(f.column) for f in model_fields)} "
            f"FROM claimed JOIN {qn(LanguageModel._meta.db_table)} m "
            f"ON m.{qn('id')} = claimed.{qn('model_id')}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [*params, pk, Generation.QUEUED])
            row = cursor.fetchone()
        if row is None:
            return None
        gen = _from_row(Generation, gen_fields, row[: len(gen_fields)], self.db)
        gen.model = _from_row(LanguageModel, model_fields, row[len(gen_fields) :], self.db)
        return gen


def _from_row(model, fields, values, db: str):
    """An instance from a raw row, its values converted as the ORM converts them
    (JSON decoded, and so on)."""
    connection = connections[db]
    converted = []
    for field, value in zip(fields, values, strict=True):
        col = field.cached_col
        for convert in connection.ops.get_db_converters(col) + field.get_db_converters(connection):
            value = convert(value, col, connection)
        converted.append(value)
    return model.from_db(db, [f.attname for f in fields], converted)


class Generation(models.Model):
    """One run of the model, from queued to a final state."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
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
    SOURCE_CHOICES = [(SOURCE_CHAT, "Chat"), (SOURCE_JOB, "Job"), (SOURCE_API, "API")]

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
    def group_name(self) -> str:
        """The channel-layer group that streams this generation."""
        return f"gen.{self.pk}"


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
