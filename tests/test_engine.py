"""The engine on the real model (SmolLM2 on the CPU), in this process: several
sequences at once, chunked prefill, admission by KV room, priorities, prefix reuse
within a tenant, stop, deadlines, overflow, token counting."""

from __future__ import annotations

import time

import llama_cpp
import pytest

from inference.engine import (
    BACKGROUND,
    ContextOverflow,
    Engine,
    LoadOptions,
    ModelLoadError,
    PrefixCache,
    Request,
    Sampling,
    physical_cores,
    resolve_threads,
)
from inference.registry import embedded_model_path
from inference.tokens import count_chat_tokens, tokenizer_for

GREEDY = Sampling(max_tokens=4, temperature=0.0, seed=1)


def options(**overrides) -> LoadOptions:
    return LoadOptions(
        **({"path": str(embedded_model_path()), "n_ctx": 4096, "n_parallel": 4} | overrides)
    )


@pytest.fixture(scope="module")
def engine():
    engine = Engine(options(n_batch=128), prefix_cache_bytes=256 * 1024 * 1024).start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def single():
    """One sequence, so that every conversation but the last leaves the pool."""
    engine = Engine(
        options(n_parallel=1, n_batch=128), prefix_cache_bytes=256 * 1024 * 1024
    ).start()
    yield engine
    engine.close()


def prompt(messages) -> list[int]:
    return tokenizer_for(str(embedded_model_path())).chat_tokens(messages)


def conversation(topic: str, words: int = 40) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about {topic}. " * (words // 4)}]


def request(messages, sampling=GREEDY, tenant="user:1", **kwargs) -> Request:
    return Request(prompt=prompt(messages), sampling=sampling, tenant=tenant, **kwargs)


def events_of(req: Request, timeout_s: float = 60) -> list[tuple]:
    """Every event of the request, up to and including its end."""
    events = []
    deadline = time.monotonic() + timeout_s
    while True:
        kind, value = req.events.get(timeout=max(0.1, deadline - time.monotonic()))
        events.append((kind, value))
        if kind == "end":
            return events


def text_of(events) -> str:
    return "".join(value for kind, value in events if kind == "text")


def run(engine, messages, sampling=GREEDY, tenant="user:1", **kwargs):
    req = engine.submit(request(messages, sampling, tenant, **kwargs))
    events = events_of(req)
    assert events[-1] == ("end", None), events[-1]
    return req.stats, text_of(events)


def follow_up(messages, answer, question):
    return messages + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": question},
    ]


# --- several sequences at once --------------------------------------------------------
def test_four_requests_are_decoded_together_and_each_gets_its_own_answer(engine):
    sampling = Sampling(max_tokens=24, temperature=0.0)
    topics = ["the sea", "volcanoes", "owls", "trains"]
    requests = [
        engine.submit(request(conversation(topic), sampling, f"user:batch-{topic}"))
        for topic in topics
    ]
    answers = [text_of(events_of(req)) for req in requests]
    assert all(req.stats.batch_size_max == 4 for req in requests)
    assert all(req.stats.completion_tokens == 24 for req in requests)
    assert len(set(answers)) == 4


def test_the_same_seed_on_a_worker_in_the_same_state_gives_the_same_answer():
    """What a seed reproduces (docs/models.md): the same answer from the same state.
    Beside other sequences, or after the pool's cells moved, the logits can differ
    in their last bits and a sampled answer can take another turn."""
    sampling = Sampling(max_tokens=20, temperature=0.9, seed=1234)
    answers = []
    for _ in range(2):
        fresh = Engine(options(n_parallel=2)).start()
        try:
            answers.append(run(fresh, conversation("comets"), sampling)[1])
        finally:
            fresh.close()
    assert answers[0] == answers[1]


def test_a_long_prompt_is_read_in_chunks_while_another_answer_keeps_streaming(engine):
    streaming = engine.submit(
        request(conversation("rivers"), Sampling(max_tokens=200, temperature=0.0), "user:r")
    )
    assert streaming.events.get(timeout=30)[0] == "admitted"
    while streaming.events.get(timeout=30)[0] != "text":
        pass
    long = engine.submit(request(conversation("deserts", 1200), GREEDY, "user:d"))
    progress, text_between = [], 0
    for kind, value in iter(lambda: long.events.get(timeout=60), None):
        if kind == "progress":
            progress.append(value)
            # Between two chunks of the long prompt the other answer moved on.
            while not streaming.events.empty():
                if streaming.events.get()[0] == "text":
                    text_between += 1
        if kind == "end":
            break
    total = len(long.prompt)
    assert [evaluated for evaluated, _ in progress][-1] == total
    assert len(progress) >= total // engine.n_batch
    assert text_between >= len(progress) - 2
    engine.cancel(streaming)
    events_of(streaming)


