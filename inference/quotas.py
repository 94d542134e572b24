"""Quotas and rate limits, applied to chat, jobs and the API alike.

Call check_quota() before creating a Generation; it raises QuotaExceeded with a
message for the user and the seconds after which to retry.

Three limits, for each user and for each team (a team's members together):
tokens per day (prompt + completion, from the metrics of today's generations),
generations started per minute, and generations queued or running at once. An
admin sets them per user or team (Quota rows in the admin); a user or team with no
Quota row, or a blank field in it, gets the default from settings. 0: no limit.
An API key may carry the same three limits for its own generations (blank: none);
they are checked with its owner's and teams', so the stricter one refuses first.
The database is the count, so every web process and worker agrees on it.

Counting and then inserting would let concurrent requests all count the same rows
and all pass. So check_quota locks the rows of the user and of the teams it checks
(select_for_update, in that order: no two checks wait on each other in a cycle)
before it counts, and the caller inserts the Generation in the same transaction:
the next check for that user or team waits for the commit and counts the new row.
On SQLite select_for_update does nothing, but every transaction begins IMMEDIATE
(settings), which serialises writers just as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Q, Sum, prefetch_related_objects
from django.utils import timezone

from mixtralweb.accounts.models import Quota, Team

from .models import Generation

# A concurrency limit frees up when a generation finishes, which no one can predict;
# this is how long a client is told to wait before asking again.
CONCURRENT_RETRY_AFTER_S = 5


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Limits:
    tokens_per_day: int
    requests_per_minute: int
    concurrent_generations: int


LIMIT_FIELDS = ("tokens_per_day", "requests_per_minute", "concurrent_generations")


def _limits(quota, prefix: str) -> Limits:
    values = {}
    for field in LIMIT_FIELDS:
        value = getattr(quota, field, None) if quota is not None else None
        if value is None:
            value = getattr(settings, f"{prefix}_{field.upper()}")
        values[field] = value
    return Limits(**values)


def start_of_day(now):
    """Midnight today in TIME_ZONE: token quotas reset then."""
    local = timezone.localtime(now)
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def tokens_used_today(generations, now) -> int:
    used = generations.filter(queued_at__gte=start_of_day(now)).aggregate(
        total=Sum(F("prompt_tokens") + F("completion_tokens"))
    )["total"]
    return used or 0


def user_limits(user) -> Limits:
    """The user's own limits (their Quota row, else the settings); 0: none."""
    return _limits(Quota.objects.filter(user=user).first(), "QUOTA_USER")


def key_limits(key) -> Limits:
    """The key's own limits; 0 where it sets none (only its owner's then apply)."""
    return Limits(**{field: getattr(key, field) or 0 for field in LIMIT_FIELDS})


def _key_generations(key):
    # A Generation records its key's name, not the key. The name is unique among the
    # user's unrevoked keys, and a revoked key's name is free again only once it is
    # revoked, so the key's generations are its user's under its name since it was
    # created: an earlier key of the same name made none of those.
    return Generation.objects.filter(
        user_id=key.user_id, api_key_name=key.name, queued_at__gte=key.created_at
    )


def _counted():
    # An imported answer was never run here: it costs nothing and starts nothing.
    return Generation.objects.exclude(source=Generation.SOURCE_IMPORT)


def _user_generations(user):
    return _counted().filter(user=user)


def _team_generations(team):
    return _counted().filter(Q(team=team) | Q(user__in=team.members.all()))


