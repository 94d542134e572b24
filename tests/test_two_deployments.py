"""Two deployments on one Redis, each left on its defaults, never meet.

Two `make run` stacks (manage.py runstack), each with its own SQLite database in its
own VAR_DIR, share one Redis database and no REDIS_NAMESPACE. Their generation ids
are the same numbers (both databases start at 1). Each answers its own API calls,
all at once: no task taken by the other's worker, no stop request crossing over,
every key each one writes under its own namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from django.conf import settings

from tests.cluster import wait_for
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

CREATE_KEY = """
import secrets
from django.contrib.auth import get_user_model
from mixtralweb import namespace
from mixtralweb.accounts.models import ApiKey
secret = ApiKey.TOKEN_PREFIX + secrets.token_urlsafe(32)
user = get_user_model().objects.get(username="admin")
ApiKey.objects.create(user=user, name="probe", prefix=secret[:12],
                      secret_hash=ApiKey.hash_secret(secret))
print(namespace.namespace(), secret)
"""

LAST_GENERATIONS = """
from inference.models import Generation
for g in Generation.objects.order_by("pk"):
    print(g.pk, g.state, g.stopped_by or "-", g.worker)
"""


class Deployment:
    def __init__(self, var: Path):
        self.port = free_port()
        self.env = {
            **os.environ,
            "VAR_DIR": str(var),
            "DATABASE_URL": f"sqlite:///{var}/db.sqlite3",
            "REDIS_URL": settings.REDIS_URL,
            "PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
        }
        # Each on its defaults: no namespace given (the suite's own is in the env).
        for name in ("REDIS_NAMESPACE", "DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD"):
            self.env.pop(name, None)
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runstack"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def manage(self, code: str) -> str:
        return subprocess.run(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout

    def api(self, key: str, content: str) -> tuple[int, dict]:
        body = json.dumps(
            {
                "model": settings.DEFAULT_MODEL_NAME,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 8,
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            self.process.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.mark.timeout(420)
def test_two_deployments_on_one_redis_answer_only_their_own(tmp_path):
    a, b = Deployment(tmp_path / "a"), Deployment(tmp_path / "b")
    shared = redis.Redis.from_url(settings.REDIS_URL)
    before = set(shared.scan_iter(count=1000))
    try:
        for d in (a, b):
            wait_for(lambda d=d: "password:" in "".join(d.lines), 120, what="runstack ready")
        (ns_a, key_a), (ns_b, key_b) = (
            d.manage(CREATE_KEY).splitlines()[-1].split() for d in (a, b)
        )
        assert ns_a != ns_b, "two deployments on their defaults share a namespace"

        def ready(ns):
            return [
                k
                for k in shared.keys(f"{ns}:worker:*")
                if json.loads(shared.get(k) or "{}").get("state") == "ready"
            ]

        wait_for(lambda: ready(ns_a) and ready(ns_b), 180, what="both model workers ready")

        # Four calls on each at once: the same generation ids, 1 to 4, on both sides.
        results: dict[tuple[str, int], tuple[int, dict]] = {}

        def call(name, d, key, i):
            results[name, i] = d.api(key, f"Say the number {i}.")

        threads = [
            threading.Thread(target=call, args=(name, d, key, i))
            for name, d, key in (("a", a, key_a), ("b", b, key_b))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert len(results) == 8
        for (name, i), (status, body) in sorted(results.items()):
            assert status == 200, (name, i, body)
            choice = body["choices"][0]
            assert choice["message"]["content"] and choice["finish_reason"] in ("stop", "length")

        # Each deployment's generations ran on its own worker, and none was stopped.
        def generations(d):
            return [line.split() for line in d.manage(LAST_GENERATIONS).splitlines()]

        workers = {}
        for name, d, ns in (("a", a, ns_a), ("b", b, ns_b)):
            rows = generations(d)
            assert [row[:3] for row in rows] == [[str(n), "done", "-"] for n in range(1, 5)]
            own = {f"{s['host']}:{s['pid']}" for s in map(json.loads, shared.mget(ready(ns)))}
            assert {row[3] for row in rows} <= own, f"{name}'s answers came from elsewhere"
            workers[name] = own
        assert not workers["a"] & workers["b"]

        # Everything either wrote to Redis is under its own namespace: its keys and
        # its channel groups (Celery's bookkeeping and the suite's own keys aside).
        for key in set(shared.scan_iter(count=1000)) - before:
            key = key.decode(errors="replace")
            if key.startswith("asgi:group:"):
                key = key.removeprefix("asgi:group:")
            elif not key.startswith("mxw-"):
                continue
            assert key.startswith((ns_a, ns_b, "test-")), key
    finally:
        a.stop()
        b.stop()