def test_a_request_waits_for_room_in_the_kv_pool_then_runs():
    engine = Engine(options(n_ctx=1024, n_parallel=2)).start()
    try:
        first = engine.submit(
            request(conversation("maps"), Sampling(max_tokens=700, temperature=0.0), "user:a")
        )
        assert first.events.get(timeout=30)[0] == "admitted"
        second = engine.submit(
            request(conversation("clocks"), Sampling(max_tokens=400, temperature=0.0), "user:b")
        )
        time.sleep(1.0)
        # A sequence is free, but not the room the second asks for: it waits.
        assert engine.load["waiting"] == 1 and second.events.empty()
        engine.cancel(first)
        events_of(first)
        second_events = events_of(second)
        assert second_events[0][0] == "admitted" and second_events[-1] == ("end", None)
        assert second.stats.finish_reason in {"stop", "length"}
    finally:
        engine.close()


def test_interactive_requests_go_before_job_passes_which_take_at_most_their_share():
    engine = Engine(options(n_parallel=2), job_sequences=1).start()
    try:
        long = Sampling(max_tokens=60, temperature=0.0)
        jobs = [
            engine.submit(request(conversation(t), long, f"user:j{t}", priority=BACKGROUND))
            for t in ("ants", "bees")
        ]
        chat = engine.submit(request(conversation("ducks"), GREEDY, "user:c"))
        assert events_of(chat)[-1] == ("end", None)
        for job in jobs:
            assert events_of(job)[-1] == ("end", None)
        # The second job pass waited: one job sequence at most, and the chat went first.
        assert jobs[1].stats.started > chat.stats.started
        assert jobs[1].stats.started >= jobs[0].stats.finished
    finally:
        engine.close()


def test_a_short_chat_is_read_beside_a_long_prompt_not_after_it(engine):
    """Two chats: a long prompt (many chunks) and then a short one. The short one's
    prompt goes into the next step whole, beside the long one's chunk, so its first
    token comes while the long prompt is still being read."""
    long = engine.submit(request(conversation("lighthouses", words=1200), tenant="user:long"))
    assert len(long.prompt) > 8 * engine.n_batch
    while long.events.get(timeout=60)[0] != "progress":
        pass  # the long prompt is being read
    short = engine.submit(request(conversation("ducks"), tenant="user:short"))
    assert events_of(short)[-1] == ("end", None)
    assert events_of(long)[-1] == ("end", None)
    assert short.stats.first_token < long.stats.first_token


# --- prefix reuse ------------------------------------------------------------------------
def test_a_follow_up_reuses_the_conversations_prefix(engine):
    first = conversation("the sea")
    _, answer = run(engine, first, tenant="user:sea")
    stats, _ = run(engine, follow_up(first, answer, "And the tides?"), tenant="user:sea")
    assert stats.cached_tokens >= len(prompt(first))


def test_another_tenant_reuses_nothing_of_a_secret_whether_its_guess_is_right_or_wrong(engine):
    secret = [{"role": "user", "content": "My bank PIN is 4921 and my dog is called Biscuit."}]
    run(engine, secret, tenant="user:alice")
    right = [{"role": "user", "content": "My bank PIN is 4921 and my dog is called Rex."}]
    wrong = [{"role": "user", "content": "My bank PIN is 1111 and my dog is called Rex."}]
    right_stats, _ = run(engine, right, tenant="user:charlie")
    wrong_stats, _ = run(engine, wrong, tenant="user:charlie-2")
    assert right_stats.cached_tokens == wrong_stats.cached_tokens == 0
    # The owner's own follow-up still reuses it.
    mine, _ = run(engine, secret, tenant="user:alice")
    assert mine.cached_tokens > 10


def test_interleaved_conversations_resume_from_their_saved_states(single):
    first, second = conversation("mountains"), conversation("deserts")
    _, answer = run(single, first)
    run(single, second)  # takes the only sequence: the first is saved to host RAM
    stats, _ = run(single, follow_up(first, answer, "And the highest?"))
    assert stats.cached_tokens >= len(prompt(first))


