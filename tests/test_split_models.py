"""A model in several GGUF files, as the Hub publishes large ones, on the real stack:
registered by its first file, loaded by llama.cpp from all of them (with load
progress over all of them), answering through the chat, shown whole on the Workers
page. The embedded SmolLM2 is split into three files for it."""

import pytest

from inference.engine import Engine, LoadOptions, Request, Sampling
from inference.gguf import inspect_gguf
from inference.models import Generation
from inference.registry import (
    LOAD_OPTION_FIELDS,
    embedded_model_path,
    ensure_default_model,
    register_model,
)
from inference.workers import live_workers
from tests.fixtures.split_gguf import write_shards

MODEL = "smollm2-split"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    return write_shards(embedded_model_path(), folder / "smollm2.gguf", max_tensors=100)


def register(path):
    """With the default model's load options, so that the answers can be compared."""
    default = ensure_default_model()
    options = {option: getattr(default, option) for option in LOAD_OPTION_FIELDS}
    return register_model(name=MODEL, path=path, **options)


@pytest.fixture(scope="module")
def split_worker(stack, shards, django_db_blocker):
    with django_db_blocker.unblock():
        register(shards[0])
    stack.start_worker("split-worker", model=MODEL)
    try:
        yield stack.wait_model(MODEL)
    finally:
        stack.stop("split-worker")


@pytest.fixture
def split_model(transactional_db, shards):
    # Registered again for each test: transactional tests empty the tables after each.
    return register(shards[0])


def test_llama_cpp_reports_load_progress_over_every_file(shards):
    """One report per tensor of all three files, then 1.0: not the first file's share."""
    progress = []
    engine = Engine(
        LoadOptions(path=str(shards[0]), n_ctx=256, n_batch=64), on_load_progress=progress.append
    )
    engine.close()
    tensors = inspect_gguf(shards[0]).tensor_count
    assert len(shards) == 3 and tensors == 272
    assert progress[-1] == 1.0
    assert progress == sorted(progress)
    assert len(progress) == tensors + 1


def test_its_worker_loads_every_file_and_says_so(split_worker):
    assert split_worker["state"] == "ready", split_worker.get("reason")
    assert split_worker["load_progress"] == 1.0
    assert any(w["pid"] == split_worker["pid"] for w in live_workers(MODEL))


def ask(ws, model: str, request_id: int) -> Generation:
    ws.send(
        {
            "type": "chat.send",
            "request_id": request_id,
            "model": model,
            "content": "What is the capital of France?",
            "params": {"max_tokens": 16, "seed": 3, "temperature": 0.0},
        }
    )
    accepted, _ = ws.recv_until(lambda f: f["type"] in {"chat.accepted", "error"})
    assert accepted["type"] == "chat.accepted", accepted
    final, _ = ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == accepted["generation"],
        timeout=120,
    )
    assert final["state"] == "done", final["reason"]
    return Generation.objects.select_related("metrics").get(pk=accepted["generation"])


def test_it_answers_through_the_chat(split_worker, split_model, cast, ws_factory):
    ws = ws_factory(cast.alice)
    split = ask(ws, MODEL, 1)
    assert split.worker.endswith(f":{split_worker['pid']}")
    assert split.text and split.metrics.completion_tokens >= 1


def test_the_split_files_answer_word_for_word_as_the_single_file(shards):
    """The same weights, greedy, from the same engine state (a fresh engine each, one
    sequence): the same tokens. Through the chat the two workers' states differ (what
    each has cached, its batch companions), and with them the last bits of the
    logits (docs/models.md, "What a seed reproduces"), so the comparison is here."""
    from tests.test_engine import events_of, prompt, text_of

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    texts = []
    for path in (shards[0], embedded_model_path()):
        engine = Engine(LoadOptions(path=str(path), n_ctx=512, n_batch=64, n_parallel=1)).start()
        try:
            greedy = Sampling(max_tokens=16, temperature=0.0, seed=3)
            request = Request(prompt=prompt(messages), sampling=greedy, tenant="user:1")
            texts.append(text_of(events_of(engine.submit(request))))
        finally:
            engine.close()
    assert texts[0] and texts[0] == texts[1]


def test_the_workers_page_shows_the_whole_model(split_worker, split_model, cast, client, shards):
    client.force_login(cast.sam)
    page = client.get("/workers/").content.decode()
    total = sum(p.stat().st_size for p in shards)
    assert f"{total / 1e6:.1f} MB in 3 files" in page
