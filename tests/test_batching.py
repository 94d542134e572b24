"""Several people at once, through the running stack: answers stream interleaved from
one worker, stop independently, wait for room in the KV pool, start during a long
job prompt, and reuse cached prompts only within their tenant."""

from __future__ import annotations

import threading
import time

from inference.models import Conversation, Generation
from inference.registry import register_model
from tests.test_chat_stream import send_and_collect


def start(ws, content: str, **params) -> int:
    ws.send({"type": "chat.send", "content": content, "params": params})
    accepted, _ = ws.recv_until(lambda f: f["type"] in {"chat.accepted", "error"})
    assert accepted["type"] == "chat.accepted", accepted
    return accepted["generation"]


def collect(ws, gen_id: int, timeout_s: float = 180) -> tuple[dict, str, list[float]]:
    """Follow one answer on its own socket from its start: its final frame, the
    streamed text, and when the worker had each piece (wall clock)."""
    streamed, produced = "", []
    while True:
        frame = ws.recv(timeout=timeout_s)
        if frame.get("generation") != gen_id:
            continue
        if frame["type"] == "generation.snapshot" and len(frame["text"]) > len(streamed):
            streamed = frame["text"]
        elif frame["type"] == "generation.token":
            assert frame["offset"] <= len(streamed), "a token frame skipped text"
            streamed += frame["text"][len(streamed) - frame["offset"] :]
            produced.extend(frame["produced_at"])
        elif frame["type"] == "generation.final":
            return frame, streamed, produced


def test_four_answers_stream_interleaved_from_one_worker_each_stored_as_streamed(
    stack, cast, default_model, ws_factory
):
    users = [cast.alice, cast.bob, cast.charlie, cast.alice]
    sockets = [ws_factory(user) for user in users]
    gens = [
        start(ws, f"Write a short story about {topic}.", max_tokens=64, temperature=0.0)
        for ws, topic in zip(sockets, ["a fox", "a ship", "a clock", "a river"], strict=True)
    ]
    results = [collect(ws, gen_id) for ws, gen_id in zip(sockets, gens, strict=True)]
    for gen_id, (final, streamed, _) in zip(gens, results, strict=True):
        gen = Generation.objects.select_related("metrics").get(pk=gen_id)
        assert gen.state == Generation.DONE and final["state"] == "done"
        assert streamed == gen.text == final["text"]
        assert gen.metrics.batch_size_max >= 2
    # They ran at once: each one's tokens were made while the others' were.
    spans = [(produced[0], produced[-1]) for _, _, produced in results]
    assert max(start for start, _ in spans) < min(end for _, end in spans)


def test_stopping_one_answer_leaves_the_others_running(stack, cast, default_model, ws_factory):
    alice, bob = ws_factory(cast.alice), ws_factory(cast.bob)
    stopped = start(alice, "Count slowly from one to five hundred.", max_tokens=400)
    kept = start(bob, "List the planets of the solar system.", max_tokens=48, temperature=0.0)
    alice.recv_until(lambda f: f["type"] == "generation.token" and f["generation"] == stopped)
    alice.send({"type": "generation.stop", "generation": stopped})
    final, _ = alice.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == stopped
    )
    assert final["state"] == "cancelled"
    bob_final, streamed, _ = collect(bob, kept)
    assert bob_final["state"] == "done" and streamed == bob_final["text"]
    assert Generation.objects.get(pk=kept).completion_tokens > 0


def test_a_prompt_too_large_for_the_free_kv_waits_and_then_runs(
    stack, cast, default_model, ws_factory
):
    """A model with a 1,024-token pool and two sequences: the second answer asks for
    more room than the first leaves, waits, shows its place, then runs."""
    model = register_model(
        name="smollm2-small-pool",
        path=default_model.path,
        n_ctx=1024,
        n_parallel=2,
    )
    worker = stack.start_worker("small-pool-worker", model.name)
    try:
        stack.wait_model(model.name)
        ws = ws_factory(cast.alice)
        ws.send(
            {
                "type": "chat.send",
                "model": model.name,
                "content": "Tell me everything about lighthouses.",
                "params": {"max_tokens": 700, "temperature": 0.0},
            }
        )
        first, _ = ws.recv_until(lambda f: f["type"] == "chat.accepted")
        ws.recv_until(
            lambda f: f["type"] == "generation.token" and f["generation"] == first["generation"]
        )
        other = ws_factory(cast.bob)
        other.send(
            {
                "type": "chat.send",
                "model": model.name,
                "content": "Name three birds.",
                "params": {"max_tokens": 400, "temperature": 0.0},
            }
        )
        second, _ = other.recv_until(lambda f: f["type"] == "chat.accepted")
        time.sleep(2)
        assert Generation.objects.get(pk=second["generation"]).state == Generation.QUEUED
        final, _, _ = collect(other, second["generation"])
        assert final["state"] == "done"
        first_gen = Generation.objects.get(pk=first["generation"])
        assert first_gen.state == Generation.DONE
        # It started only when the first had given its room back.
        assert Generation.objects.get(pk=second["generation"]).started_at >= first_gen.finished_at
    finally:
        stack.stop("small-pool-worker")
        worker.wait(20)


