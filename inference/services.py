"""Writes that start or stop generations. Consumers, views and the API call these.

Every function takes keyword-only arguments and raises ChatError with a message
that can be shown to the user as it is.
"""

from __future__ import annotations

import logging
import math

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from mixtralweb.accounts import access

from .models import Conversation, Generation, LanguageModel, Message, WorkerHeartbeat
from .quotas import QuotaExceeded, check_quota
from .receivers import access_changed_for_conversation
from .selectors import announce_final
from .signals import generation_finished
from .tasks import enqueue
from .workers import live_workers, serving_problem

log = logging.getLogger(__name__)

DEFAULT_PARAMS = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512, "seed": None}
PARAM_LIMITS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "max_tokens": (1, 32768),
    "seed": (0, 2**31 - 1),
}


class ChatError(ValueError):
    """A request that cannot be carried out; the message says why."""

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code


# The largest id a database row can have (PostgreSQL bigint).
ID_MAX = 2**63 - 1


def clean_id(value) -> int | None:
    """The row id a client sent (a whole number, or its digits as text), or None for
    anything else: a fraction, a boolean, a list, a number beyond any id."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= ID_MAX else None


# A new conversation's title: its first message's first line, up to this long.
TITLE_MAX_CHARS = 80


def title_from(text: str, max_chars: int = TITLE_MAX_CHARS) -> str:
    """The first line of `text` as a title: whole, or cut after its last whole word
    that fits, with "…" (a single word longer than that is cut where it must be)."""
    line = next((line.strip() for line in (text or "").splitlines() if line.strip()), "")
    if len(line) <= max_chars:
        return line
    cut = line[: max_chars - 1]
    if not line[max_chars - 1].isspace() and " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,.;:-–—") + "…"


def clean_params(raw: dict | None) -> dict:
    """Validated sampling parameters, defaults filled in."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ChatError("params must be an object")
    unknown = set(raw) - set(DEFAULT_PARAMS)
    if unknown:
        raise ChatError(f"Unknown parameter(s): {', '.join(sorted(unknown))}")
    params = dict(DEFAULT_PARAMS)
    for name, value in raw.items():
        if value is None and name == "seed":
            continue
        low, high = PARAM_LIMITS[name]
        kind = float if name in {"temperature", "top_p"} else int
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ChatError(f"{name} must be a number")
        if not math.isfinite(value):
            raise ChatError(f"{name} must be a finite number")
        if kind is int and value != int(value):
            raise ChatError(f"{name} must be a whole number")
        if not low <= value <= high:
            raise ChatError(f"{name} must be between {low} and {high}")
        params[name] = kind(value)
    return params


def clean_system_prompt(system_prompt) -> str:
    if system_prompt is None:
        return ""
    if not isinstance(system_prompt, str):
        raise ChatError("system_prompt must be text.")
    return _within_limit(system_prompt, "The system prompt")


def clean_content(content) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ChatError("The message is empty.", code="empty")
    return _within_limit(content, "The message")


def _within_limit(text: str, what: str) -> str:
    if len(text) > settings.CHAT_MESSAGE_MAX_CHARS:
        raise ChatError(
            f"{what} is {len(text):,} characters; the limit is "
            f"{settings.CHAT_MESSAGE_MAX_CHARS:,}.",
            code="too_large",
        )
    return text


def get_model(name: str | None, live_workers: list[dict] | None = None) -> LanguageModel:
    """The enabled model `name` (the default if empty), which a live worker serves.
    live_workers: as the caller read them (workers.live_workers); read here if None."""
    if not name:
        name = settings.DEFAULT_MODEL_NAME
    model = LanguageModel.objects.filter(name=name).first()
    _check_usable(model, name, live_workers)
    return model


def get_model_for_status(name) -> LanguageModel:
    """The enabled model `name`, whether or not a worker serves it: its status says."""
    model = None
    if isinstance(name, str) and name:
        model = LanguageModel.objects.filter(name=name[:100], enabled=True).first()
    if model is None:
        raise ChatError(f"There is no model named {str(name)[:100]!r}.", code="unknown_model")
    return model


def _check_usable(
    model: LanguageModel | None, name: str, live_workers: list[dict] | None = None
) -> None:
    """ChatError unless `model` exists, is enabled, and (if CHAT_REQUIRE_WORKER) a
    live worker serves it."""
    if model is None or not model.enabled:
        raise ChatError(f"There is no model named {name!r}.", code="unknown_model")
    if settings.CHAT_REQUIRE_WORKER:
        problem = serving_problem(model.name, live_workers)
        if problem:
            raise ChatError(problem, code="no_worker")