def test_an_idle_cache_in_host_ram_gives_its_cells_back_when_another_request_starts(engine):
    first = conversation("volcanoes")
    _, answer = run(engine, first, tenant="user:volcanoes")
    mine = [s for s in engine.slots if s.tenant == "user:volcanoes"]
    assert mine and mine[0].tokens
    # With nothing to decode, the engine copies the idle cache to host RAM.
    deadline = time.monotonic() + 10
    while not mine[0].saved and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mine[0].saved
    other = engine.submit(request(conversation("rivers"), tenant="user:rivers"))
    kind, _ = other.events.get(timeout=30)
    assert kind == "admitted"
    # While another request runs, no decode step attends over the idle answer's cells.
    assert not any(s.tokens for s in engine.slots if s.tenant == "user:volcanoes")
    assert events_of(other)[-1] == ("end", None)
    stats, _ = run(engine, follow_up(first, answer, "And the largest?"), tenant="user:volcanoes")
    assert stats.cached_tokens >= len(prompt(first))


def test_a_saved_state_is_only_restored_for_its_own_tenant(single):
    first = conversation("lakes")
    run(single, first, tenant="user:lakes")
    run(single, conversation("caves"), tenant="user:other")
    stats, _ = run(single, first, tenant="user:third")
    assert stats.cached_tokens == 0


def test_the_saved_states_stay_within_their_memory_budget():
    cache = PrefixCache(capacity_bytes=100)
    for i in range(5):
        cache.put("t", [i, i + 1], bytearray(40))
    assert cache.size_bytes <= 100 and len(cache) == 2


def test_a_state_that_is_used_again_is_kept_longer():
    cache = PrefixCache(capacity_bytes=100)
    cache.put("t", [1], bytearray(40))
    cache.put("t", [2], bytearray(40))
    cache.take(cache.longest("t", [1])[0])
    cache.put("t", [3], bytearray(40))
    assert cache.longest("t", [1])[1] == 1 and cache.longest("t", [2])[1] == 0


def test_a_longer_state_replaces_its_own_tenants_prefix_only():
    cache = PrefixCache(capacity_bytes=1000)
    cache.put("a", [1, 2], bytearray(10))
    cache.put("b", [1, 2], bytearray(10))
    cache.put("a", [1, 2, 3], bytearray(10))
    assert len(cache) == 2
    assert cache.longest("b", [1, 2, 3]) == (("b", (1, 2)), 2)


# --- progress, stop, deadlines, overflow ----------------------------------------------
def test_a_long_prompt_reports_its_progress_chunk_by_chunk(engine):
    req = engine.submit(request(conversation("glaciers", 400), tenant="user:glaciers"))
    progress = [value for kind, value in events_of(req) if kind == "progress"]
    total = len(req.prompt)
    assert len(progress) >= total // engine.n_batch
    assert progress[-1] == (total, total)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_a_short_prompt_reports_no_progress(engine):
    events = events_of(engine.submit(request(conversation("owls"), tenant="user:owls")))
    assert not [kind for kind, _ in events if kind == "progress"]


def test_a_stop_during_prompt_evaluation_ends_it_within_one_chunk(single):
    req = single.submit(request(conversation("glaciers", 2000), tenant="user:stop"))
    assert req.events.get(timeout=30)[0] == "admitted"
    single.cancel(req)
    events = events_of(req)
    progress = [value for kind, value in events if kind == "progress"]
    assert req.stats.finish_reason == "cancelled" and req.stats.first_token is None
    assert len(progress) <= 2 and not text_of(events)


def test_a_stop_during_a_prompt_chunk_ends_the_reading_at_the_next_step():
    """No abort callback (the CUDA backend has none): a stop that arrives while a
    chunk is evaluated lets that chunk finish, and no later chunk of its prompt is
    read; the answer beside it goes on."""
    engine = Engine(options(n_parallel=2, n_batch=64))
    stopped = request(conversation("glaciers", 400), tenant="user:stop")
    beside = request(conversation("owls"), Sampling(max_tokens=8, temperature=0.0), "user:o")
    chunks = []  # the stopped prompt's tokens in each evaluated batch
    decode = engine._decode

    def decode_then_stop(n_tokens):
        slot = next((s for s in engine.slots if s.request is stopped), None)
        if slot is not None and slot.chunk:
            chunks.append(slot.chunk)
        decode(n_tokens)
        if len(chunks) == 1:
            stopped.cancel.set()  # as if it came during this batch

    engine._decode = decode_then_stop
    engine.start()
    try:
        engine.submit(stopped)
        engine.submit(beside)
        events = events_of(stopped)
        assert len(chunks) == 1  # one chunk, of what the batch had room for
        assert [v for k, v in events if k == "progress"] == [(chunks[0], len(stopped.prompt))]
        assert stopped.stats.finish_reason == "cancelled" and stopped.stats.first_token is None
        assert text_of(events_of(beside)) and beside.stats.finish_reason in ("stop", "length")
    finally:
        engine.close()


