"""Alerts (issue 22): the evaluation's state machine against the real database and
Redis, delivery to a real HTTP receiver and a real SMTP server (aiosmtpd), and a
real model worker killed and started again.

The beat task's function (monitoring.alerting.evaluate) is called directly, with
explicit times where a test needs minutes to pass. Delivery tasks run eagerly in
this process (Celery's task_always_eager), retries included, as the ops worker
would run them, without its queue.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.test import Client
from django.utils import timezone

from inference import workers
from inference.jobs.models import Job
from inference.models import Generation, WorkerHeartbeat
from mixtralweb.celery import app
from monitoring import alerting, telemetry
from monitoring.models import Alert
from tests.conftest import Stack, free_port
from tests.fake_nvml import GIB, reading


class Receiver:
    """A webhook receiver on a free local port: keeps each JSON body it is sent;
    answers `fail_with` to the first `failures` requests, and waits `delay_s`."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.requests = 0
        self.failures, self.fail_with, self.delay_s = 0, 503, 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(receiver.delay_s)
                if receiver.failures:
                    receiver.failures -= 1
                    self.send_response(receiver.fail_with)
                else:
                    receiver.bodies.append(body)
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def events(self, key_prefix: str = "") -> list[tuple[str, str]]:
        return [
            (b["event"], b["alert"]["key"])
            for b in self.bodies
            if b["alert"]["key"].startswith(key_prefix)
        ]


@pytest.fixture
def receiver(settings):
    """The receiver, as ALERT_WEBHOOK_URL; delivery tasks run in this process."""
    hook = Receiver()
    settings.ALERT_WEBHOOK_URL = hook.url
    settings.ALERT_WEBHOOK_TIMEOUT_S = 0.5
    settings.ALERT_EMAIL = False
    eager = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield hook
    app.conf.task_always_eager = eager
    hook.server.shutdown()
    hook.server.server_close()


@pytest.fixture
def people(transactional_db):
    """Alice, and Sam: staff, the one address alerts go to by default."""
    from django.contrib.auth import get_user_model

    User = get_user_model()
    alice = User.objects.create_user("alice", "alice@example.com")
    sam = User.objects.create_user("sam", "sam@example.com", is_staff=True)
    return type("People", (), {"alice": alice, "sam": sam})


@pytest.fixture
def model(transactional_db):
    from inference.registry import ensure_default_model

    return ensure_default_model()


@pytest.fixture
def gpu_telemetry(redis_client):
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    yield
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())