def serving_models():
    """Enabled models that a live worker serves (or is loading): the model picker
    offers only these."""
    names = {w["model"] for w in live_workers() if w["state"] in WorkerHeartbeat.SERVING_STATES}
    return LanguageModel.objects.filter(enabled=True, name__in=names)


def get_conversation_for_user(user, conversation_id) -> Conversation:
    """The conversation if the user may see it; ChatError('not_found') otherwise,
    whether it does not exist or belongs to someone else."""
    conversation_id = clean_id(conversation_id)
    if conversation_id is None:
        raise ChatError("Conversation not found.", code="not_found")
    visible = access.conversations(user, Conversation.objects.select_related("model"))
    conversation = visible.filter(pk=conversation_id).first()
    if conversation is None:
        raise ChatError("Conversation not found.", code="not_found")
    return conversation


def get_generation_for_user(user, generation_id) -> Generation:
    generation_id = clean_id(generation_id)
    if generation_id is None:
        raise ChatError("Generation not found.", code="not_found")
    visible = access.generations(user, Generation.objects.select_related("model"))
    gen = visible.filter(pk=generation_id).first()
    if gen is None:
        raise ChatError("Generation not found.", code="not_found")
    return gen


def conversation_input(conversation: Conversation) -> list[dict]:
    """The conversation as chat-template messages, system prompt first: the current
    turns not dropped from the context, without unfinished or empty answers."""
    messages = []
    if conversation.system_prompt:
        messages.append({"role": "system", "content": conversation.system_prompt})
    for message in conversation.messages.in_context().select_related("generation"):
        text = message.text
        if message.role == Message.ASSISTANT and not text:
            continue
        messages.append({"role": message.role, "content": text})
    return messages


def generation_enqueue(generation: Generation) -> None:
    """Send the generation to its model's queue once the row is committed. If the
    broker cannot take it now, the generation stays queued and the reaper sends it
    again (tasks.requeue_stranded_generations): it is never lost."""

    def send() -> None:
        try:
            enqueue(generation)
        except Exception:  # noqa: BLE001 - the reaper retries; the user sees it queued
            log.exception("generation %s: could not be queued now; retried later", generation.pk)

    transaction.on_commit(send)


OVERFLOW_REFUSE = "refuse"
OVERFLOW_DROP_OLDEST = "drop_oldest"


def _fit_context(
    conversation: Conversation,
    overflow: str,
    messages: list[dict] | None = None,
    *,
    may_drop: bool = True,
    text_before: str = "",
) -> list[dict]:
    """The input for the next answer, checked against the model's context.

    A prompt that does not fit is refused with both numbers, or, when the user chose
    "drop_oldest", the oldest turns are marked dropped until it fits. Never silent.
    messages: the conversation's input when the caller already knows it.
    may_drop: whether this user may drop turns (the owner; access).
    text_before: the start of the answer, which a continuation puts in the prompt.
    """
    from .tokens import ChatTemplateError, chat_tokens_bound, count_chat_tokens

    model = conversation.model
    max_tokens = int((conversation.params or {}).get("max_tokens", DEFAULT_PARAMS["max_tokens"]))
    while True:
        if messages is None:
            messages = conversation_input(conversation)
        # Counted as a whole turn: a few template tokens more than the prompt has.
        counted = messages
        if text_before:
            counted = [*messages, {"role": Message.ASSISTANT, "content": text_before}]
        try:
            bound = chat_tokens_bound(model, counted)
            if bound is not None and bound + max_tokens <= model.n_ctx:
                return messages  # fits for certain: not worth tokenizing
            prompt_tokens = count_chat_tokens(model, counted)
        except ChatTemplateError as exc:
            raise ChatError(str(exc), code="template") from None
        if prompt_tokens + max_tokens <= model.n_ctx:
            return messages
        droppable = (
            overflow == OVERFLOW_DROP_OLDEST
            and conversation.pk is not None  # a new conversation has nothing to drop
            and len(conversation.messages.in_context().filter(role=Message.USER)) > 1
        )
        if droppable and not may_drop:
            raise ChatError(
                f"The conversation is {prompt_tokens:,} tokens and the model's context is "
                f"{model.n_ctx:,}. Only the conversation's owner can drop its oldest turns.",
                code="forbidden",
            )
        if not droppable:
            raise ChatError(
                f"The conversation is {prompt_tokens:,} tokens and the model's context is "
                f"{model.n_ctx:,} (with {max_tokens:,} tokens reserved for the answer). "
                "Start a new chat, shorten the message, or drop the oldest turns.",
                code="context_overflow",
            )
        oldest = conversation.messages.in_context().order_by("created_at", "id")[:2]
        for message in list(oldest):
            message.dropped_from_context = True
            message.save(update_fields=["dropped_from_context"])
        messages = None


