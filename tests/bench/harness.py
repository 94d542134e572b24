"""Shared set-up for benchmarks: a migrated bench database, the running stack, a chat
over its websocket, and llama.cpp's own server as the peer."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management import call_command

from mixtralweb.web_server import daphne_argv
from tests.conftest import LOG_DIR, Stack, WSClient, free_port

ROOT = Path(__file__).resolve().parents[2]
PEER_LOG = LOG_DIR / "bench-llama-server.log"


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or f"sqlite:///{settings.DATABASES['default']['NAME']}"


def prepare_database() -> None:
    """Create (PostgreSQL) and migrate the bench database."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("postgresql"):
        import psycopg

        admin = psycopg.connect(
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
            user=db.get("USER") or "postgres",
            dbname="postgres",
            autocommit=True,
        )
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]])
        if not exists.fetchone():
            admin.execute(f'CREATE DATABASE "{db["NAME"]}"')
        admin.close()
    call_command("migrate", interactive=False, verbosity=0)


def start_stack() -> Stack:
    from inference.registry import ensure_default_model

    ensure_default_model()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1"}
    stack = Stack(port, env)
    stack.start("bench-web", daphne_argv(host="127.0.0.1", port=port))
    stack.start_worker("bench-worker")
    stack.wait_http()
    stack.wait_worker()
    return stack


def bench_user(username: str = "bench"):
    from django.contrib.auth import get_user_model

    User = get_user_model()
    user, _ = User.objects.get_or_create(username=username)
    return user


# --- llama.cpp's own server, the peer of the comparisons ------------------------------
# `make llama-server` builds it from the llama.cpp source that llama-cpp-python vendors.
BUILT_PEER = ROOT / "var" / "peer" / "bin" / "llama-server"
# Extra llama-server arguments, only where its defaults cannot run at all (a VM that
# advertises AMX without allowing it crashes the default weight repacking: "-nr",
# llama.cpp issue 20824).
PEER_ARGS = os.environ.get("LLAMA_SERVER_ARGS", "").split()


def peer_binary() -> str | None:
    """The llama-server to compare with: LLAMA_SERVER, else the one `make llama-server`
    built, else None."""
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    return str(BUILT_PEER) if BUILT_PEER.exists() else None


def start_peer(binary: str, model_path: str, *args: str) -> tuple[subprocess.Popen, str]:
    """llama-server on its defaults (plus args and LLAMA_SERVER_ARGS) on a free port,
    ready; its log goes to var/test-logs/bench-llama-server.log."""
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(PEER_LOG, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [binary, "-m", model_path, "--host", "127.0.0.1", "--port", str(port), *args, *PEER_ARGS],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"llama-server did not become ready (its log: {PEER_LOG})")


def peer_settings() -> list[str]:
    """The lines of llama-server's log that say the settings it chose (threads,
    slots, context)."""
    wanted = ("n_threads", "n_slots", "n_ctx_seq", "n_batch", "n_ubatch")
    lines = PEER_LOG.read_text(errors="replace").splitlines() if PEER_LOG.exists() else []
    return [line.strip() for line in lines if any(w in line for w in wanted)]


# --- our stack: a chat over the websocket -----------------------------------------------
def ws_answer(ws: WSClient, content: str, params: dict, start: threading.Event | None = None):
    """One chat message over the websocket, timed on the client's clock: sent, first
    and last token frames, the final frame, completion tokens, the generation's id,
    and each token's lag from the worker producing it to its frame arriving (s)."""
    if start is not None:
        start.wait()
    sent = time.time()
    ws.send({"type": "chat.send", "content": content, "params": params})
    first = last = generation = None
    lags = []
    while True:
        frame = json.loads(ws.conn.recv(timeout=600))
        now = time.time()
        if frame["type"] == "chat.accepted":
            generation = frame["generation"]
        elif frame["type"] == "generation.token":
            first = first or now
            last = now
            lags.extend(now - at for at in frame.get("produced_at", ()))
        elif frame["type"] == "generation.final":
            return {
                "sent": sent,
                "first": first or now,
                "last": last or now,
                "end": now,
                "tokens": frame["metrics"]["completion_tokens"],
                "generation": generation,
                "lags": lags,
            }
        elif frame["type"] == "error":
            raise RuntimeError(frame)


def worker_idle(timeout_s: float = 30) -> None:
    """Wait until no worker reports a generation running or held (the heartbeat lets
    one go after the run's listeners), then a moment for its last statements."""
    from inference.workers import live_workers

    def busy() -> bool:
        return any(w.get("generations") or w.get("held") for w in live_workers())

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and busy():
        time.sleep(0.05)
    time.sleep(0.3)


def ttft_segments(gen_id: int, sent: float, received: float) -> dict:
    """Where the end-to-end time to first token went, from the generation's own
    timestamps (same host, same clock)."""
    from inference.models import Generation

    gen = Generation.objects.select_related("metrics").get(pk=gen_id)
    queued, started = gen.queued_at.timestamp(), gen.started_at.timestamp()
    first = gen.first_token_at.timestamp()
    prompt_eval_s = gen.metrics.prompt_eval_ms / 1000
    return {
        "client → queued (the web process, its transaction)": (queued - sent) * 1000,
        "queued → claimed (Celery hand-off, claim)": (started - queued) * 1000,
        "claimed → prompt evaluation starts": (first - prompt_eval_s - started) * 1000,
        "prompt evaluation + first token": prompt_eval_s * 1000,
        "first token → client": (received - first) * 1000,
    }
