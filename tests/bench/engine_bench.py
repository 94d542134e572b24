"""Issue 3: the engine's prefix reuse and stop latency.

1. An 8-turn conversation, each turn adding about 400 tokens (a user message and a
   short answer): time to first token per turn with prefix reuse (the worker keeps
   its context), without it (every turn evaluates the whole history), and with two
   conversations interleaved turn by turn (the other one's KV state comes back from
   the saved-state LRU). In this process, on the embedded model, so that only the
   engine is measured. Target: turn 8 <= 1.5 x turn 1 with reuse.
2. Stop latency through the running stack: the time from sending generation.stop on
   the websocket to receiving generation.final, while decoding and while a long
   prompt is being evaluated (llama.cpp's abort callback). Target: p95 <= 100 ms.
"""

from __future__ import annotations

import json
import os
import time

from inference.engine import Engine, PrefixCache, RunStats, Sampling
from inference.registry import embedded_model_path, load_options
from tests.bench.harness import bench_user, prepare_database, start_stack
from tests.conftest import WSClient

TURNS = 8
TOKENS_PER_TURN = 400
ANSWER_TOKENS = 16
STOP_RUNS = int(os.environ.get("ENGINE_BENCH_STOP_RUNS", 20))
# "stop", "turns" or both (the default): which half of the benchmark runs.
PARTS = os.environ.get("ENGINE_BENCH_PARTS", "stop,turns").split(",")
SAMPLING = Sampling(max_tokens=ANSWER_TOKENS, temperature=0.0, seed=1)


def percentile(values, pct):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


def user_turn(engine: Engine, conversation: str, turn: int) -> str:
    """A user message of about TOKENS_PER_TURN - ANSWER_TOKENS tokens."""
    words = []
    target = TOKENS_PER_TURN - ANSWER_TOKENS - 8  # the template adds a few per turn
    i = 0
    while len(engine.tokenize(" ".join(words))) < target:
        words.append(f"In {conversation} turn {turn}, note {i} says the weather held.")
        i += 1
    return " ".join(words)


def one_turn(engine: Engine, messages: list[dict]) -> tuple[float, int, str, float]:
    """(TTFT ms, cached tokens, answer, CPU seconds to the first token).

    CPU seconds (all of this process's threads) are reported next to the wall time
    because on a shared 2-core machine the wall time mostly measures the neighbours.
    """
    import threading

    stats = RunStats()
    prompt = engine.chat_prompt_tokens(messages)
    cpu_started = time.process_time()
    cpu_first = None
    pieces = []
    for piece in engine.stream(prompt, SAMPLING, threading.Event(), stats):
        if cpu_first is None:
            cpu_first = time.process_time() - cpu_started
        pieces.append(piece)
    if cpu_first is None:
        cpu_first = time.process_time() - cpu_started
    return stats.prompt_eval_s * 1000, stats.cached_tokens, "".join(pieces), cpu_first


def conversation_ttfts(
    engine: Engine, name: str, *, reuse: bool, prompts: list | None = None
) -> list[tuple]:
    messages, rows = [], []
    for turn in range(1, TURNS + 1):
        messages.append({"role": "user", "content": user_turn(engine, name, turn)})
        if not reuse:
            engine.llm.reset()
            engine.prefix_cache = PrefixCache(0)
        ttft_ms, cached, answer, cpu_s = one_turn(engine, messages)
        prompt = engine.chat_prompt_tokens(messages)
        prompt_tokens = len(prompt)
        if prompts is not None:
            prompts.append((prompt, cached))
        messages.append({"role": "assistant", "content": answer})
        rows.append((turn, prompt_tokens, cached, ttft_ms, cpu_s))
        print(
            f"  {name} turn {turn}: {prompt_tokens} tokens, {cached} cached, TTFT {ttft_ms:.0f} ms",
            flush=True,
        )
    return rows


