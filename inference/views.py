"""Pages for chat. Plain functions; access goes through services' helpers."""

from datetime import timedelta

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from mixtralweb.accounts.access import may_manage_conversation, staff_required

from . import exchange, presets, selectors, services
from .models import LanguageModel, WorkerHeartbeat
from .workers import live_workers, serving_problem


def _conversation_or_404(user, conversation_id):
    try:
        return services.get_conversation_for_user(user, conversation_id)
    except services.ChatError:
        raise Http404("Conversation not found") from None


@login_required
def chat(request, conversation_id: int | None = None):
    conversation = None
    if conversation_id is not None:
        conversation = _conversation_or_404(request.user, conversation_id)
    query = request.GET.get("q", "").strip()
    visible = services.conversations_matching(request.user, query).select_related("owner", "team")
    my_presets, team_presets = _presets_by_group(request.user)
    return render(
        request,
        "inference/chat.html",
        {
            "conversation": conversation,
            "query": query,
            "my_conversations": visible.filter(owner=request.user)[:100],
            "team_conversations": visible.exclude(owner=request.user)[:100],
            "models": services.serving_models(),
            "all_models": LanguageModel.objects.filter(enabled=True),
            "teams": request.user.teams.all(),
            "default_params": services.DEFAULT_PARAMS,
            # The settings the next answer gets: the conversation's, else the defaults.
            "settings": {**services.DEFAULT_PARAMS, **(conversation and conversation.params or {})},
            "may_change_settings": (
                conversation is None or may_manage_conversation(request.user, conversation)
            ),
            "my_presets": my_presets,
            "team_presets": team_presets,
            "preset_data": presets.preset_data(
                my_presets + [p for _team, group in team_presets for p in group]
            ),
            # Just saved (the save form returns here with ?preset=): the script applies it.
            "chosen_preset": request.GET.get("preset", ""),
        },
    )


def _presets_by_group(user):
    """The user's own presets, and the others they see grouped by team:
    (mine, [(team, presets), ...])."""
    mine, by_team = [], {}
    for preset in presets.visible_presets(user):
        if preset.owner_id == user.pk:
            mine.append(preset)
        else:
            by_team.setdefault(preset.team, []).append(preset)
    return mine, sorted(by_team.items(), key=lambda item: (item[0].name, item[0].pk))


@login_required
@require_POST
def conversation_rename(request, conversation_id: int):
    _conversation_or_404(request.user, conversation_id)
    try:
        services.conversation_rename(
            user=request.user, conversation_id=conversation_id, title=request.POST.get("title")
        )
    except services.ChatError as exc:
        messages.error(request, str(exc))
    return redirect("conversation", conversation_id=conversation_id)


@login_required
def conversation_delete(request, conversation_id: int):
    conversation = _conversation_or_404(request.user, conversation_id)
    if request.method == "POST":
        try:
            services.conversation_delete(user=request.user, conversation_id=conversation_id)
        except services.ChatError as exc:
            messages.error(request, str(exc))
            return redirect("conversation", conversation_id=conversation_id)
        messages.success(request, f"Deleted “{conversation}”.")
        return redirect("chat")
    return render(request, "inference/conversation_delete.html", {"conversation": conversation})


@login_required
@require_POST
def conversation_share(request, conversation_id: int):
    _conversation_or_404(request.user, conversation_id)
    try:
        conversation = services.conversation_share(
            user=request.user,
            conversation_id=conversation_id,
            team_id=request.POST.get("team") or None,
        )
    except services.ChatError as exc:
        messages.error(request, str(exc))
    else:
        if conversation.team:
            messages.success(request, f"Shared with {conversation.team}.")
        else:
            messages.success(request, "No longer shared.")
    return redirect("conversation", conversation_id=conversation_id)


EXPORTS = {
    "md": ("text/markdown", exchange.export_markdown),
    "json": ("application/json", exchange.export_json),
}


