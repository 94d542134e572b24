"""The account's API keys page: create and revoke keys; team admins see their
members' keys and what each used."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, F, Sum
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from inference.models import Generation
from mixtralweb.accounts.models import ApiKey, Team

USAGE_DAYS = 30
# The new key's secret waits here, in the session, for the one page view that shows it.
NEW_SECRET_SESSION_KEY = "api_key_new_secret"


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        help_text="Say where it is used, e.g. 'laptop editor'. Recorded with each request.",
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("Give the key a name.")
        if ApiKey.objects.active().filter(user=self.user, name=name).exists():
            raise forms.ValidationError(f"You already have a key named {name!r}.")
        return name


def key_usage(keys, *, days: int = USAGE_DAYS) -> dict[tuple[int, str], dict]:
    """Requests and tokens per (user id, key name) over the last `days` days."""
    since = timezone.now() - timedelta(days=days)
    rows = (
        Generation.objects.filter(
            source=Generation.SOURCE_API,
            queued_at__gte=since,
            user_id__in={key.user_id for key in keys},
            api_key_name__in={key.name for key in keys},
        )
        .values("user_id", "api_key_name")
        .annotate(
            requests=Count("id"),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
        )
    )
    return {(row["user_id"], row["api_key_name"]): row for row in rows}


def _with_usage(keys) -> list[ApiKey]:
    keys = list(keys)
    usage = key_usage(keys)
    for key in keys:
        row = usage.get((key.user_id, key.name), {})
        key.requests = row.get("requests", 0)
        key.tokens = row.get("tokens") or 0
    return keys


def administered_teams(user):
    teams = Team.objects.all() if user.is_staff else user.teams.all()
    return [team for team in teams if team.is_admin(user)]


@login_required
def api_keys(request):
    if request.method == "POST":
        form = ApiKeyForm(request.POST, user=request.user)
        if form.is_valid():
            key, secret = ApiKey.issue(user=request.user, name=form.cleaned_data["name"])
            request.session[NEW_SECRET_SESSION_KEY] = {"id": key.pk, "secret": secret}
            return redirect("api_keys")
    else:
        form = ApiKeyForm(user=request.user)
    new = request.session.pop(NEW_SECRET_SESSION_KEY, None)
    teams = [
        {
            "team": team,
            "keys": _with_usage(
                ApiKey.objects.filter(user__memberships__team=team)
                .exclude(user=request.user)
                .select_related("user")
                .order_by("user__username", "-created_at")
            ),
        }
        for team in administered_teams(request.user)
    ]
    return render(
        request,
        "inference/api_keys.html",
        {
            "form": form,
            "keys": _with_usage(request.user.api_keys.all()),
            "new_secret": new["secret"] if new else None,
            "new_key_id": new["id"] if new else None,
            "example_model": settings.DEFAULT_MODEL_NAME,
            "teams": teams,
            "usage_days": USAGE_DAYS,
        },
    )


@login_required
@require_POST
def api_key_revoke(request, key_id: int):
    key = get_object_or_404(ApiKey, pk=key_id, user=request.user)
    key.revoke()
    messages.success(request, f"The key {key.name!r} is revoked; requests with it are refused.")
    return redirect("api_keys")
