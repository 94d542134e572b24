"""Model workers through the running stack: heartbeats, models no worker can serve,
prompt progress, stop (during the prompt and while decoding), and the worker's own
overflow check."""

import socket
import time

import pytest
from django.conf import settings
from django.db import transaction

from inference.engine import resolve_threads
from inference.models import Generation, LanguageModel, WorkerHeartbeat
from inference.registry import register_model
from inference.services import ChatError, generation_enqueue, get_model
from inference.workers import live_workers
from tests.fixtures import tiny_mixtral

BROKEN = "broken-mixtral"


def wait_for(predicate, timeout_s=30.0, every_s=0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError("condition not met")


def wait_finished(gen: Generation, state: str) -> Generation:
    """The generation once it is in `state` and its worker has finished with it
    (the heartbeat no longer names it): nothing is still being written, so the
    tables can be emptied after the test."""
    gen = wait_for(lambda: Generation.objects.filter(pk=gen.pk, state=state).first(), 120)
    wait_for(lambda: all(gen.pk not in w["held"] for w in live_workers(gen.model.name)), 30)
    return gen


def send(ws, **frame):
    ws.send({"type": "chat.send", "request_id": 1, **frame})
    reply, _ = ws.recv_until(lambda f: f["type"] in {"chat.accepted", "error"})
    return reply


def test_the_default_worker_reports_its_host_pid_device_and_state(stack, default_model):
    (worker,) = [w for w in live_workers(default_model.name)]
    assert worker["state"] == "ready"
    assert worker["host"] == socket.gethostname() and worker["pid"] > 0
    assert worker["device"] == "cpu"
    # The threads llama.cpp's context runs with: llama.cpp's own choice for this
    # machine where the environment sets none (2 on a 2-core machine, not 1).
    given = settings.DEFAULT_MODEL_OPTIONS
    expected = resolve_threads(given.get("n_threads", 0), given.get("n_threads_batch", 0))
    force = worker["in_force"]
    assert (force["n_threads"], force["n_threads_batch"]) == expected
    row = wait_for(lambda: WorkerHeartbeat.objects.filter(pid=worker["pid"]).first(), 15)
    assert row.model_name == default_model.name and row.state in {"ready", "busy"}


def test_the_workers_page_lists_each_model_and_worker(stack, cast, default_model, client):
    client.force_login(cast.sam)
    page = client.get("/workers/").content.decode()
    assert default_model.name in page and "ready" in page
    assert str(live_workers(default_model.name)[0]["pid"]) in page


@pytest.fixture(scope="module")
def broken_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "broken.gguf"
    tiny_mixtral.build_tiny_mixtral(path)
    return path


@pytest.fixture(scope="module")
def broken_worker(stack, broken_path, django_db_blocker):
    """A worker for a model whose file was damaged after it was registered."""
    with django_db_blocker.unblock():
        register_model(name=BROKEN, path=broken_path, n_ctx=1024)
    data = broken_path.read_bytes()
    broken_path.write_bytes(data[: len(data) // 2])
    stack.start_worker("broken-worker", model=BROKEN)
    try:
        yield stack.wait_model(BROKEN)
    finally:
        stack.stop("broken-worker")


@pytest.fixture
def broken_model(transactional_db, broken_worker, broken_path):
    # The row as registered (before the damage); transactional tests empty the tables.
    model, _ = LanguageModel.objects.get_or_create(name=BROKEN, defaults={"path": broken_path})
    return model


def test_a_worker_whose_model_file_is_damaged_reports_failed_with_the_reason(broken_worker):
    assert broken_worker["state"] == "failed"
    assert "broken.gguf" in broken_worker["reason"]
    assert "truncated" in broken_worker["reason"]


def test_a_model_whose_worker_failed_is_refused_and_staff_see_why(
    broken_model, cast, ws_factory, client
):
    with pytest.raises(ChatError) as caught:
        get_model(BROKEN)
    # Users learn that it is unavailable; the worker's own reason is for staff.
    assert caught.value.code == "no_worker" and "truncated" not in str(caught.value)
    client.force_login(cast.sam)
    assert "truncated" in client.get("/workers/").content.decode()
    ws = ws_factory(cast.alice)
    reply = send(ws, model=BROKEN, content="Hello?")
    assert reply["type"] == "error" and reply["code"] == "no_worker"
    assert not Generation.objects.filter(model=broken_model).exists()


def test_a_model_no_worker_serves_is_refused_at_once(stack, cast, ws_factory, tmp_path):
    model = register_model(
        name="unserved", path=tiny_mixtral.build_tiny_mixtral(tmp_path / "u.gguf"), n_ctx=512
    )
    ws = ws_factory(cast.alice)
    reply = send(ws, model="unserved", content="Anyone there?")
    assert reply["type"] == "error" and reply["code"] == "no_worker"
    assert "modelworker unserved" in reply["message"]
    assert not Generation.objects.filter(model=model).exists()


def test_a_long_prompt_streams_its_progress_and_stops_on_request(
    stack, cast, default_model, ws_factory
):
    ws = ws_factory(cast.alice)
    content = "Summarise this: " + " ".join(f"line {i} of the log is fine." for i in range(260))
    accepted = send(ws, content=content, params={"max_tokens": 16})
    gen_id = accepted["generation"]
    progress, _ = ws.recv_until(
        lambda f: f["type"] == "generation.progress" and f["generation"] == gen_id, timeout=120
    )
    assert 0 <= progress["evaluated"] < progress["total"] and progress["total"] > 1500
    ws.send({"type": "generation.stop", "generation": gen_id})
    final, frames = ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == gen_id, timeout=120
    )
    assert final["state"] == "cancelled" and "prompt" in final["reason"]
    assert not [f for f in frames if f["type"] == "generation.token"]
    gen = Generation.objects.get(pk=gen_id)
    assert gen.state == Generation.CANCELLED and gen.text == ""


def test_a_stopped_answer_keeps_its_partial_text(stack, cast, default_model, ws_factory):
    ws = ws_factory(cast.alice)
    accepted = send(
        ws, content="Write a long story about a lighthouse.", params={"max_tokens": 400}
    )
    gen_id = accepted["generation"]
    ws.recv_until(
        lambda f: f["type"] == "generation.token" and f["generation"] == gen_id, timeout=120
    )
    ws.send({"type": "generation.stop", "generation": gen_id})
    final, _ = ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == gen_id, timeout=60
    )
    gen = Generation.objects.select_related("metrics").get(pk=gen_id)
    assert final["state"] == "cancelled" and final["finish_reason"] == "cancelled"
    assert gen.text and final["text"] == gen.text
    assert gen.metrics.completion_tokens < 400


def test_the_worker_refuses_a_prompt_longer_than_its_context_with_both_numbers(
    stack, cast, default_model
):
    # Past the web's own check (a client of the worker that skipped it): the worker
    # must refuse as well, never truncate.
    with transaction.atomic():
        gen = Generation.objects.create(
            user=cast.alice,
            model=default_model,
            input_messages=[{"role": "user", "content": "word " * 9000}],
            params={"max_tokens": 8},
        )
        generation_enqueue(gen)
    gen = wait_finished(gen, "failed")
    assert f"{default_model.n_ctx:,}" in gen.reason
    assert "The prompt is 9," in gen.reason  # 9,0xx tokens


def test_a_generation_sent_to_a_worker_that_cannot_load_its_model_fails_with_why(
    broken_model, cast
):
    # An answer queued before the file was damaged (or by a client that skipped the
    # web's checks) reaches the failed worker: it ends failed, saying why.
    with transaction.atomic():
        gen = Generation.objects.create(
            user=cast.alice,
            model=broken_model,
            input_messages=[{"role": "user", "content": "Hello?"}],
            params={"max_tokens": 8},
        )
        generation_enqueue(gen)
    gen = wait_finished(gen, "failed")
    assert gen.reason.startswith("The model could not be loaded")
    assert "broken.gguf" in gen.reason and "truncated" in gen.reason
