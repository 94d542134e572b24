"""Issue 25: one stream, ours against llama.cpp's own server, both out of the box.

One user, one 256-token answer at a time, with a chat's sampling (temperature 0.7,
top_p 0.95) and a seed, from three sides in turn:
- ours through the chat websocket (the browser's path);
- ours through `/v1/chat/completions` (docs/api.md), with an API key the bench creates;
- llama-server (`make llama-server`: built from the llama.cpp source that
  llama-cpp-python vendors) on its defaults, the same GGUF, `-c 8192` (our context),
  through its own `/v1/chat/completions`;
- our engine alone (inference/engine.py, in the bench's process, with the worker's
  load options): what the model loop gives without the stack around it, so that the
  gap to llama-server splits into the engine's part and the stack's.
Both API sides are called with the official openai client. In every round each side
answers two prompts: the same prompt as every time (held in the server's prompt
cache, as a conversation's earlier turns are: a one-token answer to it just before
makes sure, since llama-server gives a new prompt the slot that held it), and a new one (the
same words behind a number no call has used before, so its prompt is evaluated
anew; same length in tokens). For each prompt the three sides take turns, in an
order that rotates from round to round, so that the host's drift weighs on all.

Measured on the client's clock: the first token (send to the first piece of text)
and decode tokens/s (completion tokens less one over the time from the first to the
last piece of text). Printed: every answer; then, per prompt, the median and the
range (min–max over rounds) of ours / llama-server for decode and of ours −
llama-server for the first token, against the issue's targets; then where the time
went: each server's own measure of its decode speed and prompt evaluation, our
first token by segment, and the CPU each process used during an answer.

SINGLE_STREAM_BENCH_ROUNDS (6) sets the rounds; LLAMA_SERVER the binary (default the
one `make llama-server` built); LLAMA_SERVER_ARGS adds arguments where its defaults
cannot run (-nr on a CPU whose AMX traps).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time

import psutil
from django.conf import settings
from django.utils import timezone

from tests.bench.harness import (
    ROOT,
    bench_user,
    peer_binary,
    peer_settings,
    prepare_database,
    start_peer,
    start_stack,
    ttft_segments,
    worker_idle,
    ws_answer,
)
from tests.conftest import WSClient

ROUNDS = int(os.environ.get("SINGLE_STREAM_BENCH_ROUNDS", 6))
PEER_CTX = 8192
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "seed": 1234, "max_tokens": 256}
WORDS = (
    "write a long, detailed story about a lighthouse keeper who finds a message in a "
    "bottle. Describe the sea, the weather and every room of the lighthouse."
)
SIDES = ["websocket", "api", "llama-server", "engine"]
LABELS = {
    "websocket": "ours (websocket)",
    "api": "ours (API)",
    "llama-server": "llama-server",
    "engine": "engine alone",
}
PROMPTS = {"same prompt": "same", "new prompt": "new"}
# Targets of issue 25, both sides on their defaults.
DECODE_TARGET = 0.95
FIRST_TOKEN_TARGET_MS = 30


def prompt_text(number: int) -> str:
    return f"Story {number:03d}: {WORDS}"


# --- one answer through an OpenAI-compatible API, with the official client --------------
def api_answer(client, model: str, content: str, params: dict) -> dict:
    sent = time.time()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        stream=True,
        stream_options={"include_usage": True},
        **params,
    )
    first = last = ident = usage = timings = None
    for chunk in stream:
        now = time.time()
        ident = ident or chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        usage = chunk.usage or usage
        timings = (chunk.model_extra or {}).get("timings") or timings  # llama-server's
    end = time.time()
    # Ours names the generation in the id ("chatcmpl-<pk>"); llama-server a random one.
    suffix = ident.rsplit("-", 1)[-1] if ident else ""
    generation = int(suffix) if suffix.isdigit() else None
    return {
        "sent": sent,
        "first": first or end,
        "last": last or end,
        "end": end,
        "tokens": usage.completion_tokens if usage else 0,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "generation": generation,
        "timings": timings,
    }


# --- one answer from the engine alone, in this process -----------------------------------
def engine_answer(engine, tokenizer, content: str, params: dict) -> dict:
    from inference.engine import Request, Sampling

    sampling = Sampling(
        max_tokens=params["max_tokens"],
        temperature=params["temperature"],
        top_p=params["top_p"],
        seed=params["seed"],
    )
    prompt = tokenizer.chat_tokens([{"role": "user", "content": content}])
    sent = time.time()
    request = engine.submit(Request(prompt=prompt, sampling=sampling, tenant="user:bench"))
    first = last = None
    while True:
        kind, value = request.events.get()
        now = time.time()
        if kind == "text":
            first = first or now
            last = now
        elif kind == "end":
            break
    stats = request.stats
    return {
        "sent": sent,
        "first": first or now,
        "last": last or now,
        "end": now,
        "tokens": stats.completion_tokens,
        "server_decode_tps": stats.decode_tokens_per_s,
        "prompt_eval_ms": (stats.prompt_eval_s or 0) * 1000,
        "prompt_tokens": len(prompt),
        "cached_tokens": stats.cached_tokens,
    }


# --- the CPU each process used during an answer ------------------------------------------
class CpuMeter:
    """CPU seconds (user + system) of each group of processes, read before and after an
    answer: how many of the host's cores each used while the model decoded."""

    def __init__(self, pids: dict[str, int]):
        # group → the pid at its root; its children count too, except this process's
        # (the stack and llama-server are its children)
        self.pids = pids

    def _groups(self) -> dict[str, list[psutil.Process]]:
        groups: dict[str, list[psutil.Process]] = {"redis": [], "postgres": []}
        for name, pid in self.pids.items():
            try:
                root = psutil.Process(pid)
                children = root.children(recursive=True) if pid != os.getpid() else []
                groups[name] = [root, *children]
            except psutil.NoSuchProcess:
                groups[name] = []
        for process in psutil.process_iter(["name"]):
            if process.info["name"] == "redis-server":
                groups["redis"].append(process)
            elif (process.info["name"] or "").startswith("postgres"):
                groups["postgres"].append(process)
        return groups

    def read(self) -> dict[str, float]:
        totals = {}
        for name, processes in self._groups().items():
            seconds = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                    seconds += times.user + times.system
                except psutil.Error:
                    pass
            totals[name] = seconds
        return totals


