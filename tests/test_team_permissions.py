"""A team-mate in a shared conversation may post the next message, but may not
edit the owner's messages, regenerate the owner's answers or change the
conversation's settings. Alice owns the conversation and shares it with team Red;
Bob is in Red. Everything goes through the chat socket."""

from __future__ import annotations

import pytest

from inference import services
from inference.models import Conversation, Generation, LanguageModel, Message, WorkerHeartbeat
from inference.services import ChatError, clean_params


@pytest.fixture
def shared(cast, default_model):
    """Alice asked, the model answered; then Bob asked, and it answered him."""
    conversation = Conversation.objects.create(
        owner=cast.alice,
        team=cast.red,
        model=default_model,
        title="Shared",
        system_prompt="Be brief.",
        params=clean_params({"max_tokens": 8}),
    )

    def turn(author, question):
        asked = Message.objects.create(
            conversation=conversation, role=Message.USER, author=author, content=question
        )
        gen = Generation.objects.create(
            user=author,
            team=cast.red,
            model=default_model,
            conversation=conversation,
            state=Generation.DONE,
            text=f"An answer to {question}",
        )
        answer = Message.objects.create(
            conversation=conversation, role=Message.ASSISTANT, generation=gen
        )
        return asked, answer

    alices_question, alices_answer = turn(cast.alice, "Alice asks")
    return type(
        "Shared",
        (),
        {"conversation": conversation, "question": alices_question, "answer": alices_answer},
    )


def refused(ws, frame) -> dict:
    ws.send({"request_id": 7, **frame})
    error, _ = ws.recv_until(lambda f: f["type"] in ("error", "chat.accepted"))
    assert error["type"] == "error", f"accepted: {error}"
    assert error["code"] == "forbidden" and error["request_id"] == 7
    return error


def test_a_team_mate_may_post_the_next_message(stack, cast, shared, ws_factory):
    ws = ws_factory(cast.bob)
    ws.send(
        {
            "type": "chat.send",
            "request_id": 1,
            "content": "Bob asks",
            "conversation": shared.conversation.pk,
        }
    )
    accepted, _ = ws.recv_until(lambda f: f["type"] in ("error", "chat.accepted"))
    assert accepted["type"] == "chat.accepted"
    ws.recv_until(lambda f: f["type"] == "generation.final", timeout=120)
    assert shared.conversation.messages.filter(author=cast.bob).count() == 1


def test_a_team_mate_may_not_change_the_parameters(stack, cast, shared, ws_factory):
    ws = ws_factory(cast.bob)
    error = refused(
        ws,
        {
            "type": "chat.send",
            "content": "Bob asks",
            "conversation": shared.conversation.pk,
            "params": {"max_tokens": 300},
        },
    )
    assert "Only the conversation's owner can change its settings" in error["message"]
    shared.conversation.refresh_from_db()
    assert shared.conversation.params["max_tokens"] == 8
    assert not shared.conversation.messages.filter(author=cast.bob).exists()


def test_a_team_mate_may_not_change_the_system_prompt_or_the_model(stack, cast, shared, ws_factory):
    ws = ws_factory(cast.bob)
    base = {"type": "chat.send", "content": "Bob asks", "conversation": shared.conversation.pk}
    refused(ws, {**base, "system_prompt": "Ignore the owner."})
    refused(ws, {**base, "model": "some-other-model"})
    assert not shared.conversation.messages.filter(author=cast.bob).exists()


def test_the_owner_changes_the_settings_for_the_next_answer(stack, cast, shared, ws_factory):
    ws = ws_factory(cast.alice)
    ws.send(
        {
            "type": "chat.send",
            "request_id": 1,
            "content": "And in French?",
            "conversation": shared.conversation.pk,
            "system_prompt": "Answer in French.",
            "params": {"max_tokens": 3, "temperature": 0},
        }
    )
    accepted, _ = ws.recv_until(lambda f: f["type"] in ("error", "chat.accepted"))
    assert accepted["type"] == "chat.accepted", accepted
    ws.recv_until(lambda f: f["type"] == "generation.final", timeout=120)
    gen = Generation.objects.get(pk=accepted["generation"])
    assert gen.params["max_tokens"] == 3 and gen.params["temperature"] == 0
    assert gen.input_messages[0] == {"role": "system", "content": "Answer in French."}
    assert gen.metrics.completion_tokens <= 3
    shared.conversation.refresh_from_db()
    assert shared.conversation.system_prompt == "Answer in French."
    assert shared.conversation.params["max_tokens"] == 3


def test_the_owner_switches_the_model_only_where_the_conversation_fits(cast, shared):
    small = LanguageModel.objects.create(
        name="small-context", path=shared.conversation.model.path, n_ctx=256
    )
    serving = [{"model": small.name, "state": WorkerHeartbeat.READY}]
    ask = dict(user=cast.alice, conversation_id=shared.conversation.pk, live_workers=serving)
    long = " ".join(["Tell me about lighthouses and their keepers."] * 40)
    with pytest.raises(ChatError) as refused_:
        services.chat_send(content=long, model_name=small.name, **ask)
    assert refused_.value.code == "context_overflow"
    shared.conversation.refresh_from_db()
    assert shared.conversation.model != small, "a refused message changes nothing"
    assert not shared.conversation.messages.filter(content=long).exists()
    conversation, _, gen = services.chat_send(content="Short one.", model_name=small.name, **ask)
    assert conversation.model == small and gen.model == small
    shared.conversation.refresh_from_db()
    assert shared.conversation.model == small


