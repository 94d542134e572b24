"""`make loadtest`: many users chatting over websockets at once, then an audit.

Runs the real stack (one daphne, model workers for SmolLM2, a redis-server of its
own, the PostgreSQL database named by DATABASE_URL) and simulates LOAD_USERS users
(default 100). Each opens one socket and sends LOAD_MESSAGES messages (default 3)
in one conversation, thinking a few seconds between them, with short answers
(LOAD_MAX_TOKENS, default 20). It reports:

- per-user fairness: each user's mean wait (send to first token) against the
  mean of all, and the longest single wait;
- queue wait (queued to started, from the database) and time to first token (as
  the client saw it, and as the worker measured it), p50 and p95;
- the web process's peak memory (RSS of the daphne process, sampled).

Then it audits what was stored: every message sent has exactly one stored user
message and one finished assistant message, the text each client assembled from
the stream equals the stored text, and nothing failed. The results are written
to var/loadtest/result.json; docs/loadtest.md records a run.

Quotas: the load users get a Quota row with no limits (0), so that whatever the
defaults of this deployment are, they are not refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "var" / "loadtest"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


USERS = env_int("LOAD_USERS", 100)
MESSAGES = env_int("LOAD_MESSAGES", 3)
MAX_TOKENS = env_int("LOAD_MAX_TOKENS", 20)
WORKERS = env_int("LOAD_WORKERS", 1)
THINK_S = (2.0, 8.0)  # between a user's answer and their next message
ARRIVAL_S = 30.0  # users arrive spread over this long
ANSWER_TIMEOUT_S = 900.0

# Handshakes the server dropped (each then retried, as the page does).
HANDSHAKE_FAILURES: list[str] = []

PROMPTS = [
    "Name a fruit that is yellow.",
    "Give me one word that rhymes with cat.",
    "What colour is the sky on a clear day?",
    "Say hello in French.",
    "Name a planet.",
    "What is two plus two?",
]


@dataclass
class Sent:
    """One message a user sent and what the socket showed of its answer."""

    user: str
    content: str
    sent_at: float
    conversation: int | None = None
    generation: int | None = None
    first_token_at: float | None = None
    final_at: float | None = None
    streamed: str = ""
    final_state: str = ""
    final_text: str = ""
    errors: list = field(default_factory=list)

    @property
    def wait_s(self) -> float | None:
        """Send to first token, as the user experienced it."""
        return None if self.first_token_at is None else self.first_token_at - self.sent_at


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- set-up ---------------------------------------------------------------------


def start_redis(data_dir: str) -> tuple[subprocess.Popen, str]:
    from tests.conftest import free_port

    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            data_dir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"redis://127.0.0.1:{port}/0"


def make_users() -> dict[str, str]:
    """The load users (and their unlimited quotas); username -> session cookie."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from mixtralweb.accounts.models import Quota

    User = get_user_model()
    cookies = {}
    for i in range(USERS):
        user, _ = User.objects.get_or_create(username=f"load-{i:03d}")
        Quota.objects.update_or_create(
            user=user,
            defaults={"tokens_per_day": 0, "requests_per_minute": 0, "concurrent_generations": 0},
        )
        client = Client()
        client.force_login(user)
        cookies[user.username] = (
            f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        )
    return cookies


def wait_workers_ready(count: int, timeout_s: float = 120) -> None:
    """Until `count` model workers' heartbeats say ready (this deployment's own)."""
    from inference.workers import live_workers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if [w["state"] for w in live_workers()].count("ready") >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{count} model worker(s) did not become ready")


# --- the simulated users --------------------------------------------------------


async def one_user(name: str, cookie: str, ws_url: str, origin: str, log: list[Sent]) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake

    rng = random.Random(name)
    await asyncio.sleep(rng.uniform(0, ARRIVAL_S))
    conversation = None
    # As static/js/chat.js does: a failed handshake is retried after 0.5 s, doubling.
    backoff_s = 0.5
    for attempt in range(6):
        try:
            ws = await connect(
                ws_url,
                additional_headers={"Cookie": cookie, "Origin": origin},
                open_timeout=60,
                max_size=None,
            )
            break
        except (OSError, InvalidHandshake) as exc:
            HANDSHAKE_FAILURES.append(f"{name}: {exc!r}")
            if attempt == 5:
                raise
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 10.0)
    async with ws:
        for turn in range(MESSAGES):
            if turn:
                await asyncio.sleep(rng.uniform(*THINK_S))
            content = f"{rng.choice(PROMPTS)} (turn {turn + 1})"
            sent = Sent(user=name, content=content, sent_at=time.monotonic())
            log.append(sent)
            frame = {
                "type": "chat.send",
                "request_id": turn,
                "content": content,
                "conversation": conversation,
                "params": {"max_tokens": MAX_TOKENS, "seed": turn},
            }
            await ws.send(json.dumps(frame))
            await asyncio.wait_for(follow(ws, sent), ANSWER_TIMEOUT_S)
            conversation = sent.conversation
            if sent.errors:
                return