def _queue_answer(
    *,
    user,
    conversation: Conversation,
    overflow: str = OVERFLOW_REFUSE,
    live_workers: list[dict] | None = None,
    text_before: str = "",
) -> tuple[Message, Generation]:
    """Create the assistant turn for the conversation as it stands, and queue it.
    The conversation comes with its model (select_related) as its callers read it.
    text_before: the answer starts with this text, which the model continues."""
    busy = conversation.generations.filter(state__in=[Generation.QUEUED, Generation.RUNNING])
    if busy.exists():
        raise ChatError("Wait for the current answer to finish, or stop it.", code="busy")
    # The model may have been disabled, or its worker gone, since the conversation began.
    _check_usable(conversation.model, conversation.model.name, live_workers)
    _check_quota(user, conversation)
    may_drop = access.may_manage_conversation(user, conversation)
    input_messages = _fit_context(
        conversation, overflow, may_drop=may_drop, text_before=text_before
    )
    conversation.updated_at = timezone.now()
    conversation.save()
    generation = _new_generation(user, conversation, input_messages)
    generation.text = text_before  # the worker continues from it (tasks.Run)
    generation.save()
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=generation)
    assistant = generation.message
    generation_enqueue(generation)
    return assistant, generation


def _check_quota(user, conversation: Conversation) -> None:
    try:
        check_quota(user=user, team=conversation.team, source=Generation.SOURCE_CHAT)
    except QuotaExceeded as exc:
        raise ChatError(str(exc), code="quota") from None


def _new_generation(user, conversation: Conversation, input_messages: list[dict]) -> Generation:
    return Generation(
        user=user,
        team=conversation.team,
        model=conversation.model,
        source=Generation.SOURCE_CHAT,
        conversation=conversation,
        input_messages=input_messages,
        params=conversation.params or clean_params(None),
    )


def _start_conversation(
    *,
    user,
    content: str,
    model_name,
    params,
    system_prompt: str,
    overflow: str,
    live_workers: list[dict] | None = None,
) -> tuple[Conversation, Message, Generation]:
    """A new conversation, its first message and the answer's generation, queued.

    Nothing is written until all is checked; then all four rows go in together."""
    model = get_model(model_name, live_workers)
    conversation = Conversation(
        owner=user,
        model=model,
        title=title_from(content),
        system_prompt=system_prompt or "",
        params=clean_params(params),
    )
    known_input = [{"role": Message.USER, "content": content}]
    if conversation.system_prompt:
        known_input.insert(0, {"role": "system", "content": conversation.system_prompt})
    input_messages = _fit_context(conversation, overflow, known_input)
    generation = _new_generation(user, conversation, input_messages)
    with transaction.atomic():
        _check_quota(user, conversation)  # in the transaction that inserts: quotas.py
        conversation.save()
        generation.conversation = conversation
        generation.save()
        # In this order: created_at and the ids put the question before its answer.
        message = Message.objects.create(
            conversation=conversation, role=Message.USER, author=user, content=content
        )
        Message.objects.create(
            conversation=conversation, role=Message.ASSISTANT, generation=generation
        )
        generation_enqueue(generation)
    return conversation, message, generation


def _clean_overflow(overflow) -> str:
    if overflow in (None, OVERFLOW_REFUSE, OVERFLOW_DROP_OLDEST):
        return overflow or OVERFLOW_REFUSE
    raise ChatError('overflow must be "refuse" or "drop_oldest"')


