"""The engine on the real model (SmolLM2 on the CPU), in this process: prefix reuse,
the saved-state LRU, stop and abort, prompt progress, overflow, token counting."""

import threading
import time

import pytest

from inference.engine import (
    Cancelled,
    ContextOverflow,
    Engine,
    LoadOptions,
    ModelLoadError,
    PrefixCache,
    RunStats,
    Sampling,
    TimeLimitExceeded,
)
from inference.registry import embedded_model_path
from inference.tokens import count_chat_tokens

GREEDY = Sampling(max_tokens=4, temperature=0.0, seed=1)


def options(**overrides) -> LoadOptions:
    return LoadOptions(**({"path": str(embedded_model_path()), "n_ctx": 4096} | overrides))


@pytest.fixture(scope="module")
def engine():
    return Engine(options(n_batch=128), prefix_cache_bytes=256 * 1024 * 1024)


@pytest.fixture(scope="module")
def engine_without_saved_states():
    return Engine(options(n_batch=2048), prefix_cache_bytes=0)


def conversation(topic: str, words: int = 40) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about {topic}. " * (words // 4)}]


def run(engine, messages, sampling=GREEDY, cancel=None, progress=None):
    stats = RunStats()
    prompt = engine.chat_prompt_tokens(messages)
    text = "".join(engine.stream(prompt, sampling, cancel or threading.Event(), stats, progress))
    return stats, text, prompt


def follow_up(messages, answer, question):
    return messages + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": question},
    ]


def test_a_follow_up_reuses_the_conversations_prefix(engine):
    first = conversation("the sea")
    stats, answer, prompt = run(engine, first)
    again, _, _ = run(engine, follow_up(first, answer, "And rivers?"))
    assert again.cached_tokens >= len(prompt) - 1
    assert again.prompt_tokens > len(prompt)


def test_interleaved_conversations_resume_from_their_saved_states(engine):
    sea, mountains = conversation("the sea", 120), conversation("mountains", 120)
    _, sea_answer, sea_prompt = run(engine, sea)
    run(engine, mountains)  # evicts the sea from the live context
    back, _, _ = run(engine, follow_up(sea, sea_answer, "And the tides?"))
    assert back.cached_tokens >= len(sea_prompt) - 1
    assert len(engine.prefix_cache) >= 1


def test_a_context_saved_between_requests_is_not_copied_again_before_the_next(engine, monkeypatch):
    """The worker saves each answer's context once it is sent (save_context): the
    next request, for another conversation, goes straight to its prompt, and the
    first conversation still resumes from the saved state."""
    lakes, deserts = conversation("lakes", 120), conversation("deserts", 120)
    _, lakes_answer, lakes_prompt = run(engine, lakes)
    engine.save_context()
    assert tuple(engine.llm.input_ids[: engine.llm.n_tokens].tolist()) in engine.prefix_cache

    def copied(_live):
        raise AssertionError("the saved context was copied again before the prompt")

    monkeypatch.setattr(engine, "_save_live", copied)
    run(engine, deserts)
    monkeypatch.undo()
    back, _, _ = run(engine, follow_up(lakes, lakes_answer, "And the fish?"))
    assert back.cached_tokens >= len(lakes_prompt) - 1


def test_without_saved_states_an_interleaved_conversation_starts_over(
    engine_without_saved_states,
):
    engine = engine_without_saved_states
    sea, mountains = conversation("the sea", 120), conversation("mountains", 120)
    _, sea_answer, sea_prompt = run(engine, sea)
    run(engine, mountains)
    back, _, _ = run(engine, follow_up(sea, sea_answer, "And the tides?"))
    assert back.cached_tokens < len(sea_prompt) // 4  # only the template's opening


def test_the_saved_states_stay_within_their_memory_budget():
    cache = PrefixCache(capacity_bytes=1000)
    cache.put([1, 2, 3], b"x" * 400)
    cache.put([7, 8], b"y" * 400)
    cache.put([9], b"z" * 400)  # over budget: the least recently used goes
    assert cache.size_bytes <= 1000
    assert cache.longest([1, 2, 3, 4]) == (None, 0)
    assert cache.longest([7, 8, 5]) == ((7, 8), 2)


def test_a_state_that_is_used_again_is_kept_longer():
    cache = PrefixCache(capacity_bytes=1000)
    cache.put([1], b"a" * 400)
    cache.put([2], b"b" * 400)
    cache.take((1,))
    cache.put([3], b"c" * 400)
    assert cache.longest([1])[0] == (1,) and cache.longest([2])[0] is None


def test_a_longer_state_replaces_its_own_prefix():
    cache = PrefixCache(capacity_bytes=10_000)
    cache.put([1, 2], b"a")
    cache.put([1, 2, 3, 4], b"b")
    assert len(cache) == 1 and cache.longest([1, 2, 3, 4, 5]) == ((1, 2, 3, 4), 4)


