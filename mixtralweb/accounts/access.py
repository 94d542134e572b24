"""Who may see, act on and administer what. Every view, consumer and API endpoint
asks here; nothing else decides.

The cast, as the tests name them:
- a thing's **owner** sees it and does anything with it;
- a **team member**, when the owner shares a conversation or a job with the team,
  sees it, follows it live, exports it, may post the next message and stop an
  answer, but may not edit the owner's messages, change its settings, rename,
  share or delete it; a chat preset shared with the team they see and apply, but
  do not rename or delete (a team admin neither: a preset is its owner's);
- anyone signed in may import a conversation from a file: it becomes their own;
- a **team admin** also sees the team's usage and invites people to the team;
- **staff** administer the deployment: everyone's usage and metrics, the workers,
  the GPUs and the planner; they do not read other people's conversations;
- an **outsider** (no shared team) and **anonymous** see nothing of it.

It names the other apps' models by their fields and imports none of them: the
accounts app is the bottom layer (accounts <- inference <- monitoring).
"""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet

from .models import Membership, Team


def _member_of(team_field: str, user) -> Q:
    return Q(**{f"{team_field}__memberships__user": user})


def _signed_in(user) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active)


# --- conversations -----------------------------------------------------------------
def conversations(user, queryset: QuerySet) -> QuerySet:
    """The conversations the user may see: their own and those shared with a team of
    theirs."""
    if not _signed_in(user):
        return queryset.none()
    return queryset.filter(Q(owner=user) | _member_of("team", user)).distinct()


def may_see_conversation(user, conversation) -> bool:
    if not _signed_in(user):
        return False
    return conversation.owner_id == user.pk or _in_team(user, conversation.team_id)


def may_post(user, conversation) -> bool:
    """Send the next message: owner and team."""
    return may_see_conversation(user, conversation)


def may_manage_conversation(user, conversation) -> bool:
    """Rename, share, delete, change its settings (parameters, system prompt, model,
    dropping its oldest turns), edit anyone's messages: the owner."""
    return _signed_in(user) and conversation.owner_id == user.pk


def may_replace_turns(user, conversation, authors) -> bool:
    """Edit a message or regenerate an answer, which replaces the turns from that
    question on. `authors`: the user ids of the questions replaced. The owner may;
    a team member only when every one of those questions is theirs."""
    if may_manage_conversation(user, conversation):
        return True
    return may_post(user, conversation) and all(a == user.pk for a in authors)


# --- generations (chat answers, API calls, job passes) ---------------------------------
def generations(user, queryset: QuerySet) -> QuerySet:
    """The generations whose text the user may read: their own; a chat answer in a
    conversation they may see; a pass of a job shared with their team."""
    if not _signed_in(user):
        return queryset.none()
    return queryset.filter(
        Q(user=user)
        | Q(conversation__owner=user)
        | _member_of("conversation__team", user)
        | (Q(source="job") & _member_of("team", user))
    ).distinct()


def may_stop(user, generation) -> bool:
    """Anyone who may read an answer may stop it (the conversation says who did)."""
    return generations(user, type(generation).objects.filter(pk=generation.pk)).exists()


# --- jobs ------------------------------------------------------------------------------
def jobs(user, queryset: QuerySet) -> QuerySet:
    if not _signed_in(user):
        return queryset.none()
    return queryset.filter(Q(user=user) | _member_of("team", user)).distinct()


def may_manage_job(user, job) -> bool:
    """Run, discard or cancel a job: its owner."""
    return _signed_in(user) and job.user_id == user.pk


# --- chat presets ----------------------------------------------------------------------
def presets(user, queryset: QuerySet) -> QuerySet:
    """The presets the user sees and may apply: their own and those shared with a
    team of theirs."""
    if not _signed_in(user):
        return queryset.none()
    return queryset.filter(Q(owner=user) | _member_of("team", user)).distinct()


def may_manage_preset(user, preset) -> bool:
    """Rename or delete a preset: its owner only, as with conversations and jobs. A
    team admin does not curate members' shared presets; they are the owner's."""
    return _signed_in(user) and preset.owner_id == user.pk


# --- teams -----------------------------------------------------------------------------
def _in_team(user, team_id) -> bool:
    return bool(team_id) and Membership.objects.filter(team_id=team_id, user=user).exists()


def teams_of(user) -> QuerySet:
    """Teams the user belongs to (to share with, to pick a job's team)."""
    if not _signed_in(user):
        return Team.objects.none()
    return Team.objects.filter(memberships__user=user)


def teams_administered(user) -> QuerySet:
    """Teams whose usage the user sees and to which they may invite: every team for
    staff, else the teams where they are an admin."""
    if not _signed_in(user):
        return Team.objects.none()
    if user.is_staff:
        return Team.objects.all()
    return Team.objects.filter(memberships__user=user, memberships__role=Membership.ADMIN)


def may_administer_team(user, team) -> bool:
    return teams_administered(user).filter(pk=team.pk).exists()


# --- invitations -------------------------------------------------------------------------
def may_invite_to(user, team) -> bool:
    """Create an invitation (to `team`, or to no team when None): staff anywhere, team
    admins to their teams. Asked again when the link is used: an inviter who has lost
    the right since then invites nobody."""
    if team is None:
        return is_staff(user)
    return may_administer_team(user, team)


def invitations(user, queryset: QuerySet) -> QuerySet:
    """Invitations the user sees and may revoke: all for staff; else those they made
    and those to the teams they administer."""
    if not _signed_in(user):
        return queryset.none()
    if user.is_staff:
        return queryset
    return queryset.filter(Q(created_by=user) | Q(team__in=teams_administered(user)))


def may_revoke_invitation(user, invitation) -> bool:
    return invitations(user, type(invitation).objects.filter(pk=invitation.pk)).exists()


# --- usage and metrics -------------------------------------------------------------------
def usage_of(user, queryset: QuerySet, user_field: str = "user") -> QuerySet:
    """Usage rows (metrics, not text) the user may see: their own; their teams'
    members' where they are a team admin; everyone's for staff."""
    if not _signed_in(user):
        return queryset.none()
    if user.is_staff:
        return queryset
    administered = teams_administered(user).values("memberships__user")
    return queryset.filter(Q(**{user_field: user}) | Q(**{f"{user_field}__in": administered}))


def is_staff(user) -> bool:
    """The deployment's administrators: usage of everyone, workers, GPUs."""
    return _signed_in(user) and user.is_staff


def staff_required(view):
    """A page for staff only: anonymous visitors are sent to log in, others get 403."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not is_staff(request.user):
            raise PermissionDenied("Staff only.")
        return view(request, *args, **kwargs)

    return wrapper
