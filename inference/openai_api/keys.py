"""The account's API keys page: create keys (with an expiry and limits of their own)
and revoke them; team admins see their members' keys and what each used."""

from __future__ import annotations

from datetime import datetime, time, timedelta

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, F, Sum
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.timesince import timesince
from django.views.decorators.http import require_POST

from inference.models import Generation
from inference.quotas import LIMIT_FIELDS, user_limits
from mixtralweb.accounts.models import ApiKey, Team

USAGE_DAYS = 30
# The new key's secret waits here, in the session, for the one page view that shows it.
NEW_SECRET_SESSION_KEY = "api_key_new_secret"


EXPIRY_CHOICES = [
    ("never", "Never"),
    ("30", "In 30 days"),
    ("90", "In 90 days"),
    ("date", "On the date below"),
]
# How each limit reads in a message: "... 30 {unit}".
LIMIT_UNITS = {
    "requests_per_minute": "requests per minute",
    "tokens_per_day": "tokens per day",
    "concurrent_generations": "generations at once",
}


def _limit_field(label: str) -> forms.IntegerField:
    return forms.IntegerField(
        label=label,
        required=False,
        min_value=1,
        widget=forms.NumberInput(attrs={"inputmode": "numeric"}),
    )


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        help_text="Say where it is used, e.g. 'laptop editor'. Recorded with each request.",
    )
    # Not required: a form posted without it (an older page, a script) makes a key
    # that never expires, as before.
    expires = forms.ChoiceField(
        label="Expires", choices=EXPIRY_CHOICES, initial="never", required=False
    )
    expires_on = forms.DateField(
        label="Expiry date",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="The key is refused from the start of that day.",
    )
    requests_per_minute = _limit_field("Requests per minute")
    tokens_per_day = _limit_field("Tokens per day")
    concurrent_generations = _limit_field("Generations at once")

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.user_limits = user_limits(user)
        for field in LIMIT_FIELDS:
            mine = getattr(self.user_limits, field)
            self.fields[field].help_text = (
                f"Yours: {mine:,}. Blank: yours applies." if mine else "Blank: no key limit."
            )
            if mine:
                self.fields[field].widget.attrs["max"] = mine

    def limit_fields(self):
        """The limits' bound fields, for the template's loop."""
        return [self[field] for field in LIMIT_FIELDS]

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("Give the key a name.")
        same = ApiKey.objects.active().filter(user=self.user, name=name).first()
        if same is not None:
            hint = " It has expired: revoke it to use its name again." if same.is_expired() else ""
            raise forms.ValidationError(f"You already have a key named {name!r}.{hint}")
        return name

    def clean(self):
        data = super().clean()
        data["expires_at"] = self._expires_at(data.get("expires"), data.get("expires_on"))
        for field in LIMIT_FIELDS:
            # Under the user's own limit (0: they have none): a key only narrows it.
            mine, wanted = getattr(self.user_limits, field), data.get(field)
            if mine and wanted is not None and wanted > mine:
                self.add_error(
                    field,
                    f"Your own limit is {mine:,} {LIMIT_UNITS[field]}; a key's limit "
                    f"cannot be above it. Leave it blank to use yours.",
                )
        return data

    def _expires_at(self, choice, on):
        if "expires_on" in self.errors:  # not a date: already said
            return None
        if choice == "date":
            if on is None:
                self.add_error("expires_on", "Choose the date on which the key expires.")
                return None
            if on <= timezone.localdate():
                self.add_error("expires_on", "Choose a date after today.")
                return None
            return timezone.make_aware(datetime.combine(on, time.min))
        if on is not None:
            self.add_error("expires_on", "A date is given, but Expires is not 'On the date below'.")
            return None
        if choice in {"30", "90"}:
            return timezone.now() + timedelta(days=int(choice))
        return None

    def key_options(self) -> dict:
        """What ApiKey.issue takes besides the user and the name."""
        data = self.cleaned_data
        return {"expires_at": data["expires_at"]} | {f: data.get(f) for f in LIMIT_FIELDS}


def key_usage(keys, *, days: int = USAGE_DAYS) -> dict[tuple[int, str], dict]:
    """Requests and tokens per (user id, key name) over the last `days` days."""
    since = timezone.now() - timedelta(days=days)
    rows = (
        Generation.objects.filter(
            source__in=[Generation.SOURCE_API, Generation.SOURCE_BATCH],
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


def last_used_label(when, now) -> str:
    """'never', 'just now' or '5 minutes ago' (last_used_at is kept to the minute)."""
    if when is None:
        return "never"
    if now - when < ApiKey.LAST_USED_RESOLUTION:
        return "just now"
    return f"{timesince(when, now, depth=1)} ago"


def _with_usage(keys) -> list[ApiKey]:
    keys = list(keys)
    usage = key_usage(keys)
    now = timezone.now()
    for key in keys:
        row = usage.get((key.user_id, key.name), {})
        key.requests = row.get("requests", 0)
        key.tokens = row.get("tokens") or 0
        key.last_used_label = last_used_label(key.last_used_at, now)
        key.limits = [
            f"{getattr(key, field):,} {LIMIT_UNITS[field]}"
            for field in LIMIT_FIELDS
            if getattr(key, field)
        ]
    return keys


def administered_teams(user):
    teams = Team.objects.all() if user.is_staff else user.teams.all()
    return [team for team in teams if team.is_admin(user)]


@login_required
def api_keys(request):
    if request.method == "POST":
        form = ApiKeyForm(request.POST, user=request.user)
        if form.is_valid():
            key, secret = ApiKey.issue(
                user=request.user, name=form.cleaned_data["name"], **form.key_options()
            )
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