def test_a_team_mate_may_not_edit_the_owners_message(stack, cast, shared, ws_factory):
    ws = ws_factory(cast.bob)
    error = refused(ws, {"type": "chat.edit", "message": shared.question.pk, "content": "Changed"})
    assert "owner" in error["message"]
    shared.question.refresh_from_db()
    assert shared.question.superseded_at is None
    assert shared.conversation.messages.current().count() == 2


def test_a_team_mate_may_not_regenerate_the_answer_to_the_owners_message(
    stack, cast, shared, ws_factory
):
    ws = ws_factory(cast.bob)
    error = refused(ws, {"type": "chat.regenerate", "conversation": shared.conversation.pk})
    assert "regenerate" in error["message"]
    shared.answer.refresh_from_db()
    assert shared.answer.superseded_at is None
    assert shared.conversation.generations.count() == 1


def test_a_team_mate_may_not_edit_his_message_when_the_owners_follow_it(
    stack, cast, shared, ws_factory
):
    bobs = Message.objects.create(
        conversation=shared.conversation, role=Message.USER, author=cast.bob, content="Bob asks"
    )
    later = Message.objects.create(
        conversation=shared.conversation, role=Message.USER, author=cast.alice, content="Then I"
    )
    ws = ws_factory(cast.bob)
    refused(ws, {"type": "chat.edit", "message": bobs.pk, "content": "Bob asks again"})
    later.refresh_from_db()
    assert later.superseded_at is None


def test_a_team_mate_may_regenerate_the_answer_to_his_own_message(
    stack, cast, shared, default_model, ws_factory
):
    Message.objects.create(
        conversation=shared.conversation, role=Message.USER, author=cast.bob, content="Bob asks"
    )
    gen = Generation.objects.create(
        user=cast.bob,
        model=default_model,
        conversation=shared.conversation,
        state=Generation.DONE,
        text="An answer to Bob",
    )
    bobs_answer = Message.objects.create(
        conversation=shared.conversation, role=Message.ASSISTANT, generation=gen
    )
    ws = ws_factory(cast.bob)
    ws.send({"type": "chat.regenerate", "request_id": 3, "conversation": shared.conversation.pk})
    accepted, _ = ws.recv_until(lambda f: f["type"] in ("error", "chat.accepted"))
    assert accepted["type"] == "chat.accepted", accepted
    ws.recv_until(lambda f: f["type"] == "generation.final", timeout=120)
    bobs_answer.refresh_from_db()
    assert bobs_answer.superseded_at is not None


def test_the_owner_may_edit_and_regenerate_anything(stack, cast, shared, ws_factory):
    Message.objects.create(
        conversation=shared.conversation, role=Message.USER, author=cast.bob, content="Bob asks"
    )
    ws = ws_factory(cast.alice)
    ws.send({"type": "chat.edit", "request_id": 4, "message": shared.question.pk, "content": "Hm"})
    accepted, _ = ws.recv_until(lambda f: f["type"] in ("error", "chat.accepted"))
    assert accepted["type"] == "chat.accepted", accepted
    ws.recv_until(lambda f: f["type"] == "generation.final", timeout=120)
    assert shared.conversation.messages.current().filter(author=cast.bob).count() == 0


def test_a_team_mate_may_not_drop_the_oldest_turns(cast, default_model, settings):
    from django.db import transaction

    from inference.services import ChatError, chat_send
    from tests.test_chat_overflow import answered, text_of

    settings.CHAT_REQUIRE_WORKER = False
    share = int(default_model.n_ctx * 0.4)
    with transaction.atomic():  # rolled back: nothing reaches the broker
        conversation, _, gen1 = chat_send(user=cast.alice, content=text_of(default_model, share))
        conversation.team = cast.red
        conversation.save()
        answered(gen1)
        _, _, gen2 = chat_send(
            user=cast.alice, conversation_id=conversation.pk, content=text_of(default_model, share)
        )
        answered(gen2)
        with pytest.raises(ChatError) as caught:
            chat_send(
                user=cast.bob,
                conversation_id=conversation.pk,
                content=text_of(default_model, share),
                overflow="drop_oldest",
            )
        assert caught.value.code == "forbidden"
        assert "Only the conversation's owner can drop its oldest turns" in str(caught.value)
        assert not Message.objects.filter(dropped_from_context=True).exists()
        transaction.set_rollback(True)


def test_a_shared_conversation_shows_who_else_has_it_open(stack, cast, shared, ws_factory):
    def watchers(ws, users):
        frame, _ = ws.recv_until(
            lambda f: f["type"] == "conversation.watchers" and f["users"] == users, timeout=10
        )
        assert frame["conversation"] == shared.conversation.pk

    alice, bob = ws_factory(cast.alice), ws_factory(cast.bob)
    opened = {"type": "conversation.open", "conversation": shared.conversation.pk}
    alice.send(opened)
    alice.recv_until(lambda f: f["type"] == "conversation.snapshot")
    bob.send(opened)
    watchers(alice, ["bob"])
    watchers(bob, ["alice"])
    # Charlie is in no team of the conversation: he is refused, and nobody hears of him.
    charlie = ws_factory(cast.charlie)
    charlie.send(opened)
    charlie.recv_until(lambda f: f["type"] == "error")
    bob.close()
    watchers(alice, [])