async def follow(ws, sent: Sent) -> None:
    """Read frames until this message's answer is final; assemble the stream."""
    while True:
        frame = json.loads(await ws.recv())
        kind = frame.get("type")
        if kind == "error":
            sent.errors.append(frame)
            return
        if kind == "chat.accepted":
            sent.conversation, sent.generation = frame["conversation"], frame["generation"]
            continue
        if sent.generation is None or frame.get("generation") != sent.generation:
            continue
        if kind == "generation.snapshot" and len(frame["text"]) > len(sent.streamed):
            sent.streamed = frame["text"]
        elif kind == "generation.token":
            if sent.first_token_at is None:
                sent.first_token_at = time.monotonic()
            if frame["offset"] > len(sent.streamed):
                sent.errors.append({"code": "gap", "offset": frame["offset"]})
            sent.streamed += frame["text"][len(sent.streamed) - frame["offset"] :]
        elif kind == "generation.final":
            sent.final_at = time.monotonic()
            sent.final_state, sent.final_text = frame["state"], frame["text"]
            if sent.first_token_at is None:  # an empty answer: its end is its first sign
                sent.first_token_at = sent.final_at
            return


async def sample_peak_rss(pid: int, stop: asyncio.Event) -> int:
    import psutil

    process = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss)
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    return peak


