"""A generation that runs past its time limit ends failed, with the reason, and keeps
the text it had. A worker with a 1-second limit serves a model of its own, so the
default worker's queue is left alone. The limit is short so that no sampled answer
ends by itself before it (at 100 tokens/s a 3-second limit once let a story finish)."""

import pytest

from inference.models import Generation
from inference.registry import embedded_model_path, register_model

MODEL = "smollm2-time-limited"
LIMIT_S = 1


def register():
    return register_model(name=MODEL, path=embedded_model_path(), n_ctx=2048)


@pytest.fixture(scope="module")
def limited_worker(stack, django_db_blocker):
    with django_db_blocker.unblock():
        register()
    usual = stack.env
    stack.env = {**usual, "GENERATION_TIME_LIMIT_S": str(LIMIT_S)}
    try:
        stack.start_worker("time-limited-worker", model=MODEL)
    finally:
        stack.env = usual
    try:
        yield stack.wait_model(MODEL)
    finally:
        stack.stop("time-limited-worker")


def test_a_generation_past_its_time_limit_fails_with_the_reason(
    limited_worker, transactional_db, cast, default_model, ws_factory
):
    register()
    ws = ws_factory(cast.alice)
    ws.send(
        {
            "type": "chat.send",
            "model": MODEL,
            "content": "Count from 1 to 1000, one number a line, then write a long story.",
            "params": {"max_tokens": 1500, "temperature": 0.8},
        }
    )
    accepted, _ = ws.recv_until(lambda f: f["type"] in {"chat.accepted", "error"})
    assert accepted["type"] == "chat.accepted", accepted
    final, _ = ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == accepted["generation"],
        timeout=120,
    )
    gen = Generation.objects.get(pk=accepted["generation"])
    assert final["state"] == "failed" and gen.state == Generation.FAILED
    assert f"time limit ({LIMIT_S} s)" in final["reason"] and gen.reason == final["reason"]
    # Whatever was written before the limit is kept (on a busy machine it may be
    # nothing yet: the limit can fall during prompt evaluation).
    assert final["text"] == gen.text
