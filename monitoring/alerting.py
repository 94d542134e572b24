"""Alerts sent to people: what is wrong now, evaluated by a beat task on the ops
worker (monitoring.tasks.evaluate_alerts), never in a model worker.

Each evaluation lists the conditions that hold now (one `Condition` per thing that
is wrong, with a stable key), then walks the open `Alert` rows as a state machine:

- a new key opens a row and fires it: one "firing" message (a condition that must
  hold a while first, the queue wait, is pending until then);
- a key still present updates its row and repeats the message at most every
  ALERT_REPEAT_MIN, unless staff acknowledged it;
- an open row whose key is gone is resolved: one "resolved" message.

A source that cannot be read (Redis down for the ops worker, say) resolves none of
its alerts: "could not look" is not "all is well". Messages leave through tasks on
the ops queue (monitoring.notify), after the evaluation's transaction commits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from inference.jobs.models import Job
from inference.models import Generation, LanguageModel, WorkerHeartbeat
from inference.workers import live_workers, serving_problem
from monitoring import notify, telemetry
from monitoring.alerts import gpu_alerts
from monitoring.models import Alert

log = logging.getLogger(__name__)

GPU_SUBJECTS = {
    "temperature": "is too hot",
    "throttle": "is throttling its clocks",
    "vram": "is nearly out of memory",
}
GPU_KINDS = {
    "temperature": Alert.GPU_TEMPERATURE,
    "throttle": Alert.GPU_THROTTLE,
    "vram": Alert.GPU_VRAM,
}


@dataclass
class Condition:
    key: str
    kind: str
    subject: str
    message: str
    details: dict = field(default_factory=dict)
    hold: timedelta = timedelta(0)  # how long it must hold before it fires


# --- the sources: each returns the conditions that hold now --------------------------
def gpu_conditions(now) -> list[Condition]:
    """Temperature, throttling and VRAM headroom of each GPU's latest reading
    (the same rule as the GPU page's, monitoring/alerts.py)."""
    conditions = []
    for alert in gpu_alerts(telemetry.current_gpus()):
        where = f"{alert.host}/{alert.gpu_index}"
        conditions.append(
            Condition(
                key=f"{GPU_KINDS[alert.kind]}:{where}",
                kind=GPU_KINDS[alert.kind],
                subject=f"{alert.host} GPU {alert.gpu_index} {GPU_SUBJECTS[alert.kind]}",
                message=alert.message,
                details={"host": alert.host, "gpu_index": alert.gpu_index},
            )
        )
    return conditions


def worker_conditions(now) -> list[Condition]:
    """Workers gone, models without a live worker, and stores a live worker cannot
    reach. Gone: its Redis entry expired (three missed heartbeats) while its row
    says it never stopped, and no worker for the same model on the same host has
    started since it was last seen (a restart ends the alert; that worker's own
    end, later, is its own alert)."""
    live = live_workers()
    live_ids = {(w["host"], w["pid"]) for w in live}
    interval = timedelta(seconds=settings.WORKER_HEARTBEAT_INTERVAL_S)
    conditions = []
    rows = WorkerHeartbeat.objects.exclude(state=WorkerHeartbeat.STOPPED)
    for row in rows.order_by("host", "pid"):
        if (row.host, row.pid) in live_ids or row.seen_at > now - interval:
            continue  # alive, or too new to have an entry yet
        if "redis" in row.unreachable and row.seen_at > now - 3 * interval:
            continue  # alive, without Redis: the Redis alert below says so
        replaced = WorkerHeartbeat.objects.filter(
            host=row.host, model_name=row.model_name, started_at__gt=row.seen_at
        )
        if replaced.exists():
            continue  # a worker started since took its place (even if stopped since)
        conditions.append(
            Condition(
                key=f"{Alert.WORKER_GONE}:{row.host}:{row.pid}",
                kind=Alert.WORKER_GONE,
                subject=f"Worker {row.host}:{row.pid} ({row.model_name}) is gone",
                message=(
                    f"The {row.model_name} worker {row.host}:{row.pid} ({row.device}) "
                    f"has missed three heartbeats; last seen {row.seen_at:%Y-%m-%d %H:%M:%S} "
                    f"UTC, {row.state}. It ends when a worker for {row.model_name} starts "
                    f"on {row.host}."
                ),
                details={
                    "host": row.host,
                    "pid": row.pid,
                    "model": row.model_name,
                    "last_seen": row.seen_at.isoformat(),
                },
            )
        )
    for model in LanguageModel.objects.filter(enabled=True).order_by("name"):
        problem = serving_problem(model.name, live, detail=True)
        if problem:
            conditions.append(
                Condition(
                    key=f"{Alert.MODEL_UNSERVED}:{model.name}",
                    kind=Alert.MODEL_UNSERVED,
                    subject=f"No live worker serves {model.name}",
                    message=problem,
                    details={"model": model.name},
                    # Not for the moment between a worker's stop and its
                    # replacement's first heartbeat (a restart, a deploy).
                    hold=3 * interval,
                )
            )
    for worker in live:
        if "database" in worker.get("unreachable", []):
            conditions.append(_unreachable(Alert.DATABASE_UNREACHABLE, "the database", worker))
    # (Filtered here, not in SQL: SQLite has no JSON containment.)
    for row in rows.filter(seen_at__gt=now - 3 * interval):
        if "redis" not in row.unreachable:
            continue
        worker = {"host": row.host, "pid": row.pid, "model": row.model_name}
        conditions.append(_unreachable(Alert.REDIS_UNREACHABLE, "Redis", worker))
    return conditions


def _unreachable(kind: str, store: str, worker: dict) -> Condition:
    name = f"{worker['host']}:{worker['pid']}"
    return Condition(
        key=f"{kind}:{name}",
        kind=kind,
        subject=f"Worker {name} ({worker['model']}) cannot reach {store}",
        message=f"The {worker['model']} worker {name} could not write its heartbeat to "
        f"{store} at its last try.",
        details={"host": worker["host"], "pid": worker["pid"], "model": worker["model"]},
    )


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def queue_conditions(now) -> list[Condition]:
    """Per model, the p95 of the interactive (chat, API) queue waits of the last
    ALERT_QUEUE_WAIT_FOR_MIN minutes: answers started then, and those still
    waiting, counted to now. It fires once it has stayed above
    ALERT_QUEUE_WAIT_P95_S at every evaluation for ALERT_QUEUE_WAIT_FOR_MIN."""
    window = timedelta(minutes=settings.ALERT_QUEUE_WAIT_FOR_MIN)
    limit_s = settings.ALERT_QUEUE_WAIT_P95_S
    rows = (
        Generation.objects.exclude(source__in=Generation.BACKGROUND_SOURCES)
        .filter(Q(started_at__gte=now - window) | Q(state=Generation.QUEUED))
        .values_list("model__name", "queued_at", "started_at")
    )
    waits: dict[str, list[float]] = {}
    for model, queued_at, started_at in rows:
        waits.setdefault(model, []).append(((started_at or now) - queued_at).total_seconds())
    conditions = []
    for model, values in sorted(waits.items()):
        p95 = percentile(values, 95)
        if p95 > limit_s:
            conditions.append(
                Condition(
                    key=f"{Alert.QUEUE_WAIT}:{model}",
                    kind=Alert.QUEUE_WAIT,
                    subject=f"Queue wait for {model} is high",
                    message=f"The p95 queue wait for {model} is {p95:.0f} s over "
                    f"{len(values)} requests of the last {window.total_seconds() / 60:g} min "
                    f"(alert above {limit_s:g} s).",
                    details={"model": model, "p95_s": round(p95, 1), "requests": len(values)},
                    hold=window,
                )
            )
    return conditions


def job_conditions(now) -> list[Condition]:
    """Each job that failed within ALERT_JOB_FAILED_LOOKBACK_H and is still failed:
    an event, until staff acknowledge it (or the job is deleted)."""
    since = now - timedelta(hours=settings.ALERT_JOB_FAILED_LOOKBACK_H)
    # Not API batches: one fails only when no line of its file was a valid request,
    # which its error file tells the script; nothing for staff to act on.
    failed = (
        Job.objects.filter(state=Job.FAILED, finished_at__gte=since)
        .exclude(strategy=Job.BATCH)
        .select_related("user", "model")
    )
    # Acknowledged ones stay ended (their row is resolved).
    done = set(
        Alert.objects.filter(
            kind=Alert.JOB_FAILED, resolved_at__isnull=False, opened_at__gte=since
        ).values_list("key", flat=True)
    )
    conditions = []
    for job in failed:
        key = f"{Alert.JOB_FAILED}:{job.pk}"
        if key in done:
            continue
        conditions.append(
            Condition(
                key=key,
                kind=Alert.JOB_FAILED,
                subject=f"Job {job.pk} ({job.title}) failed",
                message=f"{job.user.username}'s job {job.pk} \u201c{job.title}\u201d on "
                f"{job.model.name} failed: {job.reason or 'no reason given'}",
                details={
                    "job": job.pk,
                    "user": job.user.username,
                    "model": job.model.name,
                    "reason": job.reason,
                },
            )
        )
    return conditions


# Each source, and the kinds whose alerts it alone can resolve.
SOURCES = [
    (gpu_conditions, set(GPU_KINDS.values())),
    (
        worker_conditions,
        {
            Alert.WORKER_GONE,
            Alert.MODEL_UNSERVED,
            Alert.DATABASE_UNREACHABLE,
            Alert.REDIS_UNREACHABLE,
        },
    ),
    (queue_conditions, {Alert.QUEUE_WAIT}),
    (job_conditions, {Alert.JOB_FAILED}),
]


def current_conditions(now) -> tuple[list[Condition], set[str]]:
    """The conditions that hold now, and the kinds that could be looked at."""
    conditions, looked = [], set()
    for source, kinds in SOURCES:
        try:
            conditions.extend(source(now))
        except Exception:  # noqa: BLE001 - one source down must not silence the rest
            log.exception("could not evaluate the %s alerts", source.__name__)
            continue
        looked |= kinds
    return conditions, looked


# --- the state machine ---------------------------------------------------------------
def evaluate(now=None) -> list[tuple[str, Alert]]:
    """One evaluation: open, fire, repeat and resolve Alert rows. Returns what was
    sent, as (event, alert) pairs, event one of "firing", "repeat", "resolved"."""
    now = now or timezone.now()
    conditions, looked = current_conditions(now)
    repeat = timedelta(minutes=settings.ALERT_REPEAT_MIN)
    sent: list[tuple[str, Alert]] = []
    with transaction.atomic():
        open_rows = {
            a.key: a for a in Alert.objects.select_for_update().filter(resolved_at__isnull=True)
        }
        for condition in {c.key: c for c in conditions}.values():
            alert = open_rows.pop(condition.key, None)
            if alert is None:
                alert = _open(condition, now)
                if alert is None:
                    continue  # another evaluation opened it a moment ago
            alert.subject, alert.message = condition.subject, condition.message
            alert.details = condition.details
            event = None
            if alert.fired_at is None:
                if now - alert.opened_at >= condition.hold:
                    alert.fired_at = now
                    event = "firing"
            elif (
                alert.acknowledged_at is None
                and repeat > timedelta(0)
                and now - alert.last_sent_at >= repeat
            ):
                event = "repeat"
            if event:
                alert.last_sent_at = now
                alert.times_sent += 1
                sent.append((event, alert))
            alert.save()
        for alert in open_rows.values():
            if alert.kind not in looked:
                continue  # not looked at this time: unknown, not ended
            if alert.fired_at is None:
                alert.delete()  # ended before it was ever sent
                continue
            alert.resolved_at = now
            alert.save(update_fields=["resolved_at"])
            sent.append(("resolved", alert))
        for event, alert in sent:
            notify.send_later(event, alert)
    return sent


def _open(condition: Condition, now) -> Alert | None:
    try:
        with transaction.atomic():
            return Alert.objects.create(
                key=condition.key,
                kind=condition.kind,
                subject=condition.subject,
                message=condition.message,
                details=condition.details,
                opened_at=now,
            )
    except IntegrityError:
        return None


def acknowledge(alert: Alert, user) -> None:
    """Staff saw it: a condition is not sent again until it ends; an event (a
    failed job) ends now, with its "resolved" message."""
    now = timezone.now()
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=alert.pk)
        if alert.acknowledged_at is None:
            alert.acknowledged_by, alert.acknowledged_at = user, now
        if alert.is_event and alert.resolved_at is None:
            alert.resolved_at = now
            notify.send_later("resolved", alert)
        alert.save()