def our_side(result: dict) -> dict:
    """What the worker measured of the generation, and where its first token's time went."""
    from monitoring.models import RequestMetrics

    for _ in range(50):
        metrics = RequestMetrics.objects.filter(generation_id=result["generation"]).first()
        if metrics:
            break
        time.sleep(0.1)
    else:
        return {}
    return {
        "server_decode_tps": metrics.decode_tokens_per_s,
        "prompt_eval_ms": metrics.prompt_eval_ms,
        "prompt_tokens": metrics.prompt_tokens,
        "cached_tokens": metrics.cached_tokens,
        "segments": ttft_segments(result["generation"], result["sent"], result["first"]),
    }


def peer_side(result: dict) -> dict:
    timings = result.get("timings") or {}
    return {
        "server_decode_tps": timings.get("predicted_per_second"),
        "prompt_eval_ms": timings.get("prompt_ms"),
        "cached_tokens": timings.get("cache_n"),
    }


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} logical CPUs of {model}, {memory:.0f} GiB"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def spread(values: list[float], fmt: str) -> str:
    """The median and the range over rounds."""
    return (
        f"{format(statistics.median(values), fmt)} "
        f"({format(min(values), fmt)} to {format(max(values), fmt)})"
    )


def main() -> None:
    from openai import OpenAI

    from inference.engine import Engine
    from inference.registry import embedded_model_path, ensure_default_model, load_options
    from inference.tokens import tokenizer_for
    from mixtralweb.accounts.models import ApiKey

    binary = peer_binary()
    if not binary:
        raise RuntimeError("no llama-server: `make llama-server`, or LLAMA_SERVER=<binary>")
    prepare_database()
    model = ensure_default_model()
    user = bench_user()
    key, secret = ApiKey.issue(user=user, name=f"single-stream bench {time.time():.0f}")
    stack = start_stack()
    peer = ws = engine = None
    rows: list[dict] = []
    try:
        worker = stack.wait_model()
        peer, peer_url = start_peer(binary, str(embedded_model_path()), "-c", str(PEER_CTX))
        print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine()}, commit {commit()}")
        print(
            f"model {embedded_model_path().name}; {ROUNDS} rounds; ours: n_ctx {model.n_ctx}, "
            f"engine {worker.get('engine')}; llama-server: {binary} -c {PEER_CTX} "
            f"{os.environ.get('LLAMA_SERVER_ARGS', '')}",
            flush=True,
        )
        for line in peer_settings():
            print(f"  llama-server: {line}")
        ws = WSClient(stack, user)
        engine = Engine(
            load_options(model), prefix_cache_bytes=settings.ENGINE_PREFIX_CACHE_MB * 2**20
        ).start()
        tokenizer = tokenizer_for(model.path)
        clients = {
            "api": OpenAI(base_url=f"{stack.http_url}/v1", api_key=secret, max_retries=0),
            "llama-server": OpenAI(base_url=f"{peer_url}/v1", api_key="none", max_retries=0),
        }
        meter = CpuMeter(
            {
                "web": stack.processes["bench-web"].pid,
                "worker": stack.processes["bench-worker"].pid,
                "llama-server": peer.pid,
                "bench client": os.getpid(),
            }
        )
        numbers = iter(range(1, 1000))

        def call(side: str, content: str, params: dict) -> dict:
            if side == "websocket":
                return ws_answer(ws, content, params)
            if side == "api":
                return api_answer(clients["api"], settings.DEFAULT_MODEL_NAME, content, params)
            if side == "engine":
                return engine_answer(engine, tokenizer, content, params)
            return api_answer(clients["llama-server"], "llama-server", content, params)

        def prime(side: str, content: str) -> None:
            """One token of the prompt's answer: the server now holds the prompt (a
            new prompt in between may have taken llama-server's only copy of it)."""
            call(side, content, {**SAMPLING, "max_tokens": 1})
            if side in ("llama-server", "engine"):
                time.sleep(0.3)
            else:
                worker_idle()

        def answer(side: str, content: str) -> dict:
            before = meter.read()
            result = call(side, content, SAMPLING)
            after = meter.read()
            wall = result["end"] - result["sent"]
            # (a PostgreSQL backend that exits meanwhile takes its time with it)
            result["cores"] = {name: max(0.0, after[name] - before[name]) / wall for name in after}
            if side == "llama-server":
                time.sleep(0.3)
                result.update(peer_side(result))
            elif side == "engine":
                time.sleep(0.3)
            else:
                worker_idle()  # its bookkeeping after the final event, before the next answer
                result.update(our_side(result))
            result["first_token_ms"] = (result["first"] - result["sent"]) * 1000
            result["decode_tps"] = (result["tokens"] - 1) / (result["last"] - result["first"])
            return result

        for side in SIDES:  # warm-up: connections, caches, the same prompt into each cache
            answer(side, prompt_text(0))
        for round_ in range(1, ROUNDS + 1):
            order = SIDES[round_ % len(SIDES) :] + SIDES[: round_ % len(SIDES)]
            for kind in PROMPTS:
                for side in order:
                    number = 0 if kind == "same prompt" else next(numbers)
                    if kind == "same prompt":
                        prime(side, prompt_text(number))
                    row = {"round": round_, "kind": kind, "side": side}
                    row.update(answer(side, prompt_text(number)))
                    rows.append(row)
                    print(
                        f"  round {round_} {kind:11} {LABELS[side]:16} decode "
                        f"{row['decode_tps']:6.1f} tok/s, first token "
                        f"{row['first_token_ms']:6.1f} ms, {row['tokens']} tokens, "
                        f"prompt cached {row.get('cached_tokens')}",
                        flush=True,
                    )
    finally:
        ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
        if ws:
            ws.close()
        if engine:
            engine.close()
        stack.stop_all()
        if peer:
            peer.terminate()
            peer.wait(30)
    report(rows)


