"""Issue 17: a team at once. N users send a chat message at the same moment.

For each N it reports what the users feel: every user's time to first token and
the aggregate tokens/s (all completion tokens over the time from the sends to the
last final event). A second scenario sends one long prompt first and then three
short chats: their first tokens show what waiting behind a long prompt costs.

The peer, when there is a llama-server binary (LLAMA_SERVER, or the one that
`make llama-server` builds from the llama.cpp source that llama-cpp-python vendors,
var/peer/bin/llama-server), is llama.cpp's own server on its defaults, given the
same model file, the same prompts and the same max_tokens over its OpenAI-compatible
streaming API. The two alternate round by
round, so a change in the host's speed weighs on both alike. LLAMA_SERVER_ARGS
adds arguments to the peer's command line.

A third side, "engine", is our engine alone (inference/engine.py in the bench's
process, with the worker's load options, the same prompts through the chat template):
the gap between it and "ours" is the stack's (worker hand-off, Redis, web process),
the gap between it and the peers the engine's.

The last side, "llama.cpp batched", is llama.cpp's own batched decode with no
server around it: its `llama-batched` example (built beside llama-server by `make
llama-server`) decodes N sequences of one prompt in one batch per step, each with its
own sampler chain in C (top-k 40, top-p 0.95, temperature 0.7, as ours), on llama.cpp's
default thread count, with one unified KV pool (-kvu, as ours). Its figure is decode
only (the tokens after the shared prompt over the time the steps took): the ceiling a
server on this llama.cpp can reach.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from tests.bench.harness import (
    bench_user,
    peer_binary,
    prepare_database,
    start_peer,
    start_stack,
    ws_answer,
)
from tests.conftest import WSClient

ROUNDS = int(os.environ.get("CONCURRENCY_BENCH_ROUNDS", 3))
USERS = [int(n) for n in os.environ.get("CONCURRENCY_BENCH_USERS", "1,2,4,8").split(",")]
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


# --- llama.cpp's own batched decode: the llama-batched example --------------------
BATCHED_SPEED = re.compile(r"decoded (\d+) tokens in ([\d.]+) s, speed: ([\d.]+) t/s")


def batched_decode(binary: str, model_path: str, content: str, n: int, prompt_tokens: int):
    """Aggregate decode tokens/s of n sequences of content, MAX_TOKENS each."""
    run = subprocess.run(
        [binary, "-m", model_path, "-p", content, "-np", str(n), "-kvu"]
        + ["-n", str(prompt_tokens + MAX_TOKENS), "--temp", "0.7", "--top-p", "0.95"]
        + ["--top-k", "40", "--seed", str(n)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = BATCHED_SPEED.search(run.stdout + run.stderr)
    if run.returncode or not found:
        raise RuntimeError(f"llama-batched failed ({run.returncode}): {run.stderr[-2000:]}")
    return {"aggregate_tps": float(found.group(3)), "ttft_s": [float("nan")]}


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


def main() -> None:
    prepare_database()
    from django.conf import settings

    from inference.engine import Engine
    from inference.registry import embedded_model_path, ensure_default_model, load_options
    from inference.tokens import tokenizer_for
    from tests.bench.single_stream_bench import engine_answer

    model = ensure_default_model()
    binary = peer_binary()
    batched = binary and Path(binary).with_name("llama-batched")
    batched = str(batched) if batched and batched.exists() else None
    print(
        f"model {embedded_model_path().name}: n_parallel {model.n_parallel}, n_ctx "
        f"{model.n_ctx}; {ROUNDS} rounds; users {USERS}; peer: {binary or 'none'}; "
        f"batched: {batched or 'none'}",
        flush=True,
    )
    stack = start_stack()
    peer = url = None
    sockets: list[WSClient] = []
    results: dict[tuple[str, str], list[dict]] = {}

    def record(side: str, scenario: str, rows: list[dict], s: dict | None = None) -> None:
        s = s or summary(rows)
        results.setdefault((side, scenario), []).append(s)
        waits = ", ".join(f"{t:.2f}" for t in s["ttft_s"])
        print(f"  {side:7} {scenario:22} {s['aggregate_tps']:6.1f} tok/s  TTFT s: {waits}")

    def user(side: str, i: int, content: str, max_tokens: int, delay_s: float = 0.0):
        """User i's call on one side, sent delay_s after the others are released."""

        def call(go: threading.Event) -> dict:
            go.wait()
            time.sleep(delay_s)
            if side == "engine":
                params = {**SAMPLING, "max_tokens": max_tokens, "seed": i}
                return engine_answer(engine, tokenizer, content, params)
            if side == "ours":
                return ws_answer(sockets[i], content, {**SAMPLING, "max_tokens": max_tokens})
            return peer_one(url, content, max_tokens, go)

        return call

    engine = Engine(
        load_options(model), prefix_cache_bytes=settings.ENGINE_PREFIX_CACHE_MB * 2**20
    ).start()
    tokenizer = tokenizer_for(model.path)
    try:
        if binary:
            peer, url = start_peer(binary, str(embedded_model_path()))
        sockets += [WSClient(stack, bench_user(f"bench-{i}")) for i in range(max([*USERS, 4]))]
        at_once([user("ours", 0, "Hello.", 8)])  # warm-up
        if batched:
            from llama_cpp import Llama

            vocab = Llama(str(embedded_model_path()), vocab_only=True, verbose=False)
        for round_ in range(ROUNDS):
            if batched:
                # Raw text, no chat template (the example tokenizes without special
                # tokens): a story to continue, so that the model does not end at once.
                content = (
                    f"Chapter {round_ + 1}. The lighthouse keeper found a message in a bottle."
                )
                size = len(vocab.tokenize(content.encode()))
                for n in USERS:
                    figures = batched_decode(batched, str(embedded_model_path()), content, n, size)
                    record("batched", f"{n} users at once", [], figures)
            sides = ["ours", "engine", "peer"]
            for side in sides[round_ % 3 :] + sides[: round_ % 3]:
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
        engine.close()
        for ws in sockets:
            ws.close()
        stack.stop_all()
        if peer:
            peer.terminate()
            peer.wait(30)

    print("\nmedians over rounds:")
    print(f"  {'side':7} {'scenario':22} {'tok/s':>7} {'first TTFT s':>13} {'last TTFT s':>12}")
    for (side, scenario), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tps = statistics.median(r["aggregate_tps"] for r in runs)
        first = statistics.median(r["ttft_s"][0] for r in runs)
        last = statistics.median(r["ttft_s"][-1] for r in runs)
        print(f"  {side:7} {scenario:22} {tps:7.1f} {first:13.2f} {last:12.2f}")
