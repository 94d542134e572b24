"""The names of everything a deployment keeps in Redis: keys, channel-layer groups
and Celery queues, each prefixed by the deployment's namespace.

Two deployments on one Redis (`make run` beside `make test`, two checkouts) never
read each other's stop requests, live text or heartbeats, never take each other's
tasks and never join each other's groups. The namespace is settings.REDIS_NAMESPACE,
read at each call: the test suite sets its own per run.
"""

from __future__ import annotations

import hashlib

from django.conf import settings


def namespace() -> str:
    return settings.REDIS_NAMESPACE


def default_namespace(database: dict) -> str:
    """A namespace derived from the database: deployments that share a database are
    one deployment; any other two differ."""
    if database["ENGINE"].endswith("sqlite3"):
        identity = f"sqlite|{database['NAME']}"
    else:
        identity = "|".join(
            str(database.get(part) or "") for part in ("ENGINE", "HOST", "PORT", "NAME")
        )
    return "mxw-" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def key(*parts: object) -> str:
    """A Redis key of this deployment."""
    return ":".join([namespace(), *map(str, parts)])


def group(*parts: object) -> str:
    """A channel-layer group of this deployment (letters, digits, - _ . only)."""
    return ".".join([namespace(), *map(str, parts)])


# --- Celery queues ------------------------------------------------------------------
def model_queue(model_name: str) -> str:
    """Interactive work (chat, API) on one model."""
    return f"{namespace()}.model.{model_name}"


def bulk_queue(model_name: str) -> str:
    """Background work (long-context job passes) on one model; a worker takes it
    only when the interactive queue is empty (queue_order_strategy "priority")."""
    return f"{namespace()}.model.{model_name}.bulk"


def ops_queue() -> str:
    """Maintenance tasks: the reaper, job re-drive, telemetry rollups."""
    return f"{namespace()}.ops"


def worker_name(role: str) -> str:
    """A Celery worker's node name: its role (a model's name, or "ops") in this
    deployment, on this host. Two deployments' workers on one host then never answer
    to one name when remote control (`celery inspect`) asks who is there."""
    return f"{role}.{namespace()}@%h"


def route_task(name, args, kwargs, options, task=None, **_kw) -> dict:
    """Celery router (CELERY_TASK_ROUTES): a task sent without an explicit queue goes
    to this deployment's ops queue."""
    return {"queue": ops_queue()}


# --- one generation's keys and groups ----------------------------------------------
def generation_stamp(generation_id: int, queued_at) -> str:
    """The generation's id with its queue time: a key made for one generation never
    matches another that reuses its id (a database recreated under a kept Redis)."""
    return f"{generation_id}.{int(queued_at.timestamp() * 1_000_000)}"


def stop_key(generation_id: int, queued_at) -> str:
    """A list: one element per stop request. It outlives a generation that has not
    started yet, so a worker that starts it later still sees the request."""
    return key("gen", generation_stamp(generation_id, queued_at), "stop")


def live_text_key(generation_id: int, queued_at) -> str:
    """What has been streamed so far: a reconnecting client starts from it."""
    return key("gen", generation_stamp(generation_id, queued_at), "live")


def alive_key(generation_id: int, queued_at) -> str:
    """Present while a worker holds the generation (waiting for room, evaluating its
    prompt or generating): the reapers leave it alone."""
    return key("gen", generation_stamp(generation_id, queued_at), "alive")


def generation_group(generation_id: int) -> str:
    return group("gen", generation_id)


def conversation_group(conversation_id: int) -> str:
    return group("conv", conversation_id)


def job_group(job_id: int) -> str:
    return group("job", job_id)


def user_jobs_group(user_id: int) -> str:
    """One user's job notifications (every tab of theirs)."""
    return group("jobs", "user", user_id)


def telemetry_group() -> str:
    """Live GPU readings for the GPUs page."""
    return group("gpu", "telemetry")