def test_gpu_alerts_fire_once_repeat_while_they_last_and_resolve(
    people, fake_gpus, gpu_telemetry, receiver, settings
):
    settings.ALERT_REPEAT_MIN = 10
    fake_gpus.readings[0] = reading(0, temperature_c=91.0)
    fake_gpus.readings[1] = reading(1, throttle_reasons=["hw_thermal"], memory_used_bytes=78 * GIB)
    telemetry.sample_once("alert-host")
    t0 = timezone.now()
    alerting.evaluate(t0)
    assert sorted(receiver.events("gpu_")) == [
        ("firing", "gpu_temperature:alert-host/0"),
        ("firing", "gpu_throttle:alert-host/1"),
        ("firing", "gpu_vram:alert-host/1"),
    ]
    body = next(b for b in receiver.bodies if b["alert"]["kind"] == "gpu_temperature")
    assert body["text"].startswith(":rotating_light: [ALERT] alert-host GPU 0 is too hot\n")
    assert "91 °C (alert at 85 °C)" in body["text"]
    assert body["alert"]["details"] == {"host": "alert-host", "gpu_index": 0}

    # Still there a minute later: nothing new; past ALERT_REPEAT_MIN: once more each.
    alerting.evaluate(t0 + timedelta(minutes=1))
    assert len(receiver.bodies) == 3
    alerting.evaluate(t0 + timedelta(minutes=11))
    assert sorted(e for e, _ in receiver.events("gpu_")[3:]) == ["repeat"] * 3

    # GPU 0 cools down: its alert resolves, once; GPU 1's go on.
    fake_gpus.readings[0] = reading(0, temperature_c=60.0)
    telemetry.sample_once("alert-host")
    alerting.evaluate(t0 + timedelta(minutes=12))
    alerting.evaluate(t0 + timedelta(minutes=13))
    assert receiver.events("gpu_")[6:] == [("resolved", "gpu_temperature:alert-host/0")]
    assert receiver.bodies[-1]["text"].startswith(":white_check_mark: [RESOLVED]")
    temperature = Alert.objects.get(key="gpu_temperature:alert-host/0")
    assert temperature.resolved_at is not None and temperature.times_sent == 2

    # Staff acknowledge the throttling on the alerts page: it is not sent again...
    staff = Client()
    staff.force_login(people.sam)
    throttle = Alert.objects.get(key="gpu_throttle:alert-host/1")
    page = staff.get("/alerts/").content.decode()
    assert "alert-host GPU 1 is throttling its clocks" in page
    assert f'action="/alerts/{throttle.pk}/acknowledge/"' in page
    assert staff.post(f"/alerts/{throttle.pk}/acknowledge/").status_code == 302
    throttle.refresh_from_db()
    assert throttle.acknowledged_by == people.sam and throttle.resolved_at is None
    alerting.evaluate(t0 + timedelta(minutes=22))
    assert receiver.events("gpu_")[7:] == [("repeat", "gpu_vram:alert-host/1")]

    # ...and Redis unreachable for the evaluation (a port where nothing listens): no
    # GPU reading can be had, and "could not look" resolves nothing.
    redis_url = settings.REDIS_URL
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    alerting.evaluate(t0 + timedelta(minutes=23))
    assert Alert.objects.filter(resolved_at__isnull=True, kind__startswith="gpu_").count() == 2
    assert len(receiver.events("gpu_")) == 8

    # GPU 1 recovers: both resolve, the acknowledged one included.
    settings.REDIS_URL = redis_url
    fake_gpus.readings[1] = reading(1)
    telemetry.sample_once("alert-host")
    alerting.evaluate(t0 + timedelta(minutes=24))
    assert sorted(receiver.events("gpu_")[8:]) == [
        ("resolved", "gpu_throttle:alert-host/1"),
        ("resolved", "gpu_vram:alert-host/1"),
    ]
    page = staff.get("/alerts/").content.decode()
    assert 'id="no-open-alerts"' in page and "alert-host GPU 1 is throttling" in page  # history


def test_the_queue_wait_fires_only_once_high_for_the_whole_window(
    people, model, receiver, settings
):
    settings.ALERT_QUEUE_WAIT_P95_S = 30
    settings.ALERT_QUEUE_WAIT_FOR_MIN = 5
    t0 = timezone.now()
    waiting = Generation.objects.create(
        user=people.alice, model=model, queued_at=t0 - timedelta(seconds=40)
    )
    key = f"queue_wait:{model.name}"
    alerting.evaluate(t0)
    alert = Alert.objects.get(key=key)
    assert alert.fired_at is None and receiver.events("queue_wait") == []  # pending
    # A job pass waiting as long is not interactive: it counts for nothing.
    Generation.objects.create(
        user=people.alice,
        model=model,
        source=Generation.SOURCE_JOB,
        queued_at=t0 - timedelta(hours=1),
    )
    alerting.evaluate(t0 + timedelta(minutes=5))
    assert receiver.events("queue_wait") == [("firing", key)]
    assert "over 1 requests of the last 5 min (alert above 30 s)" in receiver.bodies[-1]["text"]

    # It starts: the p95 of the window falls under the limit once quick ones follow.
    Generation.objects.filter(pk=waiting.pk).update(
        state=Generation.DONE, started_at=t0 + timedelta(minutes=5)
    )
    now = t0 + timedelta(minutes=6)
    for _ in range(20):
        Generation.objects.create(
            user=people.alice,
            model=model,
            state=Generation.DONE,
            queued_at=now - timedelta(seconds=2),
            started_at=now - timedelta(seconds=1),
        )
    alerting.evaluate(now)
    assert receiver.events("queue_wait")[-1] == ("resolved", key)

    # A high wait that ends within the window is never sent, and leaves no row.
    Generation.objects.filter(source=Generation.SOURCE_CHAT).delete()
    Generation.objects.create(user=people.alice, model=model, queued_at=now - timedelta(minutes=2))
    alerting.evaluate(now + timedelta(minutes=1))
    assert Alert.objects.filter(key=key, fired_at__isnull=True).exists()
    Generation.objects.filter(source=Generation.SOURCE_CHAT).delete()
    alerting.evaluate(now + timedelta(minutes=2))
    assert not Alert.objects.filter(key=key, fired_at__isnull=True).exists()
    assert len(receiver.events("queue_wait")) == 2