def test_a_stop_ends_decoding_within_one_step(engine):
    req = engine.submit(
        request(conversation("rain"), Sampling(max_tokens=300, temperature=0.0), "user:rain")
    )
    while req.events.get(timeout=30)[0] != "text":
        pass
    engine.cancel(req)
    events_of(req)
    assert req.stats.finish_reason == "cancelled"
    assert req.stats.completion_tokens < 300


def test_a_request_stopped_while_it_waits_ends_without_starting():
    engine = Engine(options(n_parallel=1)).start()
    try:
        busy = engine.submit(
            request(conversation("sand"), Sampling(max_tokens=400, temperature=0.0), "user:a")
        )
        assert busy.events.get(timeout=30)[0] == "admitted"
        waiting = engine.submit(request(conversation("snow"), GREEDY, "user:b"))
        time.sleep(0.3)
        engine.cancel(waiting)
        assert events_of(waiting, timeout_s=5) == [("end", None)]
        assert waiting.stats.finish_reason == "cancelled"
        engine.cancel(busy)
        events_of(busy)
    finally:
        engine.close()


def test_a_run_past_its_deadline_stops_and_keeps_what_it_wrote(engine):
    req = request(conversation("wind"), Sampling(max_tokens=500, temperature=0.0), "user:w")
    req.deadline = time.monotonic() + 1.0
    events = events_of(engine.submit(req))
    assert req.stats.finish_reason == "time_limit"
    assert text_of(events) and req.stats.completion_tokens < 500


def test_a_prompt_longer_than_the_context_is_refused_with_both_numbers(engine):
    req = Request(
        prompt=tokenizer_for(str(embedded_model_path())).tokenize("word " * 5000),
        sampling=GREEDY,
        tenant="user:big",
    )
    (end,) = events_of(engine.submit(req))
    error = end[1]
    assert isinstance(error, ContextOverflow)
    assert f"{len(req.prompt):,}" in str(error) and "4,096" in str(error)


def test_max_tokens_past_the_context_end_the_answer_at_its_end():
    engine = Engine(options(n_ctx=256, n_parallel=1)).start()
    try:
        words = conversation("stars", 140)
        stats, _ = run(engine, words, Sampling(max_tokens=10_000, temperature=0.0))
        assert stats.finish_reason in {"length", "stop"}
        assert stats.prompt_tokens + stats.completion_tokens <= 256
    finally:
        engine.close()


# --- loading and settings ------------------------------------------------------------
def test_the_web_process_counts_the_tokens_the_worker_will_evaluate():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Héllo — how many tokens is this? 🌊"},
    ]
    model = type("Model", (), {"path": str(embedded_model_path())})
    assert count_chat_tokens(model, messages) == len(prompt(messages))


