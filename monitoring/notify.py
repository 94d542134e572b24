"""Alert delivery: a webhook (ALERT_WEBHOOK_URL) and e-mail (ALERT_EMAILS, or staff).

Each message is a Celery task on the ops queue, sent once the evaluation's
transaction commits: a slow or failing receiver holds up no evaluation and no
model worker. Like every task here it is acknowledged late: an ops worker lost
mid-send sends it again rather than losing it. The webhook is retried with
exponential backoff (Celery's autoretry) and each try has a timeout; e-mail goes
through Django's backend (EMAIL_URL or EMAIL_*), with EMAIL_TIMEOUT, retried the
same way.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from celery import shared_task
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.urls import reverse

from monitoring.models import Alert

log = logging.getLogger(__name__)

# Slack and Mattermost show these as emoji; other receivers see the words.
ICONS = {
    "firing": ":rotating_light:",
    "repeat": ":rotating_light:",
    "resolved": ":white_check_mark:",
}
WORDS = {"firing": "ALERT", "repeat": "STILL", "resolved": "RESOLVED"}


def payload(event: str, alert: Alert) -> dict:
    """The webhook's JSON body: `text` for Slack and Mattermost, and the fields."""
    link = f"{settings.SITE_URL}{reverse('alerts')}" if settings.SITE_URL else ""
    text = f"{ICONS[event]} [{WORDS[event]}] {alert.subject}"
    if event == "resolved":
        ended = "acknowledged" if alert.is_event and alert.acknowledged_by else "ended"
        text += f" ({ended} after {_duration(alert)})"
        if ended == "acknowledged":
            text += f" by {alert.acknowledged_by.get_username()}"
    else:
        text += f"\n{alert.message}"
    if link:
        text += f"\n<{link}|Alerts page>"
    return {
        "text": text,
        "event": event,
        "site": settings.SITE_NAME,
        "alert": {
            "id": alert.pk,
            "key": alert.key,
            "kind": alert.kind,
            "subject": alert.subject,
            "message": alert.message,
            "details": alert.details,
            "opened_at": alert.opened_at.isoformat(),
            "fired_at": alert.fired_at.isoformat() if alert.fired_at else None,
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
            "times_sent": alert.times_sent,
            "url": link,
        },
    }


def _duration(alert: Alert) -> str:
    seconds = int((alert.resolved_at - (alert.fired_at or alert.opened_at)).total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def recipients() -> list[str]:
    if settings.ALERT_EMAILS:
        return list(settings.ALERT_EMAILS)
    staff = get_user_model().objects.filter(is_staff=True, is_active=True).exclude(email="")
    return sorted(set(staff.values_list("email", flat=True)))


def send_later(event: str, alert: Alert) -> None:
    """Queue the messages of one event, once the current transaction commits."""
    body = payload(event, alert)
    if settings.ALERT_WEBHOOK_URL:
        transaction.on_commit(lambda: send_webhook.delay(body))
    if settings.ALERT_EMAIL:
        to = recipients()
        if to:
            subject = f"[{settings.SITE_NAME}] {WORDS[event]}: {alert.subject}"
            text = email_text(body)
            transaction.on_commit(lambda: send_email.delay(subject, text, to))


def email_text(body: dict) -> str:
    """The e-mail's plain text: the webhook's text without its emoji and link
    markup, then the details."""
    alert = body["alert"]
    first = body["text"].split("\n", 1)[0].split(" ", 1)[1]  # without the emoji
    lines = [first, "", alert["message"], "", f"Opened: {alert['opened_at']}"]
    if alert["resolved_at"]:
        lines.append(f"Resolved: {alert['resolved_at']}")
    lines += [f"{name}: {value}" for name, value in alert["details"].items()]
    if alert["url"]:
        lines += ["", f"Alerts page: {alert['url']}"]
    return "\n".join(lines) + "\n"


class RetryableError(Exception):
    """The receiver did not take it, but may later (5xx, 429, network)."""


# Celery's own retries, with backoff, for both ways a message goes out.
RETRIES = dict(
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.ALERT_WEBHOOK_MAX_RETRIES,
)


@shared_task(name="monitoring.notify.send_webhook", autoretry_for=(RetryableError,), **RETRIES)
def send_webhook(body: dict) -> int:
    request = urllib.request.Request(
        settings.ALERT_WEBHOOK_URL,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.ALERT_WEBHOOK_TIMEOUT_S) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise RetryableError(f"the webhook answered {exc.code}") from exc
        # The receiver refuses this message (a wrong URL, a bad token): trying
        # again will not help, and the log says why.
        log.error("the alert webhook refused a message: %s %s", exc.code, exc.reason)
        return exc.code
    except OSError as exc:  # refused, unreachable, timed out
        raise RetryableError(f"the webhook could not be reached: {exc}") from exc


@shared_task(name="monitoring.notify.send_email", autoretry_for=(OSError,), **RETRIES)
def send_email(subject: str, text: str, to: list[str]) -> int:
    return send_mail(subject, text, None, to)