def test_a_failed_job_is_mailed_to_staff_and_ends_when_acknowledged(
    people, model, receiver, settings
):
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
            self.messages.append((envelope.rcpt_tos, envelope.content.decode()))
            return "250 OK"

    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", smtp.port
        settings.ALERT_EMAIL, settings.ALERT_EMAILS = True, []
        settings.ALERT_REPEAT_MIN = 60
        job = Job.objects.create(
            user=people.alice,
            model=model,
            title="Quarterly report",
            instruction="Summarise.",
            document="text",
            state=Job.FAILED,
            reason="The model's worker stopped responding.",
            finished_at=timezone.now(),
        )
        t0 = timezone.now()
        alerting.evaluate(t0)
        key = f"job_failed:{job.pk}"
        assert receiver.events("job_failed") == [("firing", key)]

        def mails() -> list[tuple[list[str], str]]:
            # Unfolded headers; the job's only (the model has no worker: another alert).
            unfolded = [(to, content.replace("\r\n ", " ")) for to, content in inbox.messages]
            return [(to, c) for to, c in unfolded if "Quarterly report" in c]

        ((to, content),) = mails()
        assert to == ["sam@example.com"]  # the one staff user
        assert f"Subject: [Mixtral Workbench] ALERT: Job {job.pk} (Quarterly report) failed" in (
            content
        )
        assert "alice's job" in content and "stopped responding" in content
        assert f"[ALERT] Job {job.pk}" in content and ":rotating_light:" not in content

        alerting.evaluate(t0 + timedelta(minutes=61))  # unacknowledged: sent again
        assert receiver.events("job_failed")[-1] == ("repeat", key)
        staff = Client()
        staff.force_login(people.sam)
        alert = Alert.objects.get(key=key)
        staff.post(f"/alerts/{alert.pk}/acknowledge/")
        assert receiver.events("job_failed")[-1] == ("resolved", key)
        assert receiver.bodies[-1]["text"].endswith("by sam")
        alerting.evaluate(t0 + timedelta(minutes=62))  # the job is still failed: no new one
        assert len(receiver.events("job_failed")) == 3 and len(mails()) == 3
        assert "RESOLVED: Job" in mails()[-1][1]
    finally:
        smtp.stop()


def test_the_webhook_is_retried_with_backoff_and_a_refusal_is_not(receiver):
    from monitoring.notify import send_webhook

    receiver.failures = 2  # two 503s, then taken
    send_webhook.delay({"text": "one", "event": "firing", "alert": {"key": "k"}})
    assert receiver.requests == 3 and [b["text"] for b in receiver.bodies] == ["one"]

    receiver.requests, receiver.failures, receiver.fail_with = 0, 5, 400
    send_webhook.delay({"text": "two", "event": "firing", "alert": {"key": "k"}})
    assert receiver.requests == 1  # a 400 will not change by asking again

    # Slower than the 0.5 s timeout: given up, on its last try here.
    receiver.requests, receiver.failures, receiver.delay_s = 0, 0, 0.8
    result = send_webhook.apply(args=[{"text": "three"}], retries=send_webhook.max_retries)
    assert result.failed() and "could not be reached" in str(result.result)
    assert receiver.requests == 1