@login_required
def conversation_export(request, conversation_id: int, fmt: str):
    """A download of the conversation: anyone who may see it may export it."""
    conversation = _conversation_or_404(request.user, conversation_id)
    content_type, render_export = EXPORTS[fmt]
    response = HttpResponse(
        render_export(conversation), content_type=f"{content_type}; charset=utf-8"
    )
    name = exchange.filename(conversation, fmt)
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@login_required
@require_POST
def conversation_import(request):
    """A new conversation of the user's from a JSON export (docs/export.md)."""
    upload = request.FILES.get("file")
    try:
        if upload is None:
            raise services.ChatError("Choose a JSON file to import.")
        exchange.check_size(upload.size)
        conversation, notes = exchange.import_conversation(user=request.user, raw=upload.read())
    except services.ChatError as exc:
        # A page that says why, with the form again (400: nothing was created).
        return render(
            request, "inference/conversation_import.html", {"error": str(exc)}, status=400
        )
    messages.success(request, f"Imported “{conversation}”.")
    for note in notes:
        messages.warning(request, note)
    return redirect("conversation", conversation_id=conversation.pk)


# --- chat presets ----------------------------------------------------------------------
def _back_to(request, default: str) -> str:
    """Where a form asks to return (a page of this site), else `default`."""
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default


def _wants_json(request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


@login_required
def presets_page(request):
    """/presets/: the user's presets (rename, delete) and those their teams share."""
    mine, shared = _presets_by_group(request.user)
    return render(request, "inference/presets.html", {"mine": mine, "shared": shared})


@login_required
@require_POST
def preset_create(request):
    """Save the chat's settings as a preset. The chat's script asks for JSON; a plain
    form post returns to the page it came from, which then applies the preset."""
    data = request.POST
    try:
        preset = presets.preset_create(
            user=request.user,
            name=data.get("name"),
            system_prompt=data.get("system_prompt", ""),
            params=presets.params_from_form(data),
            model_name=data.get("model_name", "") if data.get("include_model") else "",
            team_id=data.get("team") or None,
        )
    except services.ChatError as exc:
        if _wants_json(request):
            return JsonResponse({"error": str(exc), "code": exc.code}, status=400)
        # Without the script: the presets page says why (nothing was saved).
        messages.error(request, f"The preset was not saved: {exc}")
        mine, shared = _presets_by_group(request.user)
        context = {"mine": mine, "shared": shared}
        return render(request, "inference/presets.html", context, status=400)
    if _wants_json(request):
        return JsonResponse({"id": preset.pk, **presets.preset_data([preset])[str(preset.pk)]})
    messages.success(request, f"Saved the preset “{preset.name}”.")
    back = _back_to(request, reverse("chat")).split("?")[0]
    return redirect(f"{back}?preset={preset.pk}")


def _preset_action(request, action, **kwargs):
    """Rename or delete; a preset the user does not see is a 404."""
    try:
        return action(user=request.user, **kwargs)
    except services.ChatError as exc:
        if exc.code == "not_found":
            raise Http404("Preset not found") from None
        messages.error(request, str(exc))
        return None


@login_required
@require_POST
def preset_rename(request, preset_id: int):
    preset = _preset_action(
        request, presets.preset_rename, preset_id=preset_id, name=request.POST.get("name")
    )
    if preset is not None:
        messages.success(request, f"Renamed to “{preset.name}”.")
    return redirect("presets")


@login_required
@require_POST
def preset_delete(request, preset_id: int):
    preset = _preset_action(request, presets.preset_delete, preset_id=preset_id)
    if preset is not None:
        messages.success(request, f"Deleted the preset “{preset.name}”.")
    return redirect("presets")


@login_required
def status_page(request):
    """/status/: each model's state, queue and recent time to first token, for
    everyone logged in; no hosts, PIDs or paths (those are on the Workers page)."""
    workers = live_workers()
    statuses = [
        selectors.model_status(model, workers)
        for model in LanguageModel.objects.filter(enabled=True).order_by("name")
    ]
    return render(
        request,
        "inference/status.html",
        {"statuses": statuses, "recent": selectors.RECENT_ANSWERS, "now": timezone.now()},
    )


@staff_required
def workers_page(request):
    """/workers/: every model, whether a worker serves it, and each worker's state."""
    live = live_workers()
    live_ids = {(w["host"], w["pid"]) for w in live}
    gone = [
        row
        for row in WorkerHeartbeat.objects.filter(
            seen_at__gte=timezone.now() - timedelta(days=1)
        ).order_by("-seen_at")[:50]
        if (row.host, row.pid) not in live_ids
    ]
    models = [
        {"model": model, "problem": serving_problem(model.name, detail=True)}
        for model in LanguageModel.objects.filter(enabled=True)
    ]
    return render(
        request,
        "inference/workers.html",
        {"live": live, "gone": gone, "models": models},
    )