def chat_send(
    *,
    user,
    content,
    conversation_id=None,
    model_name: str | None = None,
    params: dict | None = None,
    system_prompt: str | None = "",
    overflow: str | None = None,
    live_workers: list[dict] | None = None,
) -> tuple[Conversation, Message, Generation]:
    """Post a user message and queue the assistant's answer. live_workers: as the
    caller read them (the chat socket reads them with its rate limit), or None."""
    content = clean_content(content)
    overflow = _clean_overflow(overflow)
    if conversation_id is None:
        return _start_conversation(
            user=user,
            content=content,
            model_name=model_name,
            params=params,
            system_prompt=clean_system_prompt(system_prompt),
            overflow=overflow,
            live_workers=live_workers,
        )
    with transaction.atomic():
        conversation = get_conversation_for_user(user, conversation_id)
        _apply_settings(user, conversation, model_name, params, system_prompt, live_workers)
        message = Message.objects.create(
            conversation=conversation, role=Message.USER, author=user, content=content
        )
        _, generation = _queue_answer(
            user=user, conversation=conversation, overflow=overflow, live_workers=live_workers
        )
    return conversation, message, generation


def _apply_settings(user, conversation, model_name, params, system_prompt, live_workers):
    """The settings a message carries for its conversation's next answers (None: keep
    what it has). Only the owner may change them; a team-mate who asks for other
    settings is told, not ignored. Saved with the message, in its transaction: if the
    answer is refused (a model whose context the conversation does not fit), nothing
    changes. The answer's generation takes its settings from the conversation."""
    changes = {}
    if params is not None:
        params = clean_params(params)
        if params != conversation.params:
            changes["params"] = params
    if system_prompt is not None:
        system_prompt = clean_system_prompt(system_prompt)
        if system_prompt != conversation.system_prompt:
            changes["system_prompt"] = system_prompt
    if model_name and model_name != conversation.model.name:
        changes["model"] = model_name
    if not changes:
        return
    if not access.may_manage_conversation(user, conversation):
        raise ChatError("Only the conversation's owner can change its settings.", "forbidden")
    if "model" in changes:
        changes["model"] = get_model(model_name, live_workers)
    for field, value in changes.items():
        setattr(conversation, field, value)  # saved by _queue_answer, with the answer


@transaction.atomic
def chat_regenerate(*, user, conversation_id, overflow: str | None = None):
    """Replace the last answer with a new one to the same question."""
    conversation = get_conversation_for_user(user, conversation_id)
    last = conversation.messages.current().order_by("-created_at", "-id").first()
    if last is None or last.role != Message.ASSISTANT:
        raise ChatError("There is no answer to regenerate.", code="invalid")
    if last.generation and not last.generation.is_final:
        raise ChatError("Wait for the current answer to finish, or stop it.", code="busy")
    generation = _replace_last_answer(user, conversation, last, "regenerate", overflow)
    return conversation, last, generation


def _replace_last_answer(user, conversation, last, verb: str, overflow, text_before: str = ""):
    """Supersede the last answer with a new generation (starting with text_before),
    if the user may replace the turn it answers."""
    question = (
        conversation.messages.current().filter(role=Message.USER, pk__lt=last.pk).order_by("-pk")
    ).first()
    if not access.may_replace_turns(user, conversation, [question.author_id if question else None]):
        raise ChatError(
            f"Only the conversation's owner can {verb} an answer to someone else's message.",
            "forbidden",
        )
    last.superseded_at = timezone.now()
    last.save(update_fields=["superseded_at"])
    _, generation = _queue_answer(
        user=user,
        conversation=conversation,
        overflow=_clean_overflow(overflow),
        text_before=text_before,
    )
    return generation


@transaction.atomic
def chat_continue(*, user, conversation_id, overflow: str | None = None):
    """Continue the last answer where its token limit cut it. The model reads that
    answer as the start of its own turn and writes on; the new generation starts
    with the same text and takes the answer's place, as a regenerate does (the cut
    answer stays in the history, with what it cost)."""
    conversation = get_conversation_for_user(user, conversation_id)
    last = (
        conversation.messages.current()
        .select_related("generation")
        .order_by("-created_at", "-id")
        .first()
    )
    if (
        last is None
        or last.role != Message.ASSISTANT
        or last.generation is None
        or last.generation.finish_reason != Generation.FINISH_LENGTH
    ):
        raise ChatError("Only an answer cut off at its token limit can be continued.")
    generation = _replace_last_answer(
        user, conversation, last, "continue", overflow, text_before=last.generation.text
    )
    return conversation, last, generation