def raw_floor_ms(engine: Engine, prompt: list[int], cached: int, repeats: int = 3) -> float:
    """llama.cpp alone evaluating what the engine had to evaluate for that turn: the
    tokens after `cached`, at the same positions (the context holds prompt[:cached]
    first, untimed). The median of `repeats`. No engine, no sampling: the floor."""
    llm = engine.llm
    times = []
    for _ in range(repeats):
        llm.reset()
        if cached:
            llm.eval(prompt[:cached])
        started = time.perf_counter()
        llm.eval(prompt[cached:])
        times.append((time.perf_counter() - started) * 1000)
    llm.reset()
    return sorted(times)[len(times) // 2]


def interleaved_ttfts(engine: Engine) -> list[tuple]:
    """Conversations A and B alternate; the rows are A's turns."""
    histories = {"A": [], "B": []}
    rows = []
    for turn in range(1, TURNS + 1):
        for name in ("A", "B"):
            messages = histories[name]
            messages.append({"role": "user", "content": user_turn(engine, f"talk {name}", turn)})
            ttft_ms, cached, answer, cpu_s = one_turn(engine, messages)
            prompt_tokens = len(engine.chat_prompt_tokens(messages))
            messages.append({"role": "assistant", "content": answer})
            if name == "A":
                rows.append((turn, prompt_tokens, cached, ttft_ms, cpu_s))
            print(
                f"  interleaved {name} turn {turn}: {prompt_tokens} tokens, {cached} cached, "
                f"TTFT {ttft_ms:.0f} ms, {cpu_s:.1f} CPU-s",
                flush=True,
            )
    return rows


def stop_latencies(stack, user, *, during_prompt: bool) -> list[float]:
    ws = WSClient(stack, user)
    latencies = []
    for run in range(STOP_RUNS):
        if during_prompt:
            content = f"Run {run}. " + " ".join(f"Entry {i}: all quiet." for i in range(300))
            wait_for = "generation.progress"
        else:
            content = f"Run {run}: write a long story about a lighthouse keeper."
            wait_for = "generation.token"
        ws.send({"type": "chat.send", "content": content, "params": {"max_tokens": 400}})
        gen_id = None
        while True:
            frame = json.loads(ws.conn.recv(timeout=300))
            if frame["type"] == "error":
                raise RuntimeError(frame)
            if frame["type"] == "chat.accepted":
                gen_id = frame["generation"]
            if frame["type"] == wait_for and frame.get("generation") == gen_id:
                break
        sent = time.perf_counter()
        ws.send({"type": "generation.stop", "generation": gen_id})
        while True:
            frame = json.loads(ws.conn.recv(timeout=300))
            if frame["type"] == "generation.final" and frame["generation"] == gen_id:
                latencies.append((time.perf_counter() - sent) * 1000)
                print(f"  stop {wait_for} run {run}: {latencies[-1]:.0f} ms", flush=True)
                break
    ws.close()
    return latencies


def main() -> None:
    prepare_database()
    from inference.registry import ensure_default_model

    model = ensure_default_model()
    options = load_options(model)
    print(
        f"model: {embedded_model_path().name}, n_ctx {options.n_ctx}, n_batch {options.n_batch}, "
        f"{TURNS} turns of ~{TOKENS_PER_TURN} tokens, answers of {ANSWER_TOKENS} tokens"
    )
    if "stop" in PARTS:
        stack = start_stack()
        try:
            stack.wait_model()
            # A user each: 20 runs of two frames each stay under the socket's rate limit
            # (WS_RATE_LIMIT_FRAMES per window), which a quick stop would otherwise reach.
            decoding = stop_latencies(stack, bench_user("engine-bench-1"), during_prompt=False)
            prompting = stop_latencies(stack, bench_user("engine-bench-2"), during_prompt=True)
        finally:
            stack.stop_all()
        print(
            "\n| stop latency (stop sent -> final received) | runs | p50 ms | p95 ms | max ms |"
            "\n|---|---|---|---|---|"
        )
        for label, values in (
            ("while decoding", decoding),
            ("during prompt evaluation", prompting),
        ):
            print(
                f"| {label} | {len(values)} | {percentile(values, 50):.0f} | "
                f"{percentile(values, 95):.0f} | {max(values):.0f} |"
            )

    if "turns" not in PARTS:
        return
    engine = Engine(options, prefix_cache_bytes=1024 * 1024 * 1024)
    one_turn(engine, [{"role": "user", "content": "Warm up."}])
    prompts: list = []
    reuse = conversation_ttfts(engine, "talk R", reuse=True, prompts=prompts)
    floor_1 = raw_floor_ms(engine, *prompts[0])
    floor_8 = raw_floor_ms(engine, *prompts[-1])
    interleaved = interleaved_ttfts(Engine(options, prefix_cache_bytes=1024 * 1024 * 1024))
    fresh = conversation_ttfts(engine, "talk F", reuse=False)
    del engine

    print(
        "\n| turn | prompt tokens | reuse: cached | reuse: TTFT ms | reuse: CPU-s "
        "| no reuse: TTFT ms | no reuse: CPU-s | interleaved + LRU: cached "
        "| interleaved: TTFT ms | interleaved: CPU-s |\n" + "|---" * 10 + "|"
    )
    for r, f, i in zip(reuse, fresh, interleaved, strict=True):
        print(
            f"| {r[0]} | {r[1]:,} | {r[2]:,} | {r[3]:.0f} | {r[4]:.1f} | {f[3]:.0f} | {f[4]:.1f} "
            f"| {i[2]:,} | {i[3]:.0f} | {i[4]:.1f} |"
        )
    for label, rows in (("reuse", reuse), ("no reuse", fresh), ("interleaved", interleaved)):
        print(
            f"turn 8 / turn 1, {label}: {rows[-1][3] / rows[0][3]:.2f} wall, "
            f"{rows[-1][4] / rows[0][4]:.2f} CPU (target with reuse <= 1.5)"
        )
    print(
        f"floor, llama.cpp alone on the same new tokens at the same positions: turn 1 "
        f"{floor_1:.0f} ms, turn 8 {floor_8:.0f} ms, turn 8 / turn 1 {floor_8 / floor_1:.2f}"
    )
