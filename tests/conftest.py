"""Fixtures shared by the suite.

The cast (as in every test here):
- Alice owns conversations; she and Bob are in team "Red", Alice as team admin.
- Bob is Alice's team-mate: he sees what Alice shares with Red.
- Charlie is in no team: he sees nothing of Alice's or Bob's.

`stack` runs the real product around the test database: a daphne ASGI server, a
Celery worker for the default model (SmolLM2 on the CPU) and Redis. Tests that use
it need committed data, so they use `transactional_db`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from mixtralweb import namespace
from mixtralweb.web_server import daphne_argv
from tests.browser import browser  # noqa: F401 - the Chromium fixture, for browser tests
from tests.fake_nvml import fake_gpus, no_gpu  # noqa: F401 - fixtures: a substituted NVML
from tests.fake_pynvml import fake_pynvml  # noqa: F401 - fixture: a fake pynvml module

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "var" / "test-logs"


@pytest.fixture(autouse=True, scope="session")
def _deployment_namespace():
    """This run's own namespace in Redis (keys, channel groups, Celery queues), given
    to every process it starts: nothing left by an earlier run, or by `make run` on
    the same Redis, reaches it. Its keys are deleted at the end."""
    namespace_ = f"test-{uuid.uuid4().hex[:10]}"
    os.environ["REDIS_NAMESPACE"] = namespace_
    settings.REDIS_NAMESPACE = namespace_
    yield namespace_
    try:
        client = redis.Redis.from_url(settings.REDIS_URL)
        for key in client.scan_iter(match=f"{namespace_}*", count=1000):
            client.delete(key)
    except redis.RedisError:
        pass


@pytest.fixture(autouse=True, scope="session")
def _quick_password_hashes():
    """Passwords made in this process are hashed with one PBKDF2 iteration instead of
    Django's million (a quarter of a second each, three per cast). The algorithm name
    is the same, so every server of the stack checks them as usual (and upgrades the
    hash at a login there)."""
    from django.test.utils import override_settings

    override = override_settings(
        PASSWORD_HASHERS=["tests.conftest.QuickPBKDF2PasswordHasher", *settings.PASSWORD_HASHERS]
    )
    override.enable()
    yield
    override.disable()


@pytest.fixture(autouse=True, scope="session")
def _no_login_throttling_in_this_process():
    """django-axes needs the request in every authenticate(), and the test client's
    login() gives none: throttling is off in this process, so that tests may log in
    so. tests/test_login.py turns it on for its tests; the servers a test starts
    (daphne, `make run`) always throttle."""
    from django.test.utils import override_settings

    override = override_settings(AXES_ENABLED=False)
    override.enable()
    yield
    override.disable()


class QuickPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url() -> str:
    """The URL of the test database, for processes started by the tests."""
    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return (
        f"postgresql://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"
    )


class Stack:
    """The processes of a running product, with helpers to talk to it."""

    def __init__(self, port: int, env: dict):
        self.port = port
        self.env = env
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/"

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes[name] = process
        return process

    def start_worker(self, name: str = "worker", model: str | None = None) -> subprocess.Popen:
        model = model or settings.DEFAULT_MODEL_NAME
        return self.start(name, [sys.executable, "manage.py", "modelworker", model])

    def stop(self, name: str, sig: int = 15) -> None:
        process = self.processes.pop(name, None)
        if process and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def wait_http(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the ASGI server did not listen on {self.port}")

    def wait_worker(self, timeout_s: float = 60) -> None:
        """Wait until a worker consumes the default model's queue."""
        from mixtralweb.celery import app

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            replies = app.control.inspect(timeout=1).active_queues() or {}
            if any(
                q["name"] == namespace.model_queue(settings.DEFAULT_MODEL_NAME)
                for queues in replies.values()
                for q in queues
            ):
                return
            time.sleep(0.3)
        raise RuntimeError("no worker came up for the default model")

    def wait_model(self, model: str | None = None, timeout_s: float = 60) -> dict:
        """Wait until a worker's heartbeat for `model` says ready or failed; return it."""
        from inference.workers import live_workers

        model = model or settings.DEFAULT_MODEL_NAME
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for worker in live_workers(model):
                if worker["state"] in {"ready", "failed"}:
                    return worker
            time.sleep(0.2)
        raise RuntimeError(f"no worker heartbeat for {model} said ready or failed")


@pytest.fixture(scope="session")
def stack(_deployment_namespace, django_db_setup, django_db_blocker):
    """daphne + a model worker on the test database, for the whole session."""
    from inference.registry import ensure_default_model

    with django_db_blocker.unblock():
        ensure_default_model()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1"}
    running = Stack(port, env)
    running.start("web", daphne_argv(host="127.0.0.1", port=port))
    running.start_worker()
    try:
        running.wait_http()
        running.wait_worker()
        running.wait_model()
        _RUNNING_STACKS.append(running)
        yield running
    finally:
        if running in _RUNNING_STACKS:
            _RUNNING_STACKS.remove(running)
        running.stop_all()


