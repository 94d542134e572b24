"""A conversation exported as Markdown or JSON, and JSON imported back (docs/export.md).

The metrics of an answer are read through the generation's reverse relation
(`generation.metrics`), by field name: inference does not import monitoring.
"""

from __future__ import annotations

import json
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from .models import Conversation, Generation, LanguageModel, Message
from .services import ChatError, _within_limit, clean_params, title_from

FORMAT = "mixtralweb.conversation"
VERSION = 1
IMPORT_ROLES = ("user", "assistant", "system")
# Rows inserted per statement on import.
BATCH = 500
# Of an answer's metrics row, what an export carries (null when unknown).
EXPORTED_METRICS = (
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "ttft_ms",
    "decode_tokens_per_s",
    "e2e_ms",
    "vram_process_peak_bytes",
    "vram_device_peak_bytes",
)


def filename(conversation: Conversation, extension: str) -> str:
    """A download's name from the title: ASCII letters, digits and dashes only."""
    return f"{slugify(conversation.title)[:60] or f'conversation-{conversation.pk}'}.{extension}"


def _metrics(generation: Generation | None) -> dict | None:
    if generation is None or not generation.is_final:
        return None
    try:
        row = generation.metrics
    except Generation.metrics.RelatedObjectDoesNotExist:
        return None
    return {name: getattr(row, name) for name in EXPORTED_METRICS}


def _turns(conversation: Conversation):
    return conversation.messages.current().select_related("author", "generation__metrics")


def export_data(conversation: Conversation) -> dict:
    """The conversation as the JSON export's object: its current turns, in order."""
    messages = []
    for message in _turns(conversation):
        gen = message.generation
        item = {
            "role": message.role,
            "author": message.author.get_username() if message.author_id else None,
            "content": message.text,
            "created_at": message.created_at.isoformat(),
        }
        if message.role == Message.ASSISTANT:
            item |= {
                "state": gen.state if gen else None,
                "finish_reason": (gen.finish_reason or None) if gen else None,
                "reason": (gen.reason or None) if gen else None,
                "metrics": _metrics(gen),
            }
        messages.append(item)
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": timezone.now().isoformat(),
        "title": conversation.title,
        "model": conversation.model.name,
        "owner": conversation.owner.get_username(),
        "team": conversation.team.name if conversation.team_id else None,
        "system_prompt": conversation.system_prompt,
        "params": conversation.params,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
        "messages": messages,
    }


def export_json(conversation: Conversation) -> str:
    return json.dumps(export_data(conversation), ensure_ascii=False, indent=2) + "\n"


def _when(iso: str) -> str:
    moment = timezone.localtime(datetime.fromisoformat(iso))
    return moment.strftime("%Y-%m-%d %H:%M %Z")


def _metrics_line(metrics: dict) -> str:
    parts = [
        f"{metrics['prompt_tokens']} prompt tokens",
        f"{metrics['completion_tokens']} completion tokens",
    ]
    if metrics["ttft_ms"] is not None:
        parts.append(f"first token after {metrics['ttft_ms']:.0f} ms")
    if metrics["decode_tokens_per_s"] is not None:
        parts.append(f"{metrics['decode_tokens_per_s']:.1f} tokens/s")
    peak = metrics["vram_process_peak_bytes"] or metrics["vram_device_peak_bytes"]
    if peak is not None:
        parts.append(f"VRAM peak {peak / 2**30:.2f} GiB")
    return "; ".join(parts)