@transaction.atomic
def chat_edit(*, user, message_id, content, overflow: str | None = None):
    """Replace an earlier user message: it and every later turn are superseded, the
    new text is posted in its place, and a new answer is queued."""
    content = clean_content(content)
    message_id = clean_id(message_id)
    if message_id is None:
        raise ChatError("Message not found.", code="not_found")
    original = (
        Message.objects.filter(
            pk=message_id,
            role=Message.USER,
            superseded_at__isnull=True,
            conversation__in=access.conversations(user, Conversation.objects.all()),
        )
        .select_related("conversation")
        .first()
    )
    if original is None:
        raise ChatError("Message not found.", code="not_found")
    conversation = Conversation.objects.select_related("model").get(pk=original.conversation_id)
    now = timezone.now()
    # Ids grow with time: the original and every turn after it.
    replaced = conversation.messages.current().filter(pk__gte=original.pk)
    authors = replaced.filter(role=Message.USER).values_list("author_id", flat=True)
    if not access.may_replace_turns(user, conversation, list(authors)):
        raise ChatError(
            "Only the conversation's owner can edit someone else's message, or one that "
            "someone else's messages follow.",
            "forbidden",
        )
    if conversation.generations.filter(state__in=[Generation.QUEUED, Generation.RUNNING]).exists():
        raise ChatError("Wait for the current answer to finish, or stop it.", code="busy")
    replaced_count = replaced.update(superseded_at=now)
    message = Message.objects.create(
        conversation=conversation,
        role=Message.USER,
        author=user,
        content=content,
        edited_from=original,
    )
    _, generation = _queue_answer(
        user=user, conversation=conversation, overflow=_clean_overflow(overflow)
    )
    return conversation, message, generation, replaced_count


def _owned_conversation(user, conversation_id) -> Conversation:
    conversation = get_conversation_for_user(user, conversation_id)
    if not access.may_manage_conversation(user, conversation):
        raise ChatError("Only the owner can do that.", code="forbidden")
    return conversation


def conversation_rename(*, user, conversation_id, title: str) -> Conversation:
    conversation = _owned_conversation(user, conversation_id)
    title = (title or "").strip()
    if not title:
        raise ChatError("The title is empty.", code="empty")
    if len(title) > 200:
        raise ChatError("The title is longer than 200 characters.", code="too_large")
    conversation.title = title
    conversation.save(update_fields=["title", "updated_at"])
    return conversation


def conversation_delete(*, user, conversation_id) -> None:
    """Delete the conversation and all its text: the messages, and the prompts and
    answers of its generations. The generations stay, blank, with their token counts
    and metrics: usage history. An answer still running is stopped, and its worker
    writes no text for it (Generation.finish)."""
    conversation = _owned_conversation(user, conversation_id)
    with transaction.atomic():
        running = conversation.generations.filter(state__in=[Generation.QUEUED, Generation.RUNNING])
        for gen in running:
            generation_stop(user=user, generation_id=gen.pk)
        # Everyone watching it loses it now (their sockets re-check after the commit).
        access_changed_for_conversation(conversation.pk)
        generations = list(conversation.generations.values_list("pk", flat=True))
        conversation.delete()
        Generation.objects.filter(pk__in=generations).forget_text()


def conversation_share(*, user, conversation_id, team_id) -> Conversation:
    """Share the conversation with one of the owner's teams (None: stop sharing)."""
    conversation = _owned_conversation(user, conversation_id)
    team = None
    if team_id not in (None, ""):
        team = access.teams_of(user).filter(pk=team_id).first()
        if team is None:
            raise ChatError("You are not a member of that team.", code="not_found")
    if team != conversation.team:
        access_changed_for_conversation(conversation.pk)
    conversation.team = team
    conversation.save(update_fields=["team", "updated_at"])
    return conversation


def conversations_matching(user, query: str):
    """Conversations the user may see whose title, messages or answers contain query."""
    visible = access.conversations(user, Conversation.objects.all())
    query = (query or "").strip()
    if not query:
        return visible
    return visible.filter(
        Q(title__icontains=query)
        | Q(messages__content__icontains=query)
        | Q(messages__generation__text__icontains=query)
    ).distinct()


def generation_stop(*, user, generation_id) -> Generation:
    """Ask the worker to stop; a generation still queued is cancelled at once."""
    gen = get_generation_for_user(user, generation_id)
    if gen.is_final:
        return gen
    if gen.request_stop(by=user):
        # It never reached a worker: nobody else will tell its followers.
        announce_final(gen)
        generation_finished.send(sender=Generation, generation=gen)
    return gen
