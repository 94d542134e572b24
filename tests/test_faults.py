"""Faults: a worker killed mid-answer, Redis restarting, the database going away, a
model file missing when its worker starts.

Each runs the real product (daphne, a Celery model worker, Redis, PostgreSQL,
SmolLM2) on a Redis of its own, so that killing and restarting touch nothing else.
A model file damaged after registration is tested in tests/test_worker.py
(test_a_worker_whose_model_file_is_damaged_reports_failed_with_the_reason).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from django.conf import settings as django_settings

from inference.models import Generation
from tests.cluster import (
    Cluster,
    Reader,
    RedisServer,
    connect,
    merge,
    send,
    until_final,
    wait_for,
)
from tests.conftest import ROOT, WSClient, database_url

STORY = "Write a long story about a lighthouse keeper and a storm."


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker, redis_server):
    from inference.registry import ensure_default_model

    with django_db_blocker.unblock():
        ensure_default_model()
    running = Cluster("faults", redis_server)
    try:
        running.start_web()
        running.start_worker()
        yield running
    finally:
        running.stop()


@pytest.fixture
def serving(cluster, default_model):
    """A worker is up and has the model loaded (a test before may have killed it)."""
    if not any(
        w.processes and next(iter(w.processes.values())).poll() is None for w in cluster.workers
    ):
        cluster.workers.clear()
        cluster.start_worker()
    cluster.wait_ready(1)
    return cluster


def holder(cluster: Cluster, gen_id: int):
    """The worker (its Stack) running the generation (Generation.worker is host:pid)."""
    worker = wait_for(
        lambda: (
            Generation.objects.filter(pk=gen_id, state="running")
            .values_list("worker", flat=True)
            .first()
        ),
        60,
        what="the generation running",
    )
    pid = int(worker.rsplit(":", 1)[1])
    (stack,) = [w for w in cluster.workers if cluster.worker_pid(w) == pid]
    return stack, pid


def kill_worker(cluster: Cluster, stack) -> None:
    os.kill(cluster.worker_pid(stack), signal.SIGKILL)
    next(iter(stack.processes.values())).wait(10)
    cluster.workers.remove(stack)


def reap_until(cluster: Cluster, predicate, what: str, timeout_s: float = 60):
    """Have the cluster's ops worker run the reaper (a beat task every 30 s; here
    every 2 s) until predicate holds."""
    if cluster.ops is None:
        cluster.start_ops()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cluster.run_task("inference.tasks.reap_stale_generations")
        try:
            return wait_for(predicate, 2, 0.2, what)
        except TimeoutError:
            continue
    raise TimeoutError(f"{what} not met within {timeout_s} s")


def test_an_answer_whose_worker_is_killed_continues_on_another_from_the_text_so_far(serving, cast):
    serving.start_worker()
    serving.wait_ready(2)
    ws = connect(serving.webs[0], cast.alice)
    accepted = send(ws, content=STORY, params={"max_tokens": 160, "seed": 3})
    reader = Reader(ws, accepted["generation"])
    seen_before = reader.until_chars(20)
    stack, first_pid = holder(serving, reader.gen_id)
    kill_worker(serving, stack)

    # Once its heartbeat expires (1 s intervals here), the reaper sends it again and
    # the other worker continues it.
    reap_until(
        serving,
        lambda: Generation.objects.filter(pk=reader.gen_id, attempts=2).exists(),
        "the answer sent to the other worker",
    )
    final = reader.until_final()
    ws.close()
    gen = Generation.objects.get(pk=reader.gen_id)
    assert gen.state == Generation.DONE and gen.attempts == 2
    assert int(gen.worker.rsplit(":", 1)[1]) != first_pid
    started = [f for f in reader.frames if f["type"] == "generation.started"]
    assert started and started[-1]["worker"] == gen.worker, "the user was not told"
    # Nothing the user saw was lost or repeated: the answer continues from it.
    assert gen.text.startswith(seen_before) and len(gen.text) > len(seen_before)
    assert reader.text == gen.text == final["text"]


def test_an_answer_whose_worker_dies_twice_fails_with_the_reason_and_keeps_its_text(serving, cast):
    serving.start_worker()
    serving.wait_ready(2)
    ws = connect(serving.webs[0], cast.alice)
    accepted = send(ws, content=STORY, params={"max_tokens": 300, "seed": 4})
    reader = Reader(ws, accepted["generation"])
    reader.until_chars(20)
    stack, _ = holder(serving, reader.gen_id)
    kill_worker(serving, stack)
    reap_until(
        serving,
        lambda: Generation.objects.filter(pk=reader.gen_id, attempts=2).exists(),
        "the answer sent to the other worker",
    )
    # The other worker continues it; kill that one too once it streams.
    reader.read_until(lambda f: f["type"] == "generation.started")
    seen_before = reader.until_chars(len(reader.text) + 10)
    stack, _ = holder(serving, reader.gen_id)
    serving.start_worker()  # a worker for the model is up again: still no third try
    kill_worker(serving, stack)
    serving.wait_ready(1)
    reap_until(
        serving,
        lambda: Generation.objects.filter(pk=reader.gen_id, state="failed").exists(),
        "the reaper failing the answer",
    )

    final = reader.until_final()
    ws.close()
    gen = Generation.objects.get(pk=reader.gen_id)
    assert gen.state == Generation.FAILED and final["state"] == "failed"
    assert "stopped during this answer 2 times" in final["reason"] == gen.reason
    assert gen.text.startswith(seen_before) and final["text"] == gen.text


def test_a_worker_killed_with_no_other_leaves_its_answers_failed_with_the_reason_and_text(
    serving, cast
):
    """Several answers in flight on the one worker: every one ends failed with its
    reason and the text it had, none stays running."""
    sockets, readers = [], []
    for i in range(3):
        ws = connect(serving.webs[0], cast.alice)
        accepted = send(ws, content=f"{STORY} Part {i}.", params={"max_tokens": 400, "seed": i})
        sockets.append(ws)
        readers.append(Reader(ws, accepted["generation"]))
    seen = [reader.until_chars(10) for reader in readers]
    (stack,) = serving.workers
    kill_worker(serving, stack)

    reap_until(
        serving,
        lambda: not Generation.objects.filter(state__in=["queued", "running"]).exists(),
        "the reaper ending every answer",
    )
    for reader, seen_before, ws in zip(readers, seen, sockets, strict=True):
        final = reader.until_final(timeout_s=10)
        ws.close()
        gen = Generation.objects.get(pk=reader.gen_id)
        assert gen.state == Generation.FAILED and final["state"] == "failed"
        assert "stopped responding" in final["reason"] and final["reason"] == gen.reason
        assert gen.text.startswith(seen_before) and final["text"] == gen.text


def answer(web, user, content: str = "Name a colour.") -> tuple[Generation, str]:
    ws = connect(web, user)
    try:
        accepted = send(ws, content=content, params={"max_tokens": 16})
        assert accepted["type"] == "chat.accepted", accepted
        final, frames = until_final(ws, accepted["generation"])
    finally:
        ws.close()
    return Generation.objects.get(pk=accepted["generation"]), merge(frames, final["generation"])


def test_after_redis_restarts_while_idle_the_web_server_and_the_worker_reconnect(
    serving, cast, redis_server
):
    web = serving.webs[0]
    idle = connect(web, cast.alice)
    redis_server.restart()
    serving.wait_ready(1)  # the heartbeat is written again into the empty Redis

    gen, streamed = answer(web, cast.alice)
    assert gen.state == Generation.DONE and streamed == gen.text
    # The socket that was open across the restart still works.
    idle.send({"type": "ping", "request_id": 9})
    assert idle.recv(timeout=10)["type"] == "pong"
    idle.close()
    assert all(
        p.poll() is None for s in serving.webs + serving.workers for p in s.processes.values()
    )


def test_a_worker_whose_kept_database_connection_was_closed_answers_at_once_on_a_new_one(
    serving, cast
):
    """A connection closed since the last answer (a database restart; here its
    backends terminated) is found by Django's health check before the next task's
    first query, which runs at once on a new connection: not retried later like a
    database that is down."""
    import psutil
    from django.db import connection

    web = serving.webs[0]
    (worker,) = serving.workers
    log_file = ROOT / "var" / "test-logs" / f"{next(iter(worker.processes))}.log"
    log_start = log_file.stat().st_size
    gen, _ = answer(web, cast.alice)  # the worker keeps this answer's connection
    assert gen.state == Generation.DONE
    worker_pid = int(gen.worker.rsplit(":", 1)[1])

    # The task's listeners run after its final event: wait until it has returned.
    def logged_since(start: int) -> str:
        return log_file.read_bytes()[start:].decode()

    wait_for(lambda: "succeeded in" in logged_since(log_start), 30, 0.05, "the task's end")
    log_start = log_file.stat().st_size
    # That process's connections to the database, and only those (other servers of
    # the test session share the database): closed by the server, as in a restart.
    ports = [
        c.laddr.port
        for c in psutil.Process(worker_pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == int(django_settings.DATABASES["default"]["PORT"] or 5432)
    ]
    assert ports
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND client_port = ANY(%s)",
            [ports],
        )
        assert cursor.fetchone()[0] == len(ports)

    gen, streamed = answer(web, cast.alice)
    assert gen.state == Generation.DONE and streamed == gen.text
    assert int(gen.worker.rsplit(":", 1)[1]) == worker_pid
    assert "the database is not answering" not in logged_since(log_start)


def test_after_redis_restarts_during_a_stream_the_answer_ends_and_the_next_one_works(
    serving, cast, redis_server
):
    web = serving.webs[0]
    ws = connect(web, cast.alice)
    accepted = send(ws, content=STORY, params={"max_tokens": 200, "seed": 6})
    reader = Reader(ws, accepted["generation"])
    seen_before = reader.until_chars(20)
    redis_server.restart()

    # The same socket goes on: the web server's and the worker's connections retry.
    final = reader.until_final(timeout_s=90)
    ws.close()
    gen = Generation.objects.get(pk=reader.gen_id)
    assert final["state"] == gen.state == Generation.DONE
    assert gen.text.startswith(seen_before) and reader.text == final["text"] == gen.text

    serving.wait_ready(1)
    nxt, streamed = answer(web, cast.alice)
    assert nxt.state == Generation.DONE and streamed == nxt.text


def test_a_worker_whose_model_file_is_missing_reports_it_and_chat_says_it_is_unavailable(
    serving, cast, tmp_path
):
    from inference.registry import register_model
    from tests.fixtures import tiny_mixtral

    path = tiny_mixtral.build_tiny_mixtral(tmp_path / "gone.gguf")
    register_model(name="gone-mixtral", path=path, n_ctx=512)
    path.unlink()
    worker = serving.start_worker(model="gone-mixtral")
    try:
        (state,) = wait_for(
            lambda: [
                w
                for w in serving.redis.worker_states()
                if w["model"] == "gone-mixtral" and w["state"] == "failed"
            ],
            60,
            what="the worker reporting failed",
        )
        assert "gone.gguf" in state["reason"] and "no such file" in state["reason"].lower()

        ws = connect(serving.webs[0], cast.alice)
        reply = send(ws, model="gone-mixtral", content="Hello?")
        ws.close()
        assert reply["type"] == "error" and reply["code"] == "no_worker"
        # The user learns it is unavailable; the file path is for staff only.
        assert "not available" in reply["message"] and "gone.gguf" not in reply["message"]
        page = get_page(serving.webs[0], "/workers/", cast.sam)
        assert "is not available: its worker failed to load it" in page and "gone.gguf" in page
        # The worker process stays up (no crash loop) and says why, until fixed.
        assert next(iter(worker.processes.values())).poll() is None
    finally:
        worker.stop_all()
        serving.workers.remove(worker)


def get_page(web, path: str, user=None, cookie: str | None = None):
    from tests.conftest import session_cookie

    headers = {"Cookie": cookie or session_cookie(user)}
    request = urllib.request.Request(f"{web.http_url}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.read().decode()


# --- the database becomes unavailable ---------------------------------------------


def admin_sql(*statements: str) -> None:
    """Run statements on the server's maintenance database (never the test database)."""
    db = django_settings.DATABASES["default"]
    with psycopg.connect(
        host=db.get("HOST") or "127.0.0.1",
        port=db.get("PORT") or 5432,
        user=db.get("USER") or "postgres",
        password=db.get("PASSWORD") or None,
        dbname="postgres",
        autocommit=True,
    ) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture(scope="module")
