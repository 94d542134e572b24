"""A model's status for everyone (selectors.model_status): how the state is decided
from the live workers and the queue, /status/ showing it without hosts, PIDs or
paths, announcements sent only on change, and the chat socket's status.watch."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from inference import selectors, status, workers
from inference.models import Generation, LanguageModel

HOST, PID, PATH = "gpu-host-secret", 424242, "/srv/secret-models/probe.gguf"


@pytest.fixture
def probe(db, django_user_model, redis_client):
    """A model no real worker serves, and beat(state, ...): its one worker's
    heartbeat as a worker writes it (replaced at each call; gone after the test)."""
    model = LanguageModel.objects.create(name="status-probe", path=PATH, n_parallel=2)
    user = django_user_model.objects.create_user("dora", password="dora-pass-123")
    key = workers.worker_key(HOST, PID)

    def beat(state: str, generations=(), load_progress: float = 1.0) -> None:
        value = {
            "host": HOST,
            "pid": PID,
            "model": model.name,
            "device": "gpu:0",
            "state": state,
            "load_progress": load_progress,
            "reason": f"could not read {PATH}" if state == "failed" else "",
            "generations": list(generations),
            "held": list(generations),
            "engine": {"n_parallel": 2},
        }
        redis_client.set(key, json.dumps(value), ex=60)
        redis_client.zadd(workers.index_key(), {key: time.time() + 60})

    def answer(state=Generation.QUEUED, source=Generation.SOURCE_CHAT, **times):
        return Generation.objects.create(
            user=user, model=model, state=state, source=source, **times
        )

    yield type("Probe", (), {"model": model, "user": user, "beat": beat, "answer": answer})
    redis_client.delete(key)
    redis_client.zrem(workers.index_key(), key)


def test_the_state_follows_the_workers_and_the_queue(probe):
    model = probe.model
    assert selectors.model_status(model)["state"] == "down"  # no worker at all

    probe.beat("loading", load_progress=0.42)
    loading = selectors.model_status(model)
    assert (loading["state"], loading["progress"]) == ("loading", 0.42)

    probe.beat("ready")
    assert selectors.model_status(model) == {
        "model": "status-probe",
        "state": "ready",
        "running": 0,
        "waiting": 0,
        "eta_s": None,
        "progress": None,
        "ttft_ms": None,
    }

    # One answer runs: busy, but a new question starts at once (a sequence is free).
    probe.beat("busy", generations=[1])
    probe.answer(state=Generation.RUNNING, started_at=timezone.now())
    busy = selectors.model_status(model)
    assert (busy["state"], busy["running"], busy["waiting"], busy["eta_s"]) == (
        "busy",
        1,
        0,
        None,
    )

    # Recent answers of 4 s and 6 s, first tokens after 100, 300 and 200 ms (the
    # job pass's 9 s prompt is left out of the median); two chat questions and one
    # job wait. A new question is third in line, two at a time: about 2 x 5 s.
    now = timezone.now()
    for seconds, ttft_ms, source in ((4, 100, "chat"), (6, 300, "api"), (5, 9000, "job")):
        start = now - timedelta(seconds=60)
        probe.answer(
            state=Generation.DONE,
            source=source,
            started_at=start,
            first_token_at=start + timedelta(milliseconds=ttft_ms),
            finished_at=start + timedelta(seconds=seconds),
        )
    probe.answer()
    probe.answer(source=Generation.SOURCE_API)
    probe.answer(source=Generation.SOURCE_JOB)
    waiting = selectors.model_status(model)
    assert (waiting["state"], waiting["waiting"], waiting["eta_s"], waiting["ttft_ms"]) == (
        "busy",
        2,
        10.0,
        200,
    )

    # A worker that failed to load serves nothing: down, and its reason stays inside.
    probe.beat("failed")
    down = selectors.model_status(model)
    assert down["state"] == "down" and PATH not in json.dumps(down)


def test_the_status_page_shows_every_model_to_any_user_without_hosts_pids_or_paths(probe, client):
    probe.beat("loading", load_progress=0.5)
    client.force_login(probe.user)
    html = client.get("/status/").content.decode()
    assert 'data-model="status-probe" data-state="loading"' in html
    assert "loading (50 %)" in html
    for secret in (HOST, str(PID), PATH, "secret-models", "gpu:0"):
        assert secret not in html, secret
    # The same worker, on the staff Workers page, does show its host.
    probe.user.is_staff = True
    probe.user.save()
    assert HOST in client.get("/workers/").content.decode()


def test_a_status_is_announced_only_when_it_changes(probe):
    probe.beat("ready")
    assert status.announce(probe.model) is True  # the first one
    assert status.announce(probe.model) is False  # nothing changed
    probe.answer()  # a question waits
    assert status.announce(probe.model) is True
    assert status.announce(probe.model) is False


def test_a_chat_socket_watches_a_models_status(stack, cast, default_model, ws_factory):
    ws = ws_factory(cast.charlie)
    ws.send({"type": "status.watch", "model": "no-such-model", "request_id": 1})
    error, _ = ws.recv_until(lambda f: f["type"] == "error")
    assert (error["code"], error["request_id"]) == ("unknown_model", 1)
    ws.send({"type": "status.watch", "model": default_model.name})
    frame, _ = ws.recv_until(lambda f: f["type"] == "model.status")
    assert frame["model"] == default_model.name
    assert frame["state"] in ("ready", "busy")
    assert not {"host", "pid", "worker", "path", "reason"} & set(frame)