def describe_wait(seconds: int) -> str:
    """'42 s', '3 min', '2 h 5 min'."""
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _check(generations, limits: Limits, now, owner: str) -> None:
    """owner: "Your" or "Team Red's", the start of each message."""
    if limits.concurrent_generations:
        active = generations.filter(state__in=[Generation.QUEUED, Generation.RUNNING]).count()
        if active >= limits.concurrent_generations:
            raise QuotaExceeded(
                f"{owner} limit is {limits.concurrent_generations} generation(s) at once, and "
                f"{active} are queued or running. Try again when one finishes "
                f"(in about {CONCURRENT_RETRY_AFTER_S} s).",
                CONCURRENT_RETRY_AFTER_S,
            )
    if limits.requests_per_minute:
        window_start = now - timedelta(minutes=1)
        recent = list(
            generations.filter(queued_at__gt=window_start)
            .order_by("queued_at")
            .values_list("queued_at", flat=True)[: limits.requests_per_minute]
        )
        if len(recent) >= limits.requests_per_minute:
            # A slot frees when the oldest request in the window is a minute old.
            frees_at = recent[0] + timedelta(minutes=1)
            retry_after_s = max(1, math.ceil((frees_at - now).total_seconds()))
            raise QuotaExceeded(
                f"{owner} limit is {limits.requests_per_minute} generation(s) per minute, and "
                f"it has been reached. Try again in {describe_wait(retry_after_s)}.",
                retry_after_s,
            )
    if limits.tokens_per_day:
        used = tokens_used_today(generations, now)
        if used >= limits.tokens_per_day:
            resets_at = start_of_day(now) + timedelta(days=1)
            retry_after_s = max(1, math.ceil((resets_at - now).total_seconds()))
            raise QuotaExceeded(
                f"{owner} limit is {limits.tokens_per_day:,} tokens per day, and {used:,} "
                f"have been used today. It resets at midnight ({settings.TIME_ZONE}); try "
                f"again in {describe_wait(retry_after_s)}.",
                retry_after_s,
            )


def _quotas_of(user, team=None) -> list:
    """The Quota rows of `user`, of their teams and of `team`."""
    mine = Q(user=user) | Q(team__memberships__user=user)
    if team is not None:
        mine |= Q(team=team)
    return list(Quota.objects.filter(mine).distinct())


def _team_defaults_limit() -> bool:
    return any(getattr(settings, f"QUOTA_TEAM_{field.upper()}") for field in LIMIT_FIELDS)


def check_quota(*, user, team=None, api_key=None, source: str = "chat") -> None:
    """Raise QuotaExceeded if `user` (or one of their teams, or `team`, or `api_key`,
    the key of an API request) may not start a generation now. `source` (chat, job,
    api) is accepted for callers' clarity; the limits are the same for all.

    Call it inside the transaction that then creates the Generation: the rows it
    locks stay locked until that commits, so concurrent checks count one another.

    It runs before every message is queued, so the Quota rows of the user and of
    all their teams come in one query; the teams themselves are read only when one
    has a quota or the settings give teams a default limit (by default they do not)."""
    with transaction.atomic():
        _check_locked(user, team, api_key)


def _check_locked(user, team, api_key) -> None:
    # Locked before counting, so the count includes every generation whose check
    # went before ours: the user's row, then the row of each team with a limit.
    _lock(get_user_model().objects.filter(pk=user.pk))
    quotas = _quotas_of(user, team)
    user_quota = next((q for q in quotas if q.user_id == user.pk), None)
    team_quotas = {q.team_id: q for q in quotas if q.team_id is not None}
    if _team_defaults_limit():
        teams = {t.pk: t for t in user.teams.all()}
        if team is not None:
            teams.setdefault(team.pk, team)
    else:
        prefetch_related_objects(list(team_quotas.values()), "team")
        teams = {pk: q.team for pk, q in team_quotas.items()}
    _lock(Team.objects.filter(pk__in=teams))
    now = timezone.now()
    _check(_user_generations(user), _limits(user_quota, "QUOTA_USER"), now, "Your")
    for pk, each in teams.items():
        limits = _limits(team_quotas.get(pk), "QUOTA_TEAM")
        _check(_team_generations(each), limits, now, f"Team {each.name}'s")
    if api_key is not None:
        # The key's generations are some of its user's, whose row is locked above:
        # concurrent checks of the key count one another too.
        _check(_key_generations(api_key), key_limits(api_key), now, "This API key's")


def _lock(rows) -> None:
    """Lock the rows, in id order (a fixed order: two checks never wait in a cycle).
    NO KEY UPDATE: checks wait for one another, but not the key locks that rows
    referring to a user or team take."""
    list(rows.select_for_update(no_key=True).order_by("pk").values_list("pk", flat=True))