def outage_db(django_db_setup):
    """A database of our own, migrated, with a user: this one we may make unavailable."""
    if django_settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("the outage test needs PostgreSQL")
    name = f"{django_settings.DATABASES['default']['NAME']}_outage"
    admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    url = database_url().rsplit("/", 1)[0] + f"/{name}"
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    script = (
        "from django.contrib.auth import get_user_model; from django.test import Client; "
        "from django.conf import settings; from inference.registry import ensure_default_model; "
        "ensure_default_model(); "
        "u = get_user_model().objects.create_user('dora', 'd@example.com', 'dora-pass-123'); "
        "c = Client(); c.force_login(u); "
        "print(settings.SESSION_COOKIE_NAME + '=' + c.cookies[settings.SESSION_COOKIE_NAME].value)"
    )
    cookie = (
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", script],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    yield type("OutageDB", (), {"name": name, "url": url, "cookie": cookie})
    admin_sql(
        f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true',
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
    )


def status_of(web, path: str, cookie: str) -> tuple[int, str, dict]:
    request = urllib.request.Request(f"{web.http_url}{path}", headers={"Cookie": cookie})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


class CookieClient(WSClient):
    """A websocket client logged in by a session cookie of another database."""

    def __init__(self, web, cookie: str):
        from websockets.sync.client import connect as ws_connect

        headers = {"Origin": web.http_url, "Cookie": cookie}
        self._connection = ws_connect(web.ws_url, additional_headers=headers, open_timeout=10)
        self.conn = self._connection.__enter__()


def test_while_the_database_is_unavailable_pages_answer_503_and_nothing_crash_loops(
    outage_db, tmp_path
):
    redis_server = RedisServer(tmp_path).start()
    running = Cluster("outage", redis_server, DATABASE_URL=outage_db.url)
    try:
        web = running.start_web()
        worker = running.start_worker()
        running.wait_ready(1)
        assert status_of(web, "/", outage_db.cookie)[0] == 200
        ws = CookieClient(web, outage_db.cookie)

        admin_sql(
            f'ALTER DATABASE "{outage_db.name}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{outage_db.name}'",
        )
        for path in ["/", "/workers/", "/usage/"]:
            status, body, headers = status_of(web, path, outage_db.cookie)
            assert status == 503, (path, status)
            assert "temporarily unavailable" in body and "database is not answering" in body
            assert headers.get("Retry-After")
        # An open socket gets an error for a message it cannot store, and stays open.
        ws.send({"type": "chat.send", "request_id": 5, "content": "Are you there?"})
        reply, _ = ws.recv_until(lambda f: f.get("request_id") == 5, timeout=30)
        assert reply["type"] == "error"
        ws.send({"type": "ping", "request_id": 6})
        assert ws.recv_until(lambda f: f["type"] == "pong")[0]["request_id"] == 6
        time.sleep(3)  # the worker's heartbeat meets the outage a few times
        processes = [p for s in (web, worker) for p in s.processes.values()]
        assert all(p.poll() is None for p in processes), "a process died during the outage"

        admin_sql(f'ALTER DATABASE "{outage_db.name}" ALLOW_CONNECTIONS true')
        wait_for(
            lambda: status_of(web, "/", outage_db.cookie)[0] == 200,
            30,
            0.5,
            "the chat page answering again",
        )
        # The same processes serve a whole answer again.
        ws.send(
            {"type": "chat.send", "request_id": 7, "content": "Hi!", "params": {"max_tokens": 8}}
        )
        accepted, _ = ws.recv_until(lambda f: f.get("request_id") == 7, timeout=30)
        assert accepted["type"] == "chat.accepted", accepted
        final, _ = until_final(ws, accepted["generation"])
        assert final["state"] == "done" and final["text"]
        ws.close()
        assert all(p.poll() is None for p in processes)
    finally:
        admin_sql(f'ALTER DATABASE "{outage_db.name}" ALLOW_CONNECTIONS true')
        running.stop()
        redis_server.kill()


def test_an_answer_whose_worker_finds_the_database_down_is_claimed_once_it_is_back(
    outage_db, tmp_path
):
    redis_server = RedisServer(tmp_path).start()
    running = Cluster("outage-claim", redis_server, DATABASE_URL=outage_db.url)
    try:
        web = running.start_web()
        worker = running.start_worker()
        running.wait_ready(1)
        log_file = ROOT / "var" / "test-logs" / f"{next(iter(worker.processes))}.log"
        log_start = log_file.stat().st_size
        script = (
            "from django.contrib.auth import get_user_model; "
            "from inference.models import Generation; "
            "from inference.registry import ensure_default_model; "
            "m = ensure_default_model(); "
            "g = Generation.objects.create(user=get_user_model().objects.get(username='dora'), "
            "model=m, input_messages=[{'role': 'user', 'content': 'Hi!'}], "
            "params={'max_tokens': 8}); print(g.pk, m.queue_name)"
        )
        env = {**os.environ, "DATABASE_URL": outage_db.url}
        shell = [sys.executable, "manage.py", "shell", "-c", script]
        made = subprocess.run(shell, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        gen_id, queue = made.stdout.split()[-2:]

        admin_sql(
            f'ALTER DATABASE "{outage_db.name}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{outage_db.name}'",
        )
        # The committed generation's message reaches the worker while the database
        # is down: the claim fails, and the worker asks again later.
        from inference.tasks import generate
        from mixtralweb.celery import app

        with app.connection_for_write(redis_server.url) as connection:
            generate.apply_async(args=[int(gen_id)], queue=queue, connection=connection)

        def retries() -> int:
            return log_file.read_bytes()[log_start:].decode().count("the database is not answering")

        # Four failed claims (1 + 2 + 4 s apart): past Celery's default of three retries.
        wait_for(lambda: retries() >= 4, 45, 0.2, "the worker to meet the outage and retry")
        admin_sql(f'ALTER DATABASE "{outage_db.name}" ALLOW_CONNECTIONS true')

        ws = CookieClient(web, outage_db.cookie)
        ws.send({"type": "generation.subscribe", "generation": int(gen_id)})
        final, _ = ws.recv_until(
            lambda f: (
                f.get("generation") == int(gen_id)
                and f["type"] in {"generation.snapshot", "generation.final"}
                and f["state"] in {"done", "failed", "cancelled"}
            ),
            timeout=120,
        )
        assert final["state"] == "done" and final["text"], final
        assert all(p.poll() is None for p in worker.processes.values())
        ws.close()
    finally:
        admin_sql(f'ALTER DATABASE "{outage_db.name}" ALLOW_CONNECTIONS true')
        running.stop()
        redis_server.kill()
