"""The live token path, end to end: browser socket → consumer → Celery → worker →
channel layer → socket, with the real model."""

from inference.models import Conversation, Generation, Message


def send_and_collect(ws, **frame):
    ws.send({"type": "chat.send", "request_id": 1, **frame})
    accepted, _ = ws.recv_until(lambda f: f["type"] == "chat.accepted")
    gen_id = accepted["generation"]
    streamed = ""
    final, frames = ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == gen_id, timeout=120
    )
    for f in frames:
        if f["type"] == "generation.snapshot" and f["generation"] == gen_id:
            streamed = f["text"] if len(f["text"]) > len(streamed) else streamed
        if f["type"] == "generation.token" and f["generation"] == gen_id:
            assert f["offset"] <= len(streamed), "a token frame skipped text"
            streamed += f["text"][len(streamed) - f["offset"] :]
    return accepted, final, frames, streamed


def test_streamed_text_equals_the_stored_text(stack, cast, default_model, ws_factory):
    ws = ws_factory(cast.alice)
    accepted, final, frames, streamed = send_and_collect(
        ws, content="Write two sentences about the sea.", params={"max_tokens": 48, "seed": 7}
    )
    tokens = [f for f in frames if f["type"] == "generation.token"]
    assert len(tokens) >= 2, "the answer arrived in one piece, not streamed"
    gen = Generation.objects.get(pk=accepted["generation"])
    assert gen.state == Generation.DONE
    assert gen.text and streamed == gen.text == final["text"]
    assert final["state"] == "done"


def test_each_generation_records_what_it_cost(stack, cast, default_model, ws_factory):
    ws = ws_factory(cast.alice)
    accepted, final, _, _ = send_and_collect(ws, content="Say hello.", params={"max_tokens": 24})
    gen = Generation.objects.select_related("metrics").get(pk=accepted["generation"])
    m = gen.metrics
    assert m.prompt_tokens > 10
    assert 1 <= m.completion_tokens <= 24
    assert m.queue_ms is not None and m.queue_ms >= 0
    assert m.ttft_ms is not None and m.ttft_ms > 0
    assert m.n_ctx == default_model.n_ctx
    assert m.context_used == m.prompt_tokens + m.completion_tokens
    if m.completion_tokens >= 2:
        assert m.decode_tokens_per_s > 0
    assert gen.queued_at <= gen.started_at <= gen.first_token_at <= gen.finished_at
    # No GPU here: unknown, never invented zeros.
    assert m.vram_process_peak_bytes is None and m.gpu_index is None
    assert m.rss_peak_bytes > 0
    assert final["metrics"]["completion_tokens"] == m.completion_tokens


def test_the_conversation_is_there_after_a_reload(stack, cast, default_model, ws_factory):
    ws = ws_factory(cast.alice)
    accepted, final, _, _ = send_and_collect(
        ws, content="Name a colour.", params={"max_tokens": 16}
    )
    ws.close()
    again = ws_factory(cast.alice)
    again.send({"type": "conversation.open", "conversation": accepted["conversation"]})
    snapshot, _ = again.recv_until(lambda f: f["type"] == "conversation.snapshot")
    roles = [(m["role"], m["text"]) for m in snapshot["messages"]]
    assert roles == [("user", "Name a colour."), ("assistant", final["text"])]
    conversation = Conversation.objects.get(pk=accepted["conversation"])
    assert conversation.messages.filter(role=Message.USER).count() == 1


def test_a_follow_up_sees_the_earlier_turns(stack, cast, default_model, ws_factory):
    ws = ws_factory(cast.alice)
    first, _, _, _ = send_and_collect(ws, content="My name is Ada.", params={"max_tokens": 16})
    second, _, _, _ = send_and_collect(
        ws, content="What is my name?", conversation=first["conversation"]
    )
    gen = Generation.objects.get(pk=second["generation"])
    contents = [m["content"] for m in gen.input_messages]
    assert contents[0] == "My name is Ada." and contents[-1] == "What is my name?"
    assert len(contents) == 3
    # The shared prefix was reused from the KV cache, not evaluated again.
    assert gen.metrics.cached_tokens > 0