# The session's stack once started: its worker takes whatever any later test queues
# for the default model, whether that test asked for the stack or not.
_RUNNING_STACKS: list = []


@pytest.fixture
def default_model(transactional_db):
    from inference.registry import ensure_default_model

    return ensure_default_model()


@pytest.fixture
def cast(transactional_db):
    """Alice and Bob in team Red (Alice its admin); Charlie on his own; Sam is staff
    (the deployment's administrator), in no team."""
    from django.contrib.auth import get_user_model

    from mixtralweb.accounts.models import Membership, Team

    User = get_user_model()
    alice = User.objects.create_user("alice", "alice@example.com", "alice-pass-123")
    bob = User.objects.create_user("bob", "bob@example.com", "bob-pass-123")
    charlie = User.objects.create_user("charlie", "charlie@example.com", "charlie-pass-123")
    sam = User.objects.create_user("sam", "sam@example.com", "sam-pass-123", is_staff=True)
    red = Team.objects.create(name="Red")
    Membership.objects.create(team=red, user=alice, role=Membership.ADMIN)
    Membership.objects.create(team=red, user=bob)
    return type(
        "Cast", (), {"alice": alice, "bob": bob, "charlie": charlie, "sam": sam, "red": red}
    )


def session_cookie(user) -> str:
    """A logged-in session for `user`, as a Cookie header value."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


class WSClient:
    """A real websocket client (the `websockets` library) speaking our protocol."""

    def __init__(self, stack: Stack, user=None, origin: str | None = None, cookie=None):
        from websockets.sync.client import connect

        headers = {"Origin": origin or stack.http_url}
        if cookie or user is not None:
            headers["Cookie"] = cookie or session_cookie(user)
        self._connection = connect(stack.ws_url, additional_headers=headers, open_timeout=10)
        self.conn = self._connection.__enter__()

    def send(self, frame) -> None:
        self.conn.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    def recv(self, timeout: float = 30) -> dict:
        return json.loads(self.conn.recv(timeout=timeout))

    def recv_until(self, predicate, timeout: float = 60) -> tuple[dict, list[dict]]:
        """Frames up to and including the first that satisfies predicate."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; saw {[f.get('type') for f in seen]}")
            frame = self.recv(timeout=remaining)
            seen.append(frame)
            if predicate(frame):
                return frame, seen

    def close(self) -> None:
        self._connection.__exit__(None, None, None)


@pytest.fixture
def ws_factory(stack):
    clients = []

    def make(user=None, origin=None) -> WSClient:
        client = WSClient(stack, user, origin)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def redis_client():
    return redis.Redis.from_url(settings.REDIS_URL)


@pytest.fixture
def worker_heartbeat(redis_client):
    """announce(model_name): a live worker's heartbeat for the model in Redis, as a
    worker process writes it (inference/workers.py), for tests of pages that only
    ask whether a model is served and run nothing on it. Gone after the test."""
    from inference import workers

    keys = []

    def announce(model_name: str, state: str = "ready") -> None:
        beat = workers.Heartbeat(model_name, "cpu")
        key = workers.worker_key(beat.host, f"{beat.pid}-{len(keys)}")
        keys.append(key)
        redis_client.set(key, json.dumps({**beat.state, "state": state}), ex=60)
        redis_client.zadd(workers.index_key(), {key: time.time() + 60})

    yield announce
    if keys:
        redis_client.delete(*keys)
        redis_client.zrem(workers.index_key(), *keys)


@pytest.fixture(autouse=True)
def _workers_idle_before_the_tables_are_emptied(request):
    """For tests on a running stack or cluster: before pytest-django empties the
    tables, wait until no worker is still busy with a generation. A worker finishing
    its last writes (the usage rollups run after the final event) while the tables
    are truncated deadlocks with the flush.

    transactional_db is requested here, so this teardown runs before its flush."""
    readers = []
    empties_tables = "transactional_db" in request.fixturenames
    if "stack" in request.fixturenames or (_RUNNING_STACKS and empties_tables):
        from inference.workers import live_workers

        readers.append(live_workers)
    if "cluster" in request.fixturenames:
        readers.append(request.getfixturevalue("cluster").redis.worker_states)
    if not readers:
        yield
        return
    request.getfixturevalue("transactional_db")
    yield

    def busy() -> bool:
        try:
            return any(w.get("held") for read in readers for w in read())
        except redis.RedisError:
            return True  # a test restarted Redis: ask again

    # A worker holds a generation until its last write (inference/tasks.py).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and busy():
        time.sleep(0.05)
