"""Invitations: a staff member or a team admin creates a one-time sign-up link.

The link carries a random token; only its hash is stored (Invitation.token_hash), so
the link is shown once, when it is made. Using it asks again whether its inviter may
still invite to its team: a team admin who has since lost the role, or left, or whose
account is disabled, invites nobody. Team admins and staff revoke open links.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from . import access
from .models import Invitation, Membership, Team

DEFAULT_VALID_DAYS = 7


class InvitationForm(forms.Form):
    email = forms.EmailField(
        required=False, help_text="For your records; the link works for anyone who has it."
    )
    team = forms.ModelChoiceField(queryset=Team.objects.none(), required=False)
    role = forms.ChoiceField(choices=Membership.ROLE_CHOICES, initial=Membership.MEMBER)
    valid_days = forms.IntegerField(min_value=1, max_value=90, initial=DEFAULT_VALID_DAYS)

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.fields["team"].queryset = access.teams_administered(user)
        if not user.is_staff:
            self.fields["team"].required = True

    def clean(self):
        data = super().clean()
        if data.get("role") == Membership.ADMIN and not data.get("team"):
            raise forms.ValidationError("A team admin invitation needs a team.")
        return data


def invitation_create(
    *, created_by, email: str, team, role: str, valid_days: int
) -> tuple[Invitation, str]:
    """A new invitation and its token, which is never available again."""
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        token_hash=Invitation.hash_token(token),
        email=email,
        team=team,
        role=role,
        created_by=created_by,
        expires_at=timezone.now() + timedelta(days=valid_days),
    )
    return invitation, token


def invitation_refusal(invitation: Invitation) -> str | None:
    """Why this invitation cannot be used now, in words; None if it can."""
    reasons = {
        "accepted": "It has already been used.",
        "revoked": "It has been revoked.",
        "expired": f"It expired on {invitation.expires_at:%Y-%m-%d}.",
    }
    if invitation.state in reasons:
        return reasons[invitation.state]
    inviter = invitation.created_by
    if not inviter.is_active or not access.may_invite_to(inviter, invitation.team):
        return "Whoever created it may no longer invite people to this team."
    return None


@login_required
def invitations(request):
    if not access.is_staff(request.user) and not access.teams_administered(request.user).exists():
        raise PermissionDenied("Only staff and team admins can invite people.")
    form = InvitationForm(request.POST or None, user=request.user)
    link = None
    if request.method == "POST" and form.is_valid():
        _, token = invitation_create(created_by=request.user, **form.cleaned_data)
        link = request.build_absolute_uri(reverse("invitation_accept", args=[token]))
        form = InvitationForm(user=request.user)
    visible = access.invitations(
        request.user, Invitation.objects.select_related("team", "accepted_by", "created_by")
    )
    return render(
        request,
        "accounts/invitations.html",
        {"form": form, "link": link, "invitations": visible[:100]},
    )


@login_required
@require_POST
def invitation_revoke(request, invitation_id: int):
    invitation = get_object_or_404(Invitation, pk=invitation_id)
    if not access.may_revoke_invitation(request.user, invitation):
        raise Http404("No such invitation")
    invitation.revoke()
    messages.success(request, f"{invitation} is revoked: its link no longer works.")
    back = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
        return redirect(back)  # the team's page, where it was revoked
    return redirect("invitations")


def invitation_accept(request, token: str):
    invitation = (
        Invitation.objects.select_related("team", "created_by")
        .filter(token_hash=Invitation.hash_token(token))
        .first()
    )
    if invitation is None:
        raise Http404("No such invitation")
    if refusal := invitation_refusal(invitation):
        return _refused(request, refusal)
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            # Locked, and read again: a second use, a revocation or the team's
            # deletion may have happened since the page was shown.
            locked = Invitation.objects.select_for_update().filter(pk=invitation.pk).first()
            if locked is None:
                return _refused(request, "Its team no longer exists.")
            if refusal := invitation_refusal(locked):
                return _refused(request, refusal)
            user = form.save(commit=False)
            user.email = locked.email
            user.save()
            if locked.team:
                Membership.objects.create(team=locked.team, user=user, role=locked.role)
            locked.accepted_by, locked.accepted_at = user, timezone.now()
            locked.save(update_fields=["accepted_by", "accepted_at"])
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome, {user.get_username()}!")
        return redirect("chat")
    return render(
        request, "accounts/invitation_accept.html", {"form": form, "invitation": invitation}
    )


def _refused(request, reason: str):
    return render(request, "accounts/invitation_used.html", {"reason": reason}, status=410)
