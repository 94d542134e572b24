"""Issue 25: does a unified KV cache slow one sequence's decoding when other
sequences' cells sit in it? (The single-stream bench saw our decode fall by a fifth
once four sequences held an answer's cache each.)

Bare llama.cpp through llama-cpp-python's low-level API, the worker's context
settings (n_ctx 8192, 4 sequences, n_batch 512, 2 threads, no extra buffers): one
sequence's 67-token prompt, then 256 single-token decode steps (no sampling), with
the other three sequences empty or holding 323 cells each (a prompt and its
256-token answer), in a unified cache (the engine's) and in one split per sequence.
KV_CELLS_BENCH_TRIALS (3) trials each.
"""

from __future__ import annotations

import os
import time

import llama_cpp

from inference.engine import resolve_threads, use_extra_buffers
from inference.registry import embedded_model_path

TRIALS = int(os.environ.get("KV_CELLS_BENCH_TRIALS", 3))
PROMPT, ANSWER, OTHERS = 67, 256, 3


def measure(model, unified: bool) -> dict[int, list[float]]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 8192, 512, 512, 4
    params.kv_unified = unified
    params.n_threads, params.n_threads_batch = resolve_threads(0, 0)
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def step(tokens: list[tuple[int, int]], seq: int) -> None:
        batch.n_tokens = len(tokens)
        for i, (token, pos) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == len(tokens) - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    results: dict[int, list[float]] = {0: [], OTHERS: []}
    try:
        for _ in range(TRIALS):
            for others in results:
                llama_cpp.llama_memory_clear(memory, True)
                for seq in range(1, others + 1):
                    step([(100 + i % 50, i) for i in range(PROMPT + ANSWER)], seq)
                step([(100 + i % 50, i) for i in range(PROMPT)], 0)
                started = time.perf_counter()
                for pos in range(PROMPT, PROMPT + ANSWER):
                    step([(200, pos)], 0)
                results[others].append(ANSWER / (time.perf_counter() - started))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return results


def main() -> None:
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = use_extra_buffers()
    model = llama_cpp.llama_model_load_from_file(str(embedded_model_path()).encode(), model_params)
    try:
        for unified in (True, False):
            for others, speeds in measure(model, unified).items():
                print(
                    f"  {'unified' if unified else 'split per sequence':18} KV, "
                    f"{others} other sequences of {PROMPT + ANSWER} cells: decode "
                    + ", ".join(f"{s:.1f}" for s in speeds)
                    + " tok/s",
                    flush=True,
                )
    finally:
        llama_cpp.llama_model_free(model)