def test_a_file_llama_cpp_cannot_load_is_named_in_the_error(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(embedded_model_path().read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        Engine(options(path=str(broken)))


def test_an_unset_thread_count_is_the_machines_physical_cores_for_both_kinds():
    cores = physical_cores()
    assert cores >= 1
    assert resolve_threads(0, 0) == (cores, cores)
    assert resolve_threads(3, 0) == (3, 3)
    assert resolve_threads(0, 5) == (cores, 5)


def test_on_this_machine_an_unset_thread_count_is_not_half_the_cores():
    # llama-cpp-python's own default is half the logical CPUs: 1 on a 2-core machine.
    import os

    assert physical_cores() >= max(1, (os.cpu_count() or 2) // 2)
    if (os.cpu_count() or 0) <= 4:
        assert physical_cores() == os.cpu_count()


def test_the_engine_runs_with_the_threads_in_force(engine):
    assert (engine.n_threads, engine.n_threads_batch) == resolve_threads(0, 0)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 avx avx2 avx512f {extra}
bugs\t\t: spectre_v1
"""


def test_a_cpu_with_amx_is_recognised_by_its_flags():
    from inference.engine import cpu_has_amx

    assert cpu_has_amx(CPUINFO.format(extra="amx_bf16 amx_tile amx_int8"))
    assert not cpu_has_amx(CPUINFO.format(extra="avx_vnni"))
    assert not cpu_has_amx("")


def test_extra_buffers_are_off_on_amx_cpus_unless_asked_for(monkeypatch):
    from inference import engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_has_amx", lambda: True)
    assert engine_module.use_extra_buffers("auto") is False
    assert engine_module.use_extra_buffers("on") is True
    monkeypatch.setattr(engine_module, "cpu_has_amx", lambda: False)
    assert engine_module.use_extra_buffers("auto") is True
    assert engine_module.use_extra_buffers("off") is False


def test_a_wrong_extra_buffers_setting_is_refused_before_loading(monkeypatch):
    monkeypatch.setenv("LLAMA_EXTRA_BUFFERS", "maybe")
    with pytest.raises(ModelLoadError, match="LLAMA_EXTRA_BUFFERS"):
        Engine(options())


# --- several GPUs -------------------------------------------------------------------------
def test_the_gpu_split_reaches_llama_cpps_model_params():
    from inference.engine import MAX_DEVICES, model_params

    params, keep = model_params(
        options(n_gpu_layers=-1, split_mode="row", main_gpu=1, tensor_split=(3.0, 1.5)), False
    )
    assert (params.split_mode, params.main_gpu) == (llama_cpp.LLAMA_SPLIT_MODE_ROW, 1)
    assert [params.tensor_split[i] for i in range(MAX_DEVICES)] == [3.0, 1.5] + [0.0] * (
        MAX_DEVICES - 2
    )
    assert keep  # the array the pointer points into, alive until the load returns
    params, keep = model_params(options(), False)
    assert params.split_mode == llama_cpp.LLAMA_SPLIT_MODE_LAYER and params.main_gpu == 0
    assert not params.tensor_split and not keep  # NULL: llama.cpp splits by free memory


def test_a_worker_refuses_a_main_gpu_or_shares_beyond_the_gpus_it_sees():
    from inference.engine import check_gpu_split

    one = options(n_gpu_layers=-1, split_mode="none", main_gpu=1)
    with pytest.raises(ModelLoadError, match="main_gpu is 1, but this worker sees 1 GPU "):
        check_gpu_split(one, gpus=1)
    check_gpu_split(one, gpus=2)
    shares = options(n_gpu_layers=-1, tensor_split=(1.0, 1.0, 1.0))
    with pytest.raises(ModelLoadError, match="tensor_split has 3 shares, but this worker sees 2"):
        check_gpu_split(shares, gpus=2)
    check_gpu_split(shares, gpus=0)  # a CPU build: the options do nothing


def test_a_split_model_still_loads_where_there_is_no_gpu():
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this build offloads; tests/test_gpu.py covers the GPU")
    engine = Engine(options(n_ctx=512, n_parallel=1, n_gpu_layers=-1, split_mode="row",
                            tensor_split=(3.0, 1.0)))  # fmt: skip
    try:
        assert engine.n_ctx == 512
    finally:
        engine.close()


# --- grammars -------------------------------------------------------------------------
COLOUR = 'root ::= "{\\"colour\\": \\"" ("red" | "green" | "blue") "\\"}"'


def test_a_grammar_holds_every_sampled_answer_whether_the_first_draw_fits_or_not(engine):
    # Sampled at a high temperature, most first draws break the grammar and are drawn
    # again with the grammar over the whole vocabulary; later ones mostly fit it.
    asks = [
        engine.submit(
            request(
                conversation("the sea", 8),
                Sampling(max_tokens=24, temperature=1.5, seed=seed, grammar=COLOUR),
            )
        )
        for seed in range(4)
    ]
    answers = []
    for ask in asks:
        events = events_of(ask)
        assert events[-1] == ("end", None), events[-1]
        answers.append(text_of(events))
        assert ask.stats.finish_reason == "stop", "the grammar's end lets the model stop"
    assert all(
        a in {'{"colour": "red"}', '{"colour": "green"}', '{"colour": "blue"}'} for a in answers
    ), answers