def test_a_long_prompt_reports_its_progress_batch_by_batch(engine):
    reports = []
    stats, _, prompt = run(
        engine, conversation("deserts", 400), progress=lambda n, total: reports.append((n, total))
    )
    evaluated = [n for n, _ in reports]
    assert all(total == len(prompt) for _, total in reports)
    assert evaluated == sorted(evaluated) and len(reports) >= 3
    assert evaluated[0] == stats.cached_tokens and evaluated[-1] == len(prompt)
    assert all(b - a <= engine.n_batch for a, b in zip(evaluated, evaluated[1:], strict=False))


def test_a_short_prompt_reports_no_progress(engine):
    reports = []
    run(engine, conversation("ice", 8), progress=lambda n, total: reports.append(n))
    assert reports == []


def test_a_stop_during_prompt_evaluation_aborts_inside_the_batch(engine_without_saved_states):
    """One 2048-token batch: without llama.cpp's abort callback the stop would only
    be seen after the whole batch was evaluated (n_tokens would then have moved)."""
    engine = engine_without_saved_states
    messages = conversation("volcanoes", 1200)
    prompt = engine.chat_prompt_tokens(messages)
    assert engine.n_batch > len(prompt) > 1000
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    with pytest.raises(Cancelled):
        run(engine, messages, cancel=cancel)
    timer.cancel()
    assert engine.llm.n_tokens < 100  # the batch in flight was abandoned
    # The stop applied to that run only: the next one runs to its end.
    stats, text, _ = run(engine, conversation("lakes"))
    assert stats.completion_tokens > 0 and stats.finish_reason in {"length", "stop"}


def test_a_stop_ends_decoding_within_one_token(engine):
    cancel = threading.Event()
    stats = RunStats()
    prompt = engine.chat_prompt_tokens(conversation("clouds"))
    sampling = Sampling(max_tokens=200, temperature=0.0)
    pieces = []
    for piece in engine.stream(prompt, sampling, cancel, stats):
        pieces.append(piece)
        if stats.completion_tokens == 3:
            cancel.set()
    assert stats.completion_tokens == 3
    assert stats.finish_reason == "cancelled"
    assert "".join(pieces)  # the partial text is there for the caller to keep


def test_a_run_past_its_deadline_stops_and_keeps_what_it_wrote(engine):
    prompt = engine.chat_prompt_tokens(conversation("storms"))
    run(engine, conversation("storms"))  # the prompt is then cached: the deadline falls in decoding
    stats = RunStats()
    pieces = []
    # Short enough that the answer cannot reach its natural end first on a fast,
    # idle machine (at ~70 tokens/s that is about 15 tokens).
    deadline = time.monotonic() + 0.2
    with pytest.raises(TimeLimitExceeded):
        for piece in engine.stream(
            prompt, Sampling(max_tokens=3000), threading.Event(), stats, deadline=deadline
        ):
            pieces.append(piece)
    assert time.monotonic() - deadline < 1.0
    assert stats.finish_reason == "time_limit"
    assert "".join(pieces) and stats.completion_tokens < 3000


def test_a_deadline_also_ends_a_long_prompt_evaluation(engine_without_saved_states):
    engine = engine_without_saved_states
    prompt = engine.chat_prompt_tokens(conversation("glaciers", 1200))
    deadline = time.monotonic() + 0.3
    with pytest.raises(TimeLimitExceeded):
        next(engine.stream(prompt, GREEDY, threading.Event(), RunStats(), deadline=deadline))
    assert engine.llm.n_tokens < 100  # stopped inside the one big batch


def test_a_prompt_longer_than_the_context_is_refused_with_both_numbers(engine):
    prompt = engine.tokenize("word " * 5000)
    with pytest.raises(ContextOverflow) as caught:
        next(engine.stream(prompt, GREEDY, threading.Event(), RunStats()))
    assert caught.value.prompt_tokens == len(prompt) and caught.value.n_ctx == 4096
    assert f"{len(prompt):,}" in str(caught.value) and "4,096" in str(caught.value)


def test_the_web_process_counts_the_tokens_the_worker_will_evaluate(engine):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Héllo — how many tokens is this? 🌊"},
    ]
    model = type("Model", (), {"path": str(embedded_model_path())})
    assert count_chat_tokens(model, messages) == len(engine.chat_prompt_tokens(messages))


