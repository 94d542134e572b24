"""The Mixtral mixture-of-experts path without the real weights: a tiny
Mixtral-architecture GGUF is registered, served by its own Celery worker, and
answers a chat message through the same path as any model."""

import pytest

from inference.models import Generation
from inference.registry import register_model
from inference.workers import live_workers
from tests.fixtures import tiny_mixtral

MODEL = "tiny-mixtral"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_mixtral.build_tiny_mixtral(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_worker(stack, tiny_path, django_db_blocker):
    with django_db_blocker.unblock():
        register_model(name=MODEL, path=tiny_path, n_ctx=1024, n_batch=64)
    stack.start_worker("tiny-mixtral-worker", model=MODEL)
    try:
        yield stack.wait_model(MODEL)
    finally:
        stack.stop("tiny-mixtral-worker")


@pytest.fixture
def tiny_model(transactional_db, tiny_path):
    # Registered again for each test: transactional tests empty the tables after each.
    return register_model(name=MODEL, path=tiny_path, n_ctx=1024, n_batch=64)


def test_the_tiny_mixtral_is_inspected_as_eight_experts_two_used(tiny_model):
    assert tiny_model.inspection["expert_count"] == 8
    assert tiny_model.inspection["expert_used_count"] == 2
    assert tiny_model.inspection["parameter_count"] == tiny_mixtral.expected_parameter_count()


def test_its_worker_loads_it_and_says_so(tiny_worker):
    assert tiny_worker["state"] == "ready", tiny_worker.get("reason")
    assert tiny_worker["device"] == "cpu" and tiny_worker["load_progress"] == 1.0
    assert any(w["pid"] == tiny_worker["pid"] for w in live_workers(MODEL))


def test_it_answers_a_chat_message_through_the_worker(
    tiny_worker, tiny_model, cast, default_model, ws_factory
):
    ws = ws_factory(cast.alice)
    ws.send(
        {
            "type": "chat.send",
            "request_id": 1,
            "model": MODEL,
            "content": "hello the sea",
            "params": {"max_tokens": 12, "seed": 3, "temperature": 1.0},
        }
    )
    accepted, _ = ws.recv_until(lambda f: f["type"] in {"chat.accepted", "error"})
    assert accepted["type"] == "chat.accepted", accepted
    final, frames = ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == accepted["generation"],
        timeout=120,
    )
    gen = Generation.objects.select_related("metrics").get(pk=accepted["generation"])
    assert final["state"] == "done", final["reason"]
    assert gen.worker.endswith(f":{tiny_worker['pid']}")
    assert gen.metrics.completion_tokens >= 1
    assert gen.metrics.prompt_tokens > 5
