"""A product of several processes on its own Redis, for scale-out and fault tests.

The session `stack` shares one Redis database with the rest of the suite; the tests
here kill, restart and multiply processes, so they run their own redis-server (on a
free port; it saves its data only when restarted) and their own daphne and Celery
processes on the test database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from django.conf import settings

from mixtralweb import namespace
from mixtralweb.web_server import daphne_argv
from tests.conftest import LOG_DIR, Stack, database_url, free_port


def wait_for(predicate, timeout_s: float = 30.0, every_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


class RedisServer:
    """A redis-server of our own, which a test may stop and start again."""

    def __init__(self, data_dir: Path):
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> RedisServer:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, 0.05, "redis-server answering")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """Stop at once, losing every key (SIGKILL, nothing saved)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def restart(self, down_s: float = 1.0) -> None:
        """Restart as an operator would: save to disk, stop, start again on the same
        port and data (every client's connection is closed meanwhile)."""
        try:
            self.client().shutdown(save=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it stops
        self.process.wait(20)
        time.sleep(down_s)
        self.start()

    def worker_states(self) -> list[dict]:
        """The live heartbeats (inference/workers.py) in this Redis."""
        client = self.client()
        keys = list(client.scan_iter(match=namespace.key("worker", "*")))
        return [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []


class Cluster:
    """Several daphne processes and model workers sharing one Redis and the test DB."""

    def __init__(self, name: str, redis_server: RedisServer, **env):
        self.name = name
        self.redis = redis_server
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "REDIS_URL": redis_server.url,
            "PYTHONUNBUFFERED": "1",
            # Two model workers share the machine's cores.
            "LLAMA_N_THREADS": "1",
            "WORKER_HEARTBEAT_INTERVAL_S": "1",
            "GENERATION_FLUSH_INTERVAL_S": "0.5",
            **{key: str(value) for key, value in env.items()},
        }
        self.webs: list[Stack] = []
        self.workers: list[Stack] = []
        self.ops: Stack | None = None

    def start_web(self) -> Stack:
        web = Stack(free_port(), self.env)
        web.start(f"{self.name}-web{len(self.webs)}", daphne_argv(host="127.0.0.1", port=web.port))
        web.wait_http()
        self.webs.append(web)
        return web

    def start_worker(self, model: str | None = None) -> Stack:
        worker = Stack(0, self.env)
        worker.start_worker(f"{self.name}-worker{len(self.workers)}", model=model)
        self.workers.append(worker)
        return worker

    def start_ops(self) -> Stack:
        """The ops worker: the reapers and the other maintenance tasks."""
        ops = Stack(0, self.env)
        ops.start(
            f"{self.name}-ops",
            [
                str(Path(sys.executable).parent / "celery"),
                "-A",
                "mixtralweb",
                "worker",
                "--queues",
                namespace.ops_queue(),
                "--pool",
                "solo",
                "--hostname",
                f"{self.name}-ops@%h",
                "--without-gossip",
                "--without-mingle",
            ],
        )
        self.ops = ops
        return ops

    def run_task(self, name: str) -> None:
        """Send a maintenance task to this cluster's ops worker (as beat does)."""
        from mixtralweb.celery import app

        with app.connection_for_write(self.redis.url) as connection:
            app.send_task(name, queue=namespace.ops_queue(), connection=connection)

    def worker_pid(self, worker: Stack) -> int:
        """The Celery main process of a worker (modelworker execs into it)."""
        (process,) = worker.processes.values()
        return process.pid

    def wait_ready(self, count: int, model: str | None = None, timeout_s: float = 90) -> list:
        model = model or settings.DEFAULT_MODEL_NAME

        def ready():
            states = [w for w in self.redis.worker_states() if w["model"] == model]
            ready = [w for w in states if w["state"] in {"ready", "busy"}]
            return ready if len(ready) >= count else None

        return wait_for(ready, timeout_s, 0.2, f"{count} ready worker(s) for {model}")

    def stop(self) -> None:
        for stack in self.webs + self.workers + ([self.ops] if self.ops else []):
            stack.stop_all()


def connect(web: Stack, user):
    """A websocket client of `user` on the daphne process `web`."""
    from tests.conftest import WSClient

    return WSClient(web, user)


def send(ws, **frame) -> dict:
    """chat.send; returns chat.accepted (or the error frame)."""
    ws.send({"type": "chat.send", "request_id": 1, **frame})
    reply, _ = ws.recv_until(lambda f: f["type"] in {"chat.accepted", "error"})
    return reply


def merge(frames: list[dict], gen_id: int, streamed: str = "") -> str:
    """The answer as a client builds it from snapshots and token frames (by offset)."""
    for f in frames:
        if f.get("generation") != gen_id:
            continue
        if f["type"] == "generation.snapshot":
            streamed = f["text"] if len(f["text"]) > len(streamed) else streamed
        if f["type"] == "generation.token":
            assert f["offset"] <= len(streamed), "a token frame skipped text"
            streamed += f["text"][len(streamed) - f["offset"] :]
    return streamed


def until_final(ws, gen_id: int, timeout_s: float = 120) -> tuple[dict, list[dict]]:
    return ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == gen_id, timeout=timeout_s
    )


class Reader:
    """Follows one generation on a socket the way static/js/chat.js does: snapshots
    and token frames by offset, and on a gap asks for a fresh snapshot."""

    def __init__(self, ws, gen_id: int):
        self.ws, self.gen_id = ws, gen_id
        self.text = ""
        self.frames: list[dict] = []
        self.gaps = 0
        self._resyncing = False

    def read_until(self, predicate, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"not met; saw {[f.get('type') for f in self.frames[-20:]]}")
            frame = self.ws.recv(timeout=remaining)
            self.frames.append(frame)
            if frame.get("generation") == self.gen_id:
                self._take(frame)
            if predicate(frame):
                return frame

    def _take(self, frame: dict) -> None:
        if frame["type"] == "generation.snapshot":
            self._resyncing = False
            if len(frame["text"]) > len(self.text):
                self.text = frame["text"]
        elif frame["type"] == "generation.token" and not self._resyncing:
            if frame["offset"] > len(self.text):
                self.gaps += 1
                self._resyncing = True
                self.ws.send({"type": "generation.subscribe", "generation": self.gen_id})
            else:
                self.text += frame["text"][len(self.text) - frame["offset"] :]

    def until_chars(self, min_chars: int) -> str:
        frame = self.read_until(
            lambda f: len(self.text) >= min_chars or f["type"] == "generation.final"
        )
        assert frame["type"] != "generation.final", f"the answer ended early: {frame}"
        return self.text

    def until_final(self, timeout_s: float = 120) -> dict:
        return self.read_until(
            lambda f: f["type"] == "generation.final" and f["generation"] == self.gen_id,
            timeout_s,
        )
