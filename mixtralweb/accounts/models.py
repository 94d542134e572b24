"""Accounts and teams: teams (a user may belong to several, as a member or as a team
admin), API keys, and the quotas admins set."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="Membership", related_name="teams"
    )

    class Meta:
        db_table = "mixtralweb_team"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def is_admin(self, user) -> bool:
        return user.is_staff or self.memberships.filter(user=user, role=Membership.ADMIN).exists()


class Membership(models.Model):
    MEMBER = "member"
    ADMIN = "admin"
    ROLE_CHOICES = [(MEMBER, "Member"), (ADMIN, "Team admin")]

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=10, choices=ROLE_CHOICES, default=MEMBER)

    class Meta:
        db_table = "mixtralweb_membership"
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="one_membership")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class ApiKeyQuerySet(models.QuerySet):
    def active(self):
        """Not revoked (an expired key still holds its name until it is revoked)."""
        return self.filter(revoked_at__isnull=True)


class ApiKeyExpired(Exception):
    """The secret is right, but its key expired: the API says so instead of a plain
    'incorrect key'."""

    def __init__(self, key: ApiKey):
        super().__init__(f"This API key expired on {key.expires_at_display}.")
        self.key = key


def _key_limit(help_text: str):
    # Blank: only the owner's own limits apply. No 0 here: a key cannot lift a limit.
    return models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text=help_text
    )


class ApiKey(models.Model):
    """A secret that lets a script call the OpenAI-compatible API as its owner.

    Only a SHA-256 hash of the secret is stored. A key is 32 random bytes, so a fast
    hash is enough: there is nothing to guess a dictionary for. The prefix (the first
    characters of the secret) lets the owner recognise a key on the keys page.
    """

    TOKEN_PREFIX = "mxw-"
    DISPLAY_PREFIX_CHARS = 12
    # How fresh last_used_at is kept: to the minute.
    LAST_USED_RESOLUTION = timedelta(minutes=1)

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100, help_text="Recorded with every request it makes.")
    prefix = models.CharField(max_length=20, help_text="The first characters, for recognition.")
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="From then on it is refused. Blank: never."
    )
    # The key's own limits, checked with (never instead of) its owner's and teams'
    # (inference/quotas.py): the stricter one refuses first.
    requests_per_minute = _key_limit("Generations this key starts per minute. Blank: none.")
    tokens_per_day = _key_limit("Prompt + completion tokens of this key per day. Blank: none.")
    concurrent_generations = _key_limit("This key's generations queued or running at once.")

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        db_table = "mixtralweb_apikey"
        ordering = ["-created_at"]
        verbose_name = "API key"
        constraints = [
            models.UniqueConstraint(
                fields=["user", "name"],
                condition=models.Q(revoked_at__isnull=True),
                name="one_active_api_key_name_per_user",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @property
    def state(self) -> str:
        """revoked, expired or active."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.is_expired() else "active"

    @property
    def expires_at_display(self) -> str:
        """'2027-01-31 00:00 UTC', in TIME_ZONE."""
        local = timezone.localtime(self.expires_at)
        return f"{local:%Y-%m-%d %H:%M} {local.tzname()}"

    @staticmethod
    def hash_secret(secret: str) -> str:
        return hashlib.sha256(secret.encode("utf-8")).hexdigest()

    @classmethod
    def issue(cls, *, user, name: str, **options) -> tuple[ApiKey, str]:
        """Create a key; returns it with its secret, which is never available again.
        options: expires_at and the key's own limits."""
        secret = cls.TOKEN_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            user=user,
            name=name,
            prefix=secret[: cls.DISPLAY_PREFIX_CHARS],
            secret_hash=cls.hash_secret(secret),
            **options,
        )
        return key, secret

    @classmethod
    def authenticate(cls, secret: str) -> ApiKey | None:
        """The active key with this secret, its last-used time updated; else None.
        Raises ApiKeyExpired for an expired key (whose last use is not updated)."""
        if not secret or not secret.startswith(cls.TOKEN_PREFIX):
            return None
        key = (
            cls.objects.active()
            .select_related("user")
            .filter(secret_hash=cls.hash_secret(secret), user__is_active=True)
            .first()
        )
        now = timezone.now()
        if key is not None and key.is_expired(now):
            raise ApiKeyExpired(key)
        if key is not None and (
            key.last_used_at is None or now - key.last_used_at >= cls.LAST_USED_RESOLUTION
        ):
            # Written at most once a minute: not a write and a commit before every
            # call's first token.
            key.last_used_at = now
            cls.objects.filter(pk=key.pk).update(last_used_at=now)
        return key

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])


class Quota(models.Model):
    """Limits for one user or one team, set by an admin.

    A blank limit falls back to the default in settings (QUOTA_USER_* or QUOTA_TEAM_*);
    0 means no limit. A team's limits apply to its members' generations together.
    """

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="quota",
    )
    team = models.OneToOneField(
        Team, on_delete=models.CASCADE, null=True, blank=True, related_name="quota"
    )
    tokens_per_day = models.PositiveIntegerField(
        null=True, blank=True, help_text="Prompt + completion tokens per day. 0: no limit."
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Generations started per minute. 0: no limit."
    )
    concurrent_generations = models.PositiveIntegerField(
        null=True, blank=True, help_text="Generations queued or running at once. 0: no limit."
    )

    class Meta:
        db_table = "mixtralweb_quota"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False, team__isnull=True)
                | models.Q(user__isnull=True, team__isnull=False),
                name="quota_for_a_user_or_a_team",
            )
        ]

    def __str__(self) -> str:
        return f"Quota of {self.user or self.team}"


class InvitationQuerySet(models.QuerySet):
    def open(self):
        """Neither used, revoked nor expired."""
        return self.filter(
            accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
        )


class Invitation(models.Model):
    """A one-time sign-up link a staff member or a team admin sends to a new user,
    optionally into a team.

    Like an API key, only a SHA-256 hash of the link's token is stored: the raw token
    is in the link, shown once to whoever created it. A link works while it is unused,
    unrevoked and unexpired, and while its inviter may still invite to its team
    (mixtralweb/accounts/invitations.py checks that at acceptance).
    """

    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    email = models.EmailField(blank=True)
    team = models.ForeignKey(
        Team, on_delete=models.CASCADE, null=True, blank=True, related_name="invitations"
    )
    role = models.CharField(
        max_length=10, choices=Membership.ROLE_CHOICES, default=Membership.MEMBER
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    accepted_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = InvitationQuerySet.as_manager()

    class Meta:
        db_table = "mixtralweb_invitation"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Invitation for {self.email or 'anyone'} ({self.team or 'no team'})"

    @staticmethod
    def hash_token(token: str) -> str:
        # 32 random bytes: a fast hash is enough, there is no dictionary to try.
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    @property
    def state(self) -> str:
        """accepted, revoked, expired or open."""
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "open"

    @property
    def is_usable(self) -> bool:
        return self.state == "open"

    def revoke(self) -> None:
        if self.is_usable:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])