def report(rows: list[dict]) -> None:
    def pick(kind: str, side: str) -> list[dict]:
        return sorted(
            (r for r in rows if r["kind"] == kind and r["side"] == side), key=lambda r: r["round"]
        )

    def med(values) -> float:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    print(
        "\n| prompt | side | decode tok/s | first token ms | decode / llama-server | "
        "first token − llama-server ms | first token / llama-server |"
    )
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    for kind in PROMPTS:
        peer = pick(kind, "llama-server")
        for side in SIDES:
            mine = pick(kind, side)
            decode = spread([r["decode_tps"] for r in mine], ".1f")
            first = spread([r["first_token_ms"] for r in mine], ".1f")
            if side == "llama-server":
                print(f"| {kind} | {LABELS[side]} | {decode} | {first} | | | |")
                continue
            ratios = [m["decode_tps"] / p["decode_tps"] for m, p in zip(mine, peer, strict=True)]
            added = [
                m["first_token_ms"] - p["first_token_ms"] for m, p in zip(mine, peer, strict=True)
            ]
            first_ratios = [
                m["first_token_ms"] / p["first_token_ms"] for m, p in zip(mine, peer, strict=True)
            ]
            print(
                f"| {kind} | {LABELS[side]} | {decode} | {first} | {spread(ratios, '.3f')} | "
                f"{spread(added, '+.1f')} | {spread(first_ratios, '.2f')} |"
            )
            ratio, extra = statistics.median(ratios), statistics.median(added)
            verdicts.append(
                f"{kind}, {LABELS[side]}: decode {ratio:.3f}× "
                f"({'met' if ratio >= DECODE_TARGET else 'NOT met'}, target ≥ {DECODE_TARGET}×); "
                f"first token {extra:+.1f} ms "
                f"({'met' if extra <= FIRST_TOKEN_TARGET_MS else 'NOT met'}, "
                f"target ≤ +{FIRST_TOKEN_TARGET_MS} ms)"
            )
    print("\nTargets (medians of the rounds):")
    for line in verdicts:
        print(f"  {line}")

    print("\nWhere the time went (medians over rounds):")
    print(
        "| prompt | side | decode tok/s, client / server's own | prompt evaluation ms | "
        "first token less prompt evaluation ms | prompt tokens (cached) |"
    )
    print("|---|---|---|---|---|---|")
    for kind in PROMPTS:
        for side in SIDES:
            mine = pick(kind, side)
            client = med(r["decode_tps"] for r in mine)
            server = med(r.get("server_decode_tps") for r in mine)
            evaluation = med(r.get("prompt_eval_ms") for r in mine)
            rest = med(
                r["first_token_ms"] - r["prompt_eval_ms"] for r in mine if r.get("prompt_eval_ms")
            )
            tokens = med(r.get("prompt_tokens") for r in mine)
            cached = med(r.get("cached_tokens") for r in mine)
            print(
                f"| {kind} | {LABELS[side]} | {client:.1f} / {server:.1f} | {evaluation:.1f} | "
                f"{rest:.1f} | {tokens:.0f} ({cached:.0f}) |"
            )
    print("\nOur first token by segment (medians, ms):")
    for kind in PROMPTS:
        for side in ("websocket", "api"):
            mine = [r for r in pick(kind, side) if r.get("segments")]
            if not mine:
                continue
            parts = ", ".join(
                f"{name} {med(r['segments'][name] for r in mine):.1f}"
                for name in mine[0]["segments"]
            )
            print(f"  {kind}, {LABELS[side]}: {parts}")
    print("\nCores used during an answer (CPU seconds / the answer's seconds, medians):")
    groups = list(rows[0]["cores"]) if rows else []
    print("| side | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        cells = " | ".join(f"{med(r['cores'][g] for r in mine):.2f}" for g in groups)
        print(f"| {LABELS[side]} | {cells} |")