async def simulate(cookies: dict[str, str], web) -> tuple[list[Sent], int, int, float]:
    import psutil

    (daphne,) = web.processes.values()
    log: list[Sent] = []
    stop = asyncio.Event()
    idle_rss = psutil.Process(daphne.pid).memory_info().rss
    sampler = asyncio.ensure_future(sample_peak_rss(daphne.pid, stop))
    started = time.monotonic()
    results = await asyncio.gather(
        *(one_user(n, c, web.ws_url, web.http_url, log) for n, c in cookies.items()),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - started
    stop.set()
    peak = await sampler
    for name, result in zip(cookies, results, strict=True):
        if isinstance(result, BaseException):
            log.append(Sent(user=name, content="", sent_at=0, errors=[repr(result)]))
    return log, idle_rss, peak, elapsed


# --- the report and the audit ---------------------------------------------------


def audit(log: list[Sent]) -> list[str]:
    """What is wrong with the stored data, in words; empty when nothing is."""
    from inference.models import Generation, Message

    problems = []
    for sent in log:
        where = f"{sent.user} {sent.content!r}"
        if sent.errors:
            problems.append(f"{where}: errors {sent.errors}")
            continue
        users = Message.objects.filter(
            conversation_id=sent.conversation, role=Message.USER, content=sent.content
        )
        if users.count() != 1:
            problems.append(f"{where}: {users.count()} stored user messages")
        answers = Message.objects.filter(generation_id=sent.generation, role=Message.ASSISTANT)
        if answers.count() != 1:
            problems.append(f"{where}: {answers.count()} stored assistant messages")
        gen = Generation.objects.get(pk=sent.generation)
        if gen.state != Generation.DONE or sent.final_state != "done":
            problems.append(f"{where}: state {gen.state} ({gen.reason})")
        if not (sent.streamed == gen.text == sent.final_text):
            problems.append(f"{where}: streamed {sent.streamed!r} != stored {gen.text!r}")
    failed = Generation.objects.exclude(state=Generation.DONE).count()
    if failed:
        problems.append(f"{failed} generations in the database are not done")
    expected = len([s for s in log if s.content])
    stored = Message.objects.filter(role=Message.USER, author__username__startswith="load-")
    if stored.count() != expected:
        problems.append(f"{stored.count()} user messages stored for {expected} sent")
    return problems


def report(log, idle_rss: int, peak_rss: int, elapsed_s: float, problems: list[str]) -> dict:
    from inference.models import Generation

    done = [s for s in log if s.wait_s is not None]
    waits = [s.wait_s for s in done]
    per_user: dict[str, list[float]] = {}
    for s in done:
        per_user.setdefault(s.user, []).append(s.wait_s)
    user_means = {u: statistics.mean(w) for u, w in per_user.items()}
    gens = Generation.objects.filter(pk__in=[s.generation for s in done]).select_related("metrics")
    queue_s = [(g.started_at - g.queued_at).total_seconds() for g in gens if g.started_at]
    worker_ttft_s = [g.metrics.ttft_ms / 1000 for g in gens if g.metrics and g.metrics.ttft_ms]
    tokens = sum(g.metrics.completion_tokens for g in gens if g.metrics)
    mean_wait = statistics.mean(waits) if waits else float("nan")
    return {
        "users": USERS,
        "messages_per_user": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "workers": WORKERS,
        "messages_answered": len(done),
        "elapsed_s": round(elapsed_s, 1),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed_s, 1) if elapsed_s else None,
        "wait_s": {
            "mean": round(mean_wait, 2),
            "p50": round(percentile(waits, 50), 2),
            "p95": round(percentile(waits, 95), 2),
            "max": round(max(waits), 2) if waits else None,
        },
        "fairness": {
            "worst_user_mean_wait_s": round(max(user_means.values()), 2) if user_means else None,
            "best_user_mean_wait_s": round(min(user_means.values()), 2) if user_means else None,
            "worst_user_over_mean": round(max(user_means.values()) / mean_wait, 2)
            if user_means
            else None,
            "longest_wait_over_mean": round(max(waits) / mean_wait, 2) if waits else None,
        },
        "queue_wait_s": {
            "p50": round(percentile(queue_s, 50), 2),
            "p95": round(percentile(queue_s, 95), 2),
        },
        "ttft_client_s": {
            "p50": round(percentile(waits, 50), 2),
            "p95": round(percentile(waits, 95), 2),
        },
        "ttft_worker_s": {
            "p50": round(percentile(worker_ttft_s, 50), 3),
            "p95": round(percentile(worker_ttft_s, 95), 3),
        },
        "handshakes_retried": len(HANDSHAKE_FAILURES),
        "handshake_failures": HANDSHAKE_FAILURES[:10],
        "web_rss_mib": {"idle": round(idle_rss / 2**20, 1), "peak": round(peak_rss / 2**20, 1)},
        "audit_problems": problems,
    }


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
    # A database of its own, never the one DATABASE_URL names: load users stay out.
    os.environ["DATABASE_URL"] = os.environ.get(
        "LOAD_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/mixtralweb_load"
    )
    data_dir = tempfile.mkdtemp(prefix="loadtest-redis-")
    redis_process, redis_url = start_redis(data_dir)
    os.environ["REDIS_URL"] = redis_url
    os.environ.setdefault("CHAT_REQUIRE_WORKER", "true")
    django.setup()

    from inference.models import Generation
    from inference.registry import ensure_default_model
    from mixtralweb.web_server import daphne_argv
    from tests.bench.harness import prepare_database
    from tests.conftest import Stack, free_port

    prepare_database()
    ensure_default_model()
    # Each run starts from no load users' history, so the audit sees only this run.
    Generation.objects.filter(user__username__startswith="load-").delete()
    from inference.models import Conversation

    Conversation.objects.filter(owner__username__startswith="load-").delete()
    cookies = make_users()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if WORKERS > 1:
        env.setdefault("LLAMA_N_THREADS", "1")
    web = Stack(free_port(), env)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    web.start("load-web", daphne_argv(host="127.0.0.1", port=web.port))
    workers = [Stack(0, env) for _ in range(WORKERS)]
    try:
        for i, worker in enumerate(workers):
            worker.start_worker(f"load-worker{i}")
        web.wait_http()
        wait_workers_ready(WORKERS)
        print(f"{USERS} users x {MESSAGES} messages, max_tokens {MAX_TOKENS}, {WORKERS} worker(s)")
        log, idle_rss, peak_rss, elapsed = asyncio.run(simulate(cookies, web))
        problems = audit(log)
        result = report(log, idle_rss, peak_rss, elapsed, problems)
    finally:
        web.stop_all()
        for worker in workers:
            worker.stop_all()
        redis_process.kill()
        redis_process.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
    (OUT_DIR / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("audit:", "no problems" if not problems else f"{len(problems)} problem(s)")
    for problem in problems[:20]:
        print("  -", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