def test_a_file_llama_cpp_cannot_load_is_named_in_the_error(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(embedded_model_path().read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        Engine(options(path=str(broken)))


def test_llama_cpp_running_out_of_memory_is_said_in_words():
    from inference.engine import DecodeError, _decode_error

    error = _decode_error(RuntimeError("llama_decode returned 1"))
    assert isinstance(error, DecodeError) and "out of memory" in str(error)
    assert "compute buffers" in str(_decode_error(RuntimeError("llama_decode returned -2")))
    unknown = RuntimeError("something else")
    assert _decode_error(unknown) is unknown


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

    monkeypatch.setattr(engine_module, "cpu_has_amx", lambda cpuinfo=None: True)
    assert engine_module.use_extra_buffers("auto") is False
    assert engine_module.use_extra_buffers("on") is True
    monkeypatch.setattr(engine_module, "cpu_has_amx", lambda cpuinfo=None: False)
    assert engine_module.use_extra_buffers("auto") is True
    assert engine_module.use_extra_buffers("OFF") is False
    with pytest.raises(ValueError, match="LLAMA_EXTRA_BUFFERS"):
        engine_module.use_extra_buffers("sometimes")


def test_the_loaded_model_gets_the_extra_buffer_choice(engine, monkeypatch):
    """On this machine's CPU (AMX or not) the load follows use_extra_buffers(), and
    the model evaluates a prompt (on an AMX CPU with extra buffers on, llama.cpp
    crashes the process here)."""
    from inference.engine import use_extra_buffers

    assert engine.llm.model_params.use_extra_bufts is use_extra_buffers()
    monkeypatch.setenv("LLAMA_EXTRA_BUFFERS", "off")
    small = Engine(options(n_ctx=256))
    assert small.llm.model_params.use_extra_bufts is False
    stats, text, _ = run(small, conversation("tides", words=8))
    assert stats.completion_tokens > 0 and text


def test_a_wrong_extra_buffers_setting_is_refused_before_loading(monkeypatch):
    monkeypatch.setenv("LLAMA_EXTRA_BUFFERS", "maybe")
    with pytest.raises(ModelLoadError, match='LLAMA_EXTRA_BUFFERS must be "on", "off"'):
        Engine(options())


def test_the_first_token_is_sampled_from_the_prompts_last_batch(engine, monkeypatch):
    """No forward pass of its own for the prompt's last token: it would cost one
    decoding step before the first token."""
    import math

    passes = []
    original = engine.llm.eval

    def counting_eval(tokens):
        if tokens:
            passes.append(len(tokens))
        return original(tokens)

    monkeypatch.setattr(engine.llm, "eval", counting_eval)
    stats = RunStats()
    prompt = engine.chat_prompt_tokens(conversation("harbours", 300))
    pieces = engine.stream(prompt, GREEDY, threading.Event(), stats)
    next(pieces)  # the first token
    assert sum(passes) == len(prompt) - stats.cached_tokens
    assert len(passes) == math.ceil((len(prompt) - stats.cached_tokens) / engine.n_batch) > 1
    list(pieces)


@pytest.fixture
def counted_aborts(monkeypatch):
    """A fresh engine (speeds not known yet) and how often llama.cpp has asked it
    whether to abort."""
    engine = Engine(options(n_batch=2048), prefix_cache_bytes=0)
    asked = []

    def should_abort():
        asked.append(1)
        return engine._cancel.is_set() or engine._past_deadline()

    monkeypatch.setattr(engine, "_should_abort", should_abort)
    return engine, asked


def settled(engine, words: int = 40) -> None:
    """Runs until the engine's speed estimates come from warm runs: a fresh engine's
    first evaluations are slow (its weights are still being paged in)."""
    for i in range(3):
        run(engine, conversation(f"tides {i}", words))


def test_short_evaluations_skip_the_abort_callback_once_their_speed_is_known(
    counted_aborts, monkeypatch
):
    """llama.cpp asks after every graph node, and each question takes the GIL: an
    evaluation that will be over quickly is checked before and after instead."""
    from inference import engine as engine_module

    engine, asked = counted_aborts
    run(engine, conversation("tides"))
    assert asked  # the first run's speeds were not known: asked throughout
    settled(engine, 8)
    question = conversation("reefs", 8)  # a prompt of about 15 tokens
    prompt_s = engine._expected_s(
        len(engine.chat_prompt_tokens(question)), engine._batch_s_per_token
    )
    token_s = engine._expected_s(1, engine._decode_s_per_token)
    # "Quick" whatever this machine's speed: the rule is under test, not the constant.
    monkeypatch.setattr(engine_module, "ABORT_POLL_MIN_S", 4 * max(prompt_s, token_s))
    asked.clear()
    stats, text, _ = run(engine, question, Sampling(max_tokens=8, temperature=0.0))
    assert text and stats.completion_tokens == 8
    assert not asked
    # A long batch (some 100 times longer) is still watched, stop and deadline
    # inside it (the tests above).
    run(engine, conversation("trenches", 1200))
    assert asked


def test_an_evaluation_the_deadline_may_fall_in_is_watched(counted_aborts):
    from inference.engine import ABORT_POLL_MIN_S

    engine, asked = counted_aborts
    settled(engine)
    # A prompt that is short enough to go unwatched (about 0.15 s at this machine's
    # speed), with a deadline a third of the way into its evaluation.
    s_per_token = engine._batch_s_per_token
    prompt = engine.chat_prompt_tokens(conversation("currents", 1200))[: int(0.15 / s_per_token)]
    assert engine._expected_s(len(prompt), s_per_token) <= ABORT_POLL_MIN_S
    engine.llm.n_tokens = 0  # nothing of it reused
    asked.clear()
    deadline = time.monotonic() + len(prompt) * s_per_token / 3
    with pytest.raises(TimeLimitExceeded):
        next(engine.stream(prompt, GREEDY, threading.Event(), RunStats(), deadline=deadline))
    assert asked
    assert engine.llm.n_tokens < len(prompt)  # stopped inside its one batch
