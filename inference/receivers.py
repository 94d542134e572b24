"""When what a user may see changes, their open sockets hear of it at once.

A socket re-checks what it follows on `access.changed` and ends on `access.revoked`
(inference/consumers.py): a team-mate removed from the team, a conversation no
longer shared or deleted, a user logged out or deactivated stops receiving turns
and tokens then, not at their next reload.

Also: an answer that leaves the queue without a worker tells its model's status
watchers (inference/status.py).
"""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from mixtralweb import namespace
from mixtralweb.accounts.models import Membership

from . import status
from .models import Generation
from .signals import generation_finished
from .streams import announce

log = logging.getLogger(__name__)


def tell(group: str, message: dict) -> None:
    """Send after the commit; a failure is logged, never raised into the change."""

    def send() -> None:
        try:
            announce(group, message)
        except Exception:  # noqa: BLE001 - the sockets re-check on their next frame
            log.exception("could not tell %s of an access change", group)

    transaction.on_commit(send)


def access_changed_for_user(user_id: int) -> None:
    tell(namespace.group("user", user_id), {"type": "access.changed"})


def access_changed_for_conversation(conversation_id: int) -> None:
    tell(namespace.conversation_group(conversation_id), {"type": "access.changed"})


@receiver(post_save, sender=Membership, dispatch_uid="inference.membership_saved")
@receiver(post_delete, sender=Membership, dispatch_uid="inference.membership_deleted")
def _membership_changed(sender, instance: Membership, **kwargs) -> None:
    access_changed_for_user(instance.user_id)


@receiver(post_save, sender=get_user_model(), dispatch_uid="inference.user_saved")
def _user_deactivated(sender, instance, created: bool, **kwargs) -> None:
    if not created and not instance.is_active:
        tell(
            namespace.group("user", instance.pk),
            {"type": "access.revoked", "message": "This account was deactivated."},
        )


@receiver(user_logged_out, dispatch_uid="inference.user_logged_out")
def _logged_out(sender, request, user, **kwargs) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        tell(
            namespace.group("session", session_key),
            {"type": "access.revoked", "message": "You logged out."},
        )


@receiver(generation_finished, sender=Generation, dispatch_uid="inference.status_after_queue")
def _left_the_queue(sender, generation: Generation, **kwargs) -> None:
    """An answer that ended before any worker started it (stopped while queued, or
    failed by the reaper) leaves the queue: its model's status may change. One a
    worker ran is announced by that worker's heartbeat."""
    if generation.started_at is None:
        status.announce_model_id(generation.model_id)