def test_a_worker_that_cannot_reach_redis_or_the_database_raises_its_alert(
    transactional_db, default_model, receiver, settings
):
    """A real heartbeat, written while Redis refuses connections (the row says so),
    and by a process whose database refuses them (its Redis entry says so)."""
    settings.WORKER_HEARTBEAT_INTERVAL_S = 5
    beat = workers.Heartbeat(default_model.name, "cpu")
    redis_url = settings.REDIS_URL
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    beat.write()
    settings.REDIS_URL = redis_url
    row = WorkerHeartbeat.objects.get(host=beat.host, pid=beat.pid)
    assert row.unreachable == ["redis"]
    alerting.evaluate()
    key = f"redis_unreachable:{beat.host}:{beat.pid}"
    assert ("firing", key) in receiver.events("redis_unreachable")
    assert not receiver.events("worker_gone")  # cut off from Redis, not gone
    beat.write()  # Redis answers again: the row says so at once
    assert WorkerHeartbeat.objects.get(pk=row.pk).unreachable == []
    alerting.evaluate()
    assert receiver.events("redis_unreachable")[-1] == ("resolved", key)
    beat.stop()

    # A process whose database is at a port where nothing listens.
    env = {**os.environ, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/none"}
    script = (
        "import time; from inference.workers import Heartbeat; "
        f"Heartbeat({default_model.name!r}, 'cpu').start(); print('up', flush=True); "
        "time.sleep(60)"
    )
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "manage.py", "shell", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        for line in process.stdout:  # after the shell's own lines
            if line.strip() == b"up":
                break
        alerting.evaluate()
        key = f"database_unreachable:{beat.host}:{process.pid}"
        assert ("firing", key) in receiver.events("database_unreachable")
    finally:
        process.kill()
        process.wait()


def test_a_worker_gone_stays_resolved_once_replaced_and_a_stopped_one_is_no_alert(
    transactional_db, receiver, settings
):
    """Rows as heartbeats leave them (no Redis entry: expired, or never there)."""
    now = timezone.now()
    dead = WorkerHeartbeat.objects.create(
        host="rows-host",
        pid=101,
        model_name="m",
        device="cpu",
        state=WorkerHeartbeat.READY,
        started_at=now - timedelta(minutes=10),
        seen_at=now - timedelta(minutes=5),
    )
    alerting.evaluate(now)
    assert receiver.events("worker_gone") == [("firing", "worker_gone:rows-host:101")]
    # Its replacement started after it was last seen, and has since been stopped
    # (a graceful stop): the first stays replaced, the second is no alert.
    WorkerHeartbeat.objects.create(
        host="rows-host",
        pid=102,
        model_name="m",
        device="cpu",
        state=WorkerHeartbeat.STOPPED,
        started_at=dead.seen_at + timedelta(minutes=1),
        seen_at=now,
    )
    alerting.evaluate(now + timedelta(minutes=1))
    alerting.evaluate(now + timedelta(minutes=2))
    assert receiver.events("worker_gone") == [
        ("firing", "worker_gone:rows-host:101"),
        ("resolved", "worker_gone:rows-host:101"),
    ]


def test_a_killed_worker_is_reported_gone_and_resolved_when_one_is_back(
    transactional_db, default_model, receiver, settings, worker_env
):
    """A real model worker (Celery, SmolLM2), killed with SIGKILL, then another
    started on the same host for the same model."""
    settings.WORKER_HEARTBEAT_INTERVAL_S = 1
    stack = Stack(0, worker_env)
    first = stack.start_worker("alerts-worker")
    try:
        _wait_state(first.pid, {"ready"})
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        _wait_state(first.pid, None)  # its entry expired: three heartbeats missed
        alerting.evaluate()
        host = WorkerHeartbeat.objects.get(pid=first.pid).host
        key = f"worker_gone:{host}:{first.pid}"
        assert receiver.events("worker_gone") == [("firing", key)]
        gone = next(b for b in receiver.bodies if b["alert"]["key"] == key)
        assert f"({default_model.name}) is gone" in gone["text"]
        assert gone["alert"]["details"]["model"] == default_model.name

        second = stack.start_worker("alerts-worker-again")
        _wait_state(second.pid, {"loading", "ready"})
        alerting.evaluate()
        assert receiver.events("worker_gone") == [("firing", key), ("resolved", key)]
    finally:
        stack.stop_all()


@pytest.fixture
def worker_env():
    from tests.conftest import database_url

    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "PYTHONUNBUFFERED": "1",
        "WORKER_HEARTBEAT_INTERVAL_S": "1",
        "LLAMA_N_THREADS": "1",
    }


def _wait_state(pid: int, states: set | None, timeout_s: float = 60) -> None:
    """Until the worker `pid`'s live heartbeat is in one of `states` (None: gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        mine = [w for w in workers.live_workers() if w["pid"] == pid]
        if (states is None and not mine) or (mine and mine[0]["state"] in (states or ())):
            return
        time.sleep(0.1)
    raise TimeoutError(f"worker {pid} not {states or 'gone'} within {timeout_s} s")