def export_markdown(conversation: Conversation) -> str:
    """A readable transcript: title, model and settings, then each turn."""
    data = export_data(conversation)
    lines = [f"# {conversation}", ""]
    lines.append(f"- Model: {data['model']}")
    lines.append(
        f"- Owner: {data['owner']}" + (f" (shared with {data['team']})" if data["team"] else "")
    )
    lines.append(
        f"- Started: {_when(data['created_at'])}; last change: {_when(data['updated_at'])}"
    )
    if data["params"]:
        settings_text = ", ".join(f"{k} {v}" for k, v in data["params"].items() if v is not None)
        lines.append(f"- Settings: {settings_text}")
    lines.append("")
    if data["system_prompt"]:
        lines += ["## System prompt", "", data["system_prompt"], ""]
    for item in data["messages"]:
        if item["role"] == Message.USER:
            heading = f"## {item['author'] or 'User'}"
        else:
            heading = "## Assistant"
        lines += ["---", "", f"{heading} · {_when(item['created_at'])}", "", item["content"], ""]
        if item["role"] != Message.ASSISTANT:
            continue
        if item["state"] != Generation.DONE:
            note = f"*{item['state'] or 'no answer'}*"
            lines += [note + (f": {item['reason']}" if item["reason"] else ""), ""]
        elif item["finish_reason"] == Generation.FINISH_LENGTH:
            lines += ["*Cut off at its token limit.*", ""]
        if item["metrics"]:
            lines += [f"*{_metrics_line(item['metrics'])}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --- import ----------------------------------------------------------------------------
class ImportRefused(ChatError):
    """The file cannot be imported; the message says why. Nothing was created."""


def _text(value, what: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ImportRefused(f"{what} must be text.")
    return value


def check_size(size: int) -> None:
    """ImportRefused if a file of `size` bytes is larger than an import may be."""
    if size > settings.CONVERSATION_IMPORT_MAX_BYTES:
        raise ImportRefused(
            f"The file is {size:,} bytes; the most an import takes is "
            f"{settings.CONVERSATION_IMPORT_MAX_BYTES:,}.",
            code="too_large",
        )


def _parse(raw: bytes) -> dict:
    check_size(len(raw))
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        raise ImportRefused("The file is not JSON (a conversation exported as JSON).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ImportRefused(
            f'The file is not a conversation export (its "format" is not "{FORMAT}").'
        )
    version = data.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise ImportRefused(
            f"The file's version is {version!r}; this site reads version {VERSION}."
        )
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _clean_messages(raw) -> tuple[list[dict], list[str]]:
    """(user and assistant turns, system messages' texts), each checked."""
    if not isinstance(raw, list) or not raw:
        raise ImportRefused('The file has no "messages" list, or it is empty.')
    turns, system = [], []
    for n, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise ImportRefused(f"Message {n} is not an object.")
        role = item.get("role")
        if role not in IMPORT_ROLES:
            raise ImportRefused(
                f"Message {n} has the role {str(role)[:40]!r}; a message is from "
                "the user, the assistant or the system."
            )
        if "content" not in item:
            raise ImportRefused(f'Message {n} has no "content".')
        content = _within_limit(_text(item["content"], f"Message {n}'s content"), f"Message {n}")
        if role == "system":
            system.append(content)
            continue
        if role == Message.USER and not content.strip():
            raise ImportRefused(f"Message {n} is an empty user message.")
        finish_reason = item.get("finish_reason") if role == Message.ASSISTANT else None
        if not (isinstance(finish_reason, str) and len(finish_reason) <= 20):
            finish_reason = ""
        turns.append({"role": role, "content": content, "finish_reason": finish_reason})
    if not turns:
        raise ImportRefused("The file has no user or assistant messages.")
    return turns, system


def _model_for(name) -> tuple[LanguageModel, str]:
    """The named model if it is here and enabled, else the default one, with a note."""
    if isinstance(name, str) and name:
        model = LanguageModel.objects.filter(name=name[:100], enabled=True).first()
        if model is not None:
            return model, ""
    default = LanguageModel.objects.filter(name=settings.DEFAULT_MODEL_NAME, enabled=True).first()
    if default is None:
        raise ImportRefused("No model is available here to import the conversation into.")
    named = f"The model {str(name)[:100]!r}" if name else "The file names no model; it"
    return default, f"{named} is not available here: the conversation uses {default.name}."


def import_conversation(*, user, raw: bytes) -> tuple[Conversation, list[str]]:
    """A new conversation owned by `user` from a JSON export, and notes for them.

    Everything is checked before anything is written; ImportRefused says why not.
    The importer is the author of every user turn (the file's usernames are not
    trusted). Answers become finished generations with their text and no metrics."""
    data = _parse(raw)
    turns, system_messages = _clean_messages(data.get("messages"))
    title = _text(data.get("title"), "The title", required=False).strip()
    if len(title) > 200:
        raise ImportRefused("The title is longer than 200 characters.")
    system_prompt = _text(data.get("system_prompt"), "The system prompt", required=False)
    system_prompt = "\n\n".join(p for p in [system_prompt, *system_messages] if p)
    _within_limit(system_prompt, "The system prompt")
    try:
        params = clean_params(data.get("params"))
    except ChatError as exc:
        raise ImportRefused(f"The file's settings: {exc}") from None
    model, note = _model_for(data.get("model"))
    if not title:
        first = next((t["content"] for t in turns if t["role"] == Message.USER), "")
        title = title_from(first) or "Imported conversation"
    now = timezone.now()
    answers = [
        Generation(
            user=user,
            model=model,
            source=Generation.SOURCE_IMPORT,
            params=params,
            state=Generation.DONE,
            text=turn["content"],
            finish_reason=turn["finish_reason"],
            queued_at=now,
            finished_at=now,
        )
        for turn in turns
        if turn["role"] == Message.ASSISTANT
    ]
    with transaction.atomic():
        conversation = Conversation.objects.create(
            owner=user, title=title, model=model, system_prompt=system_prompt, params=params
        )
        for answer in answers:
            answer.conversation = conversation
        # In bulk (a file may hold thousands of turns); the ids keep the turns' order.
        Generation.objects.bulk_create(answers, batch_size=BATCH)
        pending = iter(answers)
        Message.objects.bulk_create(
            [
                Message(
                    conversation=conversation, role=Message.USER, author=user, content=t["content"]
                )
                if t["role"] == Message.USER
                else Message(
                    conversation=conversation, role=Message.ASSISTANT, generation=next(pending)
                )
                for t in turns
            ],
            batch_size=BATCH,
        )
    return conversation, [note] if note else []
