"""`make run`'s launcher (manage.py runstack), run the way a new user runs it: an
empty SQLite database in its own var/, no Redis answering at REDIS_URL (so it
starts a local redis-server with its data in var/), the first admin with a
password printed once, one combined log prefixed by process, and Ctrl-C stopping
everything."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import redis

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(what)


def test_make_run_starts_everything_on_sqlite_and_a_local_redis_and_ctrl_c_stops_it(tmp_path):
    var = tmp_path / "var"
    port, redis_port = free_port(), free_port()
    env = {
        **os.environ,
        "VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var}/db.sqlite3",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runstack"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    log = lambda: "".join(lines)  # noqa: E731
    local_redis = redis.Redis(port=redis_port, socket_connect_timeout=1)
    try:
        password = wait_for(
            lambda: re.search(r"password: (\S+)", log()), 120, "no admin password printed"
        ).group(1)

        def ready_workers():
            try:
                states = [
                    json.loads(raw) for raw in local_redis.mget(local_redis.keys("*:worker:*"))
                ]
            except (redis.RedisError, redis.DataError):
                return []
            return [s for s in states if s and s["state"] == "ready"]

        (worker,) = wait_for(ready_workers, 180, "the model worker never became ready")
        assert worker["model"] == "smollm2-135m" and worker["device"] == "cpu"
        assert (var / "redis").is_dir(), "the local redis-server keeps its data in var/"
        assert (var / "db.sqlite3").is_file()

        # The printed password logs the admin in.
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        base = f"http://127.0.0.1:{port}"
        page = wait_for(lambda: _get(opener, f"{base}/login/"), 60, "the web server never answered")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = urllib.parse.urlencode(
            {"username": "admin", "password": password, "csrfmiddlewaretoken": token}
        ).encode()
        request = urllib.request.Request(f"{base}/login/", data=form, headers={"Referer": base})
        with opener.open(request, timeout=30) as response:
            assert response.url.rstrip("/") == base, "the login did not go through"
        assert "sessionid" in {cookie.name for cookie in jar}

        text = log()
        for name in ("web", "worker", "ops", "beat", "redis"):
            assert re.search(rf"^\S+ {name}\s+\|", text, re.M), f"no {name} lines in the log"
        assert text.count(password) == 1, "the password is shown once only"
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        try:
            returncode = process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    reader.join(10)
    assert returncode in (0, 130, -signal.SIGINT), log()[-3000:]
    # Nothing is left running: the group is empty and the local Redis has stopped.
    wait_for(lambda: not _group_alive(process.pid), 30, "processes survived Ctrl-C")
    try:
        local_redis.ping()
        raise AssertionError("the local redis-server still answers after Ctrl-C")
    except redis.ConnectionError:
        pass


def _get(opener, url: str) -> str | None:
    try:
        with opener.open(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
