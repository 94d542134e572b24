"""Issue 2: what the live token path adds on top of raw llama-cpp-python.

Raw: llama-cpp-python's own streaming (create_completion) in this process.
End to end: websocket → consumer → Celery → worker → channel layer → websocket.
Both get the same prompts in the same order (so prefix caching matches), the same
sampling, seed, max_tokens and thread count (llama-cpp-python's default). The two
alternate run by run, so that a change in the machine's speed (a shared host)
weighs on both alike.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import llama_cpp

from inference.engine import resolve_threads, use_extra_buffers
from inference.registry import embedded_model_path
from inference.tokens import tokenizer_for
from tests.bench.harness import (
    bench_user,
    prepare_database,
    start_stack,
    ttft_segments,
    worker_idle,
    ws_answer,
)
from tests.conftest import WSClient

RUNS = int(os.environ.get("STREAM_BENCH_RUNS", 8))
MAX_TOKENS = 256
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "seed": 1234, "max_tokens": MAX_TOKENS}
PROMPTS = [
    f"Story {i}: write a long, detailed story about a lighthouse keeper who finds a "
    "message in a bottle. Describe the sea, the weather and every room of the lighthouse."
    for i in range(RUNS + 1)
]


def median_interval(values, level=0.9, resamples=10_000):
    """A bootstrap confidence interval for the median of `values` (percentile
    method, fixed seed: the same runs give the same interval)."""
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]


def percentile(values, pct):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


def raw_run(llm: llama_cpp.Llama, prompt: str) -> dict:
    # The clock starts before the chat template and the tokenizer, as it does end to
    # end (and in llama-cpp-python's create_chat_completion).
    started = time.perf_counter()
    tokens = tokenizer_for(llm.model_path).chat_tokens([{"role": "user", "content": prompt}])
    prepared = time.perf_counter()
    times = []
    for _chunk in llm.create_completion(
        prompt=tokens,
        max_tokens=MAX_TOKENS,
        temperature=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        seed=SAMPLING["seed"],
        stream=True,
    ):
        times.append(time.perf_counter())
    return {
        "ttft_ms": (times[0] - started) * 1000,
        "prepare_ms": (prepared - started) * 1000,
        "tokens": len(times),
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
    }


def e2e_run(ws: WSClient, prompt: str) -> dict:
    answer = ws_answer(ws, prompt, SAMPLING)
    first, completion = answer["first"], answer["tokens"]
    return {
        "ttft_ms": (first - answer["sent"]) * 1000,
        "tokens": completion,
        "decode_tps": (completion - 1) / (answer["last"] - first),
        "lags_ms": [lag * 1000 for lag in answer["lags"]],
        "segments_ms": ttft_segments(answer["generation"], answer["sent"], first),
    }


def main() -> None:
    prepare_database()
    from inference.registry import ensure_default_model

    model = ensure_default_model()
    print(f"model: {embedded_model_path().name}, n_ctx {model.n_ctx}, {RUNS} runs + warm-up")
    # Raw llama-cpp-python, with the worker's context size, thread counts and extra
    # buffer choice: Llama() does not expose use_extra_bufts, and on CPUs with AMX
    # llama.cpp's repacked weights crash it (inference.engine.use_extra_buffers).
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = use_extra_buffers()
        return params

    llama_cpp.llama_cpp.llama_model_default_params = model_params
    n_threads, n_threads_batch = resolve_threads(0, 0)
    engine = llama_cpp.Llama(
        model_path=str(embedded_model_path()),
        n_ctx=model.n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads_batch,
        verbose=False,
    )
    stack = start_stack()
    raw, e2e = [], []
    try:
        ws = WSClient(stack, bench_user())
        for i, prompt in enumerate(PROMPTS):
            raw_row, e2e_row = raw_run(engine, prompt), e2e_run(ws, prompt)
            worker_idle()  # its bookkeeping after the final event must not slow the next raw run
            if i == 0:
                continue  # warm-up
            raw.append(raw_row)
            e2e.append(e2e_row)
            print(
                f"  run {i}: decode {raw_row['decode_tps']:.1f} / {e2e_row['decode_tps']:.1f} "
                f"tok/s, TTFT {raw_row['ttft_ms']:.0f} / {e2e_row['ttft_ms']:.0f} ms",
                flush=True,
            )
        ws.close()
    finally:
        stack.stop_all()

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    lags = [lag for r in e2e for lag in r["lags_ms"]]
    raw_tps, e2e_tps = med(raw, "decode_tps"), med(e2e, "decode_tps")
    raw_ttft, e2e_ttft = med(raw, "ttft_ms"), med(e2e, "ttft_ms")
    # Each end-to-end run follows its raw run: their difference leaves out what the
    # host's speed does to both, which a difference of two medians keeps.
    added = [e["ttft_ms"] - r["ttft_ms"] for r, e in zip(raw, e2e, strict=True)]
    added_low, added_high = median_interval(added)
    ratios = [e["decode_tps"] / r["decode_tps"] for r, e in zip(raw, e2e, strict=True)]
    ratio_low, ratio_high = median_interval(ratios)
    # Each run's time to first token less its own prompt evaluation (and first token),
    # less what raw did besides them, the chat template and the tokenizer, which the
    # worker does too: what the path adds, without the evaluation's run-to-run noise
    # that the paired difference keeps.
    path = [
        e["ttft_ms"] - e["segments_ms"]["prompt evaluation + first token"] - r["prepare_ms"]
        for r, e in zip(raw, e2e, strict=True)
    ]
    path_low, path_high = median_interval(path)
    rows = [
        (
            "tokens per answer (median)",
            f"{med(raw, 'tokens'):.0f}",
            f"{med(e2e, 'tokens'):.0f}",
            "",
        ),
        (
            "decode tokens/s (median)",
            f"{raw_tps:.1f}",
            f"{e2e_tps:.1f}",
            f"ratio {e2e_tps / raw_tps:.3f}",
        ),
        (
            "time to first token ms (median)",
            f"{raw_ttft:.1f}",
            f"{e2e_ttft:.1f}",
            f"added {e2e_ttft - raw_ttft:+.1f} ms",
        ),
        (
            "added TTFT ms, median of the paired runs (90 % interval)",
            "",
            "",
            f"{statistics.median(added):+.1f} ({added_low:+.1f} to {added_high:+.1f})",
        ),
        (
            "the path: end-to-end TTFT less its prompt evaluation, less raw's template "
            "and tokenizer, ms (90 % interval)",
            "",
            "",
            f"{statistics.median(path):.1f} ({path_low:.1f} to {path_high:.1f})",
        ),
        (
            "decode ratio, median of the paired runs (90 % interval)",
            "",
            "",
            f"{statistics.median(ratios):.3f} ({ratio_low:.3f} to {ratio_high:.3f})",
        ),
        ("stream lag p50 ms", "", f"{percentile(lags, 50):.1f}", ""),
        ("stream lag p95 ms", "", f"{percentile(lags, 95):.1f}", ""),
    ]
    print("| measure | raw | end to end | |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| end-to-end time to first token, by segment | median ms |\n|---|---|")
    for segment in e2e[0]["segments_ms"]:
        print(f"| {segment} | {statistics.median(r['segments_ms'][segment] for r in e2e):.1f} |")
