"""Writes that start or stop generations. Consumers, views and the API call these.

Every function takes keyword-only arguments and raises ChatError with a message
that can be shown to the user as it is.
"""

from __future__ import annotations

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from mixtralweb.quotas import QuotaExceeded, check_quota

from .models import Conversation, Generation, LanguageModel, Message
from .publisher import cancel_key

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
        if kind is int and value != int(value):
            raise ChatError(f"{name} must be a whole number")
        if not low <= value <= high:
            raise ChatError(f"{name} must be between {low} and {high}")
        params[name] = kind(value)
    return params


def clean_content(content) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ChatError("The message is empty.", code="empty")
    if len(content) > settings.CHAT_MESSAGE_MAX_CHARS:
        raise ChatError(
            f"The message is {len(content):,} characters; the limit is "
            f"{settings.CHAT_MESSAGE_MAX_CHARS:,}.",
            code="too_large",
        )
    return content


def get_model(name: str | None) -> LanguageModel:
    if not name:
        name = settings.DEFAULT_MODEL_NAME
    model = LanguageModel.objects.filter(name=name, enabled=True).first()
    if model is None:
        raise ChatError(f"There is no model named {name!r}.", code="unknown_model")
    if settings.CHAT_REQUIRE_WORKER:
        from .workers import serving_problem

        problem = serving_problem(model.name)
        if problem:
            raise ChatError(problem, code="no_worker")
    return model


def get_conversation_for_user(user, conversation_id) -> Conversation:
    """The conversation if the user may see it; ChatError('not_found') otherwise,
    whether it does not exist or belongs to someone else."""
    try:
        conversation_id = int(conversation_id)
    except (TypeError, ValueError):
        raise ChatError("Conversation not found.", code="not_found") from None
    conversation = (
        Conversation.objects.visible_to(user)
        .select_related("model")
        .filter(pk=conversation_id)
        .first()
    )
    if conversation is None:
        raise ChatError("Conversation not found.", code="not_found")
    return conversation


def get_generation_for_user(user, generation_id) -> Generation:
    try:
        generation_id = int(generation_id)
    except (TypeError, ValueError):
        raise ChatError("Generation not found.", code="not_found") from None
    gen = Generation.objects.filter(pk=generation_id).select_related("conversation").first()
    if gen is None:
        raise ChatError("Generation not found.", code="not_found")
    if gen.user_id == user.pk:
        return gen
    if (
        gen.conversation_id
        and Conversation.objects.visible_to(user).filter(pk=gen.conversation_id).exists()
    ):
        return gen
    raise ChatError("Generation not found.", code="not_found")


def conversation_input(conversation: Conversation) -> list[dict]:
    """The conversation as chat-template messages, system prompt first."""
    messages = []
    if conversation.system_prompt:
        messages.append({"role": "system", "content": conversation.system_prompt})
    for message in conversation.messages.select_related("generation"):
        text = message.text
        if (
            message.role == Message.ASSISTANT
            and (not message.generation or message.generation.state != Generation.DONE)
            and not text
        ):
            continue
        messages.append({"role": message.role, "content": text})
    return messages


def generation_enqueue(generation: Generation) -> None:
    """Send the generation to its model's queue once the row is committed."""
    from .tasks import generate

    transaction.on_commit(
        lambda: generate.apply_async(args=[generation.pk], queue=generation.model.queue_name)
    )


@transaction.atomic
def chat_send(
    *,
    user,
    content,
    conversation_id=None,
    model_name: str | None = None,
    params: dict | None = None,
    system_prompt: str = "",
) -> tuple[Conversation, Message, Generation]:
    """Post a user message and queue the assistant's answer."""
    content = clean_content(content)
    if conversation_id is None:
        model = get_model(model_name)
        conversation = Conversation.objects.create(
            owner=user,
            model=model,
            title=content.strip().splitlines()[0][:80],
            system_prompt=system_prompt or "",
            params=clean_params(params),
        )
    else:
        conversation = get_conversation_for_user(user, conversation_id)
        busy = conversation.generations.filter(
            state__in=[Generation.QUEUED, Generation.RUNNING]
        ).exists()
        if busy:
            raise ChatError("Wait for the current answer to finish, or stop it.", code="busy")
        if params is not None:
            conversation.params = clean_params(params)
    try:
        check_quota(user=user, team=conversation.team, source=Generation.SOURCE_CHAT)
    except QuotaExceeded as exc:
        raise ChatError(str(exc), code="quota") from None
    conversation.updated_at = timezone.now()
    conversation.save()
    message = Message.objects.create(
        conversation=conversation, role=Message.USER, author=user, content=content
    )
    generation = Generation.objects.create(
        user=user,
        team=conversation.team,
        model=conversation.model,
        source=Generation.SOURCE_CHAT,
        conversation=conversation,
        input_messages=conversation_input(conversation),
        params=conversation.params or clean_params(None),
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=generation)
    generation_enqueue(generation)
    return conversation, message, generation


def generation_stop(*, user, generation_id) -> Generation:
    """Ask the worker to stop; a generation still queued is cancelled at once."""
    gen = get_generation_for_user(user, generation_id)
    if gen.is_final:
        return gen
    Generation.objects.filter(pk=gen.pk).update(cancel_requested=True)
    redis.Redis.from_url(settings.REDIS_URL).set(cancel_key(gen.pk), "1", ex=3600)
    with transaction.atomic():
        locked = Generation.objects.select_for_update().get(pk=gen.pk)
        if locked.state == Generation.QUEUED:
            locked.state = Generation.CANCELLED
            locked.reason = "Stopped before it started."
            locked.finished_at = timezone.now()
            locked.save()
            gen = locked
    return gen