def test_a_chat_starts_while_a_long_job_prompt_is_read(stack, cast, default_model, ws_factory):
    from inference.jobs import services as jobs

    document = "The history of the lighthouse and its keepers. " * 700  # about 6,000 tokens
    job = jobs.job_draft(
        user=cast.bob, instruction="Summarise this in one line.", max_tokens=16, text=document
    )
    job = jobs.job_submit(user=cast.bob, job_id=job.pk, strategy="single")
    pass_gen = job.chunks.get().generation
    deadline = time.monotonic() + 60
    while Generation.objects.get(pk=pass_gen.pk).state != Generation.RUNNING:
        assert time.monotonic() < deadline, "the job pass never started"
        time.sleep(0.1)
    ws = ws_factory(cast.alice)
    gen_id = start(ws, "Say hi.", max_tokens=8)
    ws.recv_until(lambda f: f["type"] == "generation.final" and f["generation"] == gen_id)
    chat = Generation.objects.get(pk=gen_id)
    jobs.job_cancel(user=cast.bob, job_id=job.pk)
    deadline = time.monotonic() + 60
    while not Generation.objects.get(pk=pass_gen.pk).is_final:
        assert time.monotonic() < deadline, "the job pass never ended"
        time.sleep(0.1)
    pass_gen.refresh_from_db()
    # The chat was answered while the job's prompt was still being read: its first
    # token came before the pass's (which, cancelled in its prompt, had none at all).
    assert chat.state == Generation.DONE and chat.first_token_at is not None
    assert pass_gen.first_token_at is None or chat.first_token_at < pass_gen.first_token_at


def test_a_right_guess_of_another_users_prompt_gets_no_more_reuse_than_a_wrong_one(
    stack, cast, default_model, ws_factory
):
    secret = "My confidential plan: we acquire Nimbus Ltd on 3 March for 40 million."
    send_and_collect(ws_factory(cast.alice), content=secret, params={"max_tokens": 4})
    charlie = ws_factory(cast.charlie)
    _, right, _, _ = send_and_collect(charlie, content=secret, params={"max_tokens": 4})
    _, wrong, _, _ = send_and_collect(
        charlie,
        content="My confidential plan: we acquire Zephyr Ltd on 9 May for 12 million.",
        params={"max_tokens": 4},
    )
    right_gen = Generation.objects.select_related("metrics").get(pk=right["generation"])
    wrong_gen = Generation.objects.select_related("metrics").get(pk=wrong["generation"])
    # What the chat template puts before any message is all either may reuse.
    assert right_gen.metrics.cached_tokens <= wrong_gen.metrics.cached_tokens
    assert right_gen.metrics.cached_tokens < 10
    # Alice herself, asking again, reuses her own prompt.
    _, again, _, _ = send_and_collect(
        ws_factory(cast.alice), content=secret, params={"max_tokens": 4}
    )
    assert Generation.objects.get(pk=again["generation"]).metrics.cached_tokens > 15


def test_a_team_mates_follow_up_in_a_shared_conversation_reuses_its_cached_prompt(
    stack, cast, default_model, ws_factory
):
    alice = ws_factory(cast.alice)
    accepted, _, _, _ = send_and_collect(
        alice, content="Our runbook for restarting the billing service.", params={"max_tokens": 8}
    )
    conversation = Conversation.objects.get(pk=accepted["conversation"])
    alice.send({"type": "conversation.open", "conversation": conversation.pk})
    alice.recv_until(lambda f: f["type"] == "conversation.snapshot")
    conversation.team = cast.red
    conversation.save()
    # Shared from now on: its answers belong to team Red's cache, not Alice's alone.
    _, first, _, _ = send_and_collect(
        alice, conversation=conversation.pk, content="Step one?", params={"max_tokens": 8}
    )
    first_gen = Generation.objects.select_related("metrics").get(pk=first["generation"])
    assert first_gen.tenant == f"team:{cast.red.pk}"
    assert first_gen.metrics.cached_tokens < 10  # Alice's own cells are not the team's
    bob = ws_factory(cast.bob)
    bob.send({"type": "conversation.open", "conversation": conversation.pk})
    bob.recv_until(lambda f: f["type"] == "conversation.snapshot")
    _, second, _, _ = send_and_collect(
        bob, conversation=conversation.pk, content="And step two?", params={"max_tokens": 8}
    )
    second_gen = Generation.objects.select_related("metrics").get(pk=second["generation"])
    assert second_gen.metrics.cached_tokens >= first_gen.metrics.prompt_tokens - 8


def test_eight_people_at_once_all_get_their_answers(stack, cast, default_model, ws_factory):
    sockets = [ws_factory(user) for user in [cast.alice, cast.bob, cast.charlie] * 3][:8]
    gens, errors = [], []

    def one(ws, i):
        try:
            gen_id = start(ws, f"Give me word number {i}.", max_tokens=12)
            final, streamed, _ = collect(ws, gen_id)
            gens.append((gen_id, final, streamed))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(ws, i)) for i, ws in enumerate(sockets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert not errors and len(gens) == 8
    for gen_id, final, streamed in gens:
        assert final["state"] == "done" and streamed == Generation.objects.get(pk=gen_id).text
