"""Issue 17: a team at once. N users send a chat message at the same moment.

For each N it reports what the users feel: every user's time to first token and
the aggregate tokens/s (all completion tokens over the time from the sends to the
last final event). A second scenario sends one long prompt first and then three
short chats: their first tokens show what waiting behind a long prompt costs.

The peer, when LLAMA_SERVER names a llama-server binary (built from the llama.cpp
source that llama-cpp-python vendors: `make llama-server`), is llama.cpp's own
server on its defaults, given the same model file, the same prompts and the same
max_tokens over its OpenAI-compatible streaming API. The two alternate round by
round, so a change in the host's speed weighs on both alike. LLAMA_SERVER_ARGS
adds arguments to the peer's command line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
import urllib.request

from tests.bench.harness import bench_user, prepare_database, start_stack
from tests.conftest import WSClient, free_port

# Extra llama-server arguments, only where its defaults cannot run at all (a VM that
# advertises AMX without allowing it crashes the default weight repacking: "-nr").
PEER_ARGS = os.environ.get("LLAMA_SERVER_ARGS", "").split()
ROUNDS = int(os.environ.get("CONCURRENCY_BENCH_ROUNDS", 3))
USERS = [int(n) for n in os.environ.get("CONCURRENCY_BENCH_USERS", "1,4,8").split(",")]
MAX_TOKENS = 128
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "max_tokens": MAX_TOKENS}
LONG_PROMPT = (
    " ".join(
        f"Paragraph {i}: the lighthouse keeper logged the weather, the ships and the tide."
        for i in range(150)
    )
    + "\nSummarise the log in one sentence."
)


def prompt(user: int, round_: int) -> str:
    return (
        f"User {user}, round {round_}: write a long story about a lighthouse keeper "
        "who finds a message in a bottle."
    )


# --- our stack: one websocket per user ----------------------------------------------
def ours_one(ws: WSClient, content: str, max_tokens: int, start: threading.Event) -> dict:
    start.wait()
    sent = time.time()
    ws.send(
        {"type": "chat.send", "content": content, "params": {**SAMPLING, "max_tokens": max_tokens}}
    )
    first = None
    while True:
        frame = json.loads(ws.conn.recv(timeout=600))
        if frame["type"] == "generation.token" and first is None:
            first = time.time()
        elif frame["type"] == "generation.final":
            return {
                "sent": sent,
                "first": first or time.time(),
                "end": time.time(),
                "tokens": frame["metrics"]["completion_tokens"],
            }
        elif frame["type"] == "error":
            raise RuntimeError(frame)


# --- the peer: llama-server's OpenAI-compatible streaming -------------------------
def peer_one(url: str, content: str, max_tokens: int, start: threading.Event) -> dict:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "stream_options": {"include_usage": True},
            **{**SAMPLING, "max_tokens": max_tokens},
        }
    ).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    start.wait()
    sent = time.time()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.time()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"sent": sent, "first": first or time.time(), "end": time.time(), "tokens": tokens}


def at_once(calls) -> list[dict]:
    """Run the calls in threads released together; their results in order."""
    start = threading.Event()
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call(start)
        except Exception as error:  # noqa: BLE001 - reported with the table
            results[i] = error

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    start.set()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def summary(rows: list[dict]) -> dict:
    t0 = min(r["sent"] for r in rows)
    return {
        "aggregate_tps": sum(r["tokens"] for r in rows) / (max(r["end"] for r in rows) - t0),
        "ttft_s": sorted(r["first"] - r["sent"] for r in rows),
    }


def start_peer(binary: str, model_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [binary, "-m", model_path, "--host", "127.0.0.1", "--port", str(port), *PEER_ARGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("llama-server did not become ready")


def main() -> None:
    prepare_database()
    from inference.registry import embedded_model_path, ensure_default_model

    model = ensure_default_model()
    peer_binary = os.environ.get("LLAMA_SERVER")
    print(
        f"model {embedded_model_path().name}: n_parallel {model.n_parallel}, n_ctx "
        f"{model.n_ctx}; {ROUNDS} rounds; users {USERS}; peer: {peer_binary or 'none'}",
        flush=True,
    )
    stack = start_stack()
    peer = url = None
    sockets: list[WSClient] = []
    results: dict[tuple[str, str], list[dict]] = {}

    def record(side: str, scenario: str, rows: list[dict]) -> None:
        s = summary(rows)
        results.setdefault((side, scenario), []).append(s)
        waits = ", ".join(f"{t:.2f}" for t in s["ttft_s"])
        print(f"  {side:5} {scenario:22} {s['aggregate_tps']:6.1f} tok/s  TTFT s: {waits}")

    def user(side: str, i: int, content: str, max_tokens: int, delay_s: float = 0.0):
        """User i's call on one side, sent delay_s after the others are released."""

        def call(go: threading.Event) -> dict:
            go.wait()
            time.sleep(delay_s)
            if side == "ours":
                return ours_one(sockets[i], content, max_tokens, go)
            return peer_one(url, content, max_tokens, go)

        return call

    try:
        if peer_binary:
            peer, url = start_peer(peer_binary, str(embedded_model_path()))
        sockets += [WSClient(stack, bench_user(f"bench-{i}")) for i in range(max([*USERS, 4]))]
        at_once([user("ours", 0, "Hello.", 8)])  # warm-up
        for round_ in range(ROUNDS):
            for side in ["ours", "peer"] if round_ % 2 == 0 else ["peer", "ours"]:
                if side == "peer" and not peer:
                    continue
                for n in USERS:
                    calls = [user(side, i, prompt(i, round_), MAX_TOKENS) for i in range(n)]
                    record(side, f"{n} users at once", at_once(calls))
                # One long prompt, then three short chats half a second later.
                long_call = user(side, 0, f"{round_} {LONG_PROMPT}", 16)
                chats = [user(side, i, prompt(i, round_), 32, delay_s=0.5) for i in range(1, 4)]
                record(side, "3 chats behind a long", at_once([long_call, *chats])[1:])
    finally:
        for ws in sockets:
            ws.close()
        stack.stop_all()
        if peer:
            peer.terminate()
            peer.wait(30)

    print("\nmedians over rounds:")
    print(f"  {'side':5} {'scenario':22} {'tok/s':>7} {'first TTFT s':>13} {'last TTFT s':>12}")
    for (side, scenario), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tps = statistics.median(r["aggregate_tps"] for r in runs)
        first = statistics.median(r["ttft_s"][0] for r in runs)
        last = statistics.median(r["ttft_s"][-1] for r in runs)
        print(f"  {side:5} {scenario:22} {tps:7.1f} {first:13.2f} {last:12.2f}")
