"""Settings from the environment are in force after a restart, through the real
worker (issue 25): `manage.py modelworker` for the default model, the real model,
what llama.cpp's context runs with as its heartbeat and the Workers page show it."""

import os
import re

from django.conf import settings

from inference.workers import live_workers
from tests.cluster import wait_for
from tests.conftest import LOG_DIR, Stack, database_url

VARIABLES = ("LLAMA_N_THREADS", "LLAMA_N_THREADS_BATCH", "DEFAULT_MODEL_N_PARALLEL")


def start_worker(name: str, **variables) -> tuple[Stack, dict, str]:
    """The default model's worker, started as `make run` starts it, with these
    variables (and none of the others of VARIABLES): its stack, its heartbeat once
    it has loaded the model, and what the start printed."""
    env = {k: v for k, v in os.environ.items() if k not in {*VARIABLES, "DEFAULT_MODEL_N_CTX"}}
    env |= {"DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1", **variables}
    log = LOG_DIR / f"{name}.log"
    offset = log.stat().st_size if log.exists() else 0
    worker = Stack(0, env)
    process = worker.start_worker(name)
    try:
        heartbeat = wait_for(
            lambda: next(
                (
                    w
                    for w in live_workers(settings.DEFAULT_MODEL_NAME)
                    if w["pid"] == process.pid and w["state"] in {"ready", "failed"}
                ),
                None,
            ),
            60,
            0.1,
            "the worker's heartbeat",
        )
    except BaseException:
        worker.stop_all()
        raise
    with open(log, "rb") as f:
        f.seek(offset)
        printed = f.read().decode(errors="replace")
    return worker, heartbeat, printed


def row_of(page: str, pid: int) -> str:
    """The live workers table's row of the process `pid`."""
    (row,) = [r for r in page.split("<tr") if f"<td>{pid}</td>" in r]
    return re.sub(r"\s+", " ", row)


def test_changed_thread_and_sequence_counts_are_in_force_after_a_restart(
    default_model, cast, client
):
    client.force_login(cast.sam)
    first, heartbeat, printed = start_worker(
        "settings-worker-1", LLAMA_N_THREADS="1", DEFAULT_MODEL_N_PARALLEL="2"
    )
    try:
        assert heartbeat["state"] == "ready", heartbeat["reason"]
        force = heartbeat["in_force"]
        # From llama.cpp's context: the prompt threads follow the decoding threads.
        assert (force["n_threads"], force["n_threads_batch"], force["n_parallel"]) == (1, 1, 2)
        assert force["n_ctx"] == default_model.n_ctx and heartbeat["notes"] == []
        # "auto" as llama.cpp resolved it when it created the context.
        assert force["flash_attn"] in {"on", "off"}
        stored = default_model
        assert f"n_threads {stored.n_threads} -> 1 (from LLAMA_N_THREADS)" in printed
        assert f"n_parallel {stored.n_parallel} -> 2 (from DEFAULT_MODEL_N_PARALLEL)" in printed
        assert force["pool_threads"] == 4  # Celery's pool: two threads per sequence
        row = row_of(client.get("/workers/").content.decode(), heartbeat["pid"])
        assert "1 thread (1 for prompts)" in row
        assert "2 sequences (1 for jobs, 4 task threads)" in row
        assert f"flash attention {force['flash_attn']}" in row
    finally:
        first.stop_all()  # SIGTERM: the worker says goodbye and its heartbeat goes

    # The next start, with other values, and one that the registry refuses.
    second, heartbeat, printed = start_worker(
        "settings-worker-2",
        LLAMA_N_THREADS="2",
        DEFAULT_MODEL_N_PARALLEL="3",
        DEFAULT_MODEL_N_CTX="100000",
    )
    try:
        assert heartbeat["state"] == "ready", heartbeat["reason"]
        force = heartbeat["in_force"]
        assert (force["n_threads"], force["n_threads_batch"], force["n_parallel"]) == (2, 2, 3)
        assert force["n_ctx"] == default_model.n_ctx
        assert "n_threads 1 -> 2 (from LLAMA_N_THREADS)" in printed
        assert "n_parallel 2 -> 3 (from DEFAULT_MODEL_N_PARALLEL)" in printed
        assert force["pool_threads"] == 6
        refused = (
            "DEFAULT_MODEL_N_CTX=100000 is not applied: n_ctx 100,000 is more than the 8,192 "
            "tokens this model was trained with"
        )
        assert refused in printed
        (note,) = heartbeat["notes"]
        assert note.startswith(refused) and note.endswith("The model keeps n_ctx 8192.")
        row = row_of(client.get("/workers/").content.decode(), heartbeat["pid"])
        assert "2 threads (2 for prompts)" in row
        assert "3 sequences (1 for jobs, 6 task threads)" in row
        assert refused in row
    finally:
        second.stop_all()
    # SIGTERM: the worker's goodbye removes its heartbeat (not left to expire).
    wait_for(
        lambda: not [w for w in live_workers() if w["pid"] == heartbeat["pid"]],
        timeout_s=10,
        what="the stopped worker's heartbeat to go",
    )
