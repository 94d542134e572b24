"""Invitations: a staff member or a team admin creates a one-time sign-up link."""

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
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone

from .models import Invitation, Membership, Team

DEFAULT_VALID_DAYS = 7


def teams_user_can_invite_to(user):
    if user.is_staff:
        return Team.objects.all()
    return Team.objects.filter(memberships__user=user, memberships__role=Membership.ADMIN)


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
        self.fields["team"].queryset = teams_user_can_invite_to(user)
        if not user.is_staff:
            self.fields["team"].required = True

    def clean(self):
        data = super().clean()
        if data.get("role") == Membership.ADMIN and not data.get("team"):
            raise forms.ValidationError("A team admin invitation needs a team.")
        return data


def invitation_create(*, created_by, email: str, team, role: str, valid_days: int) -> Invitation:
    return Invitation.objects.create(
        token=secrets.token_urlsafe(32),
        email=email,
        team=team,
        role=role,
        created_by=created_by,
        expires_at=timezone.now() + timedelta(days=valid_days),
    )


@login_required
def invitations(request):
    if not request.user.is_staff and not teams_user_can_invite_to(request.user).exists():
        raise PermissionDenied("Only staff and team admins can invite people.")
    form = InvitationForm(request.POST or None, user=request.user)
    link = None
    if request.method == "POST" and form.is_valid():
        invitation = invitation_create(created_by=request.user, **form.cleaned_data)
        link = request.build_absolute_uri(reverse("invitation_accept", args=[invitation.token]))
        form = InvitationForm(user=request.user)
    mine = Invitation.objects.select_related("team", "accepted_by")
    if not request.user.is_staff:
        mine = mine.filter(created_by=request.user)
    return render(
        request,
        "accounts/invitations.html",
        {"form": form, "link": link, "invitations": mine[:100]},
    )


def invitation_accept(request, token: str):
    invitation = Invitation.objects.select_related("team").filter(token=token).first()
    if invitation is None:
        raise Http404("No such invitation")
    if not invitation.is_usable:
        return render(
            request, "accounts/invitation_used.html", {"invitation": invitation}, status=410
        )
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            locked = Invitation.objects.select_for_update().get(pk=invitation.pk)
            if not locked.is_usable:
                return render(
                    request, "accounts/invitation_used.html", {"invitation": locked}, status=410
                )
            user = form.save(commit=False)
            user.email = invitation.email
            user.save()
            if invitation.team:
                Membership.objects.create(team=invitation.team, user=user, role=invitation.role)
            locked.accepted_by, locked.accepted_at = user, timezone.now()
            locked.save(update_fields=["accepted_by", "accepted_at"])
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome, {user.get_username()}!")
        return redirect("chat")
    return render(
        request, "accounts/invitation_accept.html", {"form": form, "invitation": invitation}
    )
