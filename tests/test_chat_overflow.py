"""A chat message that does not fit the model's context: refused with both numbers
before anything is saved or queued, or, on request, the oldest turns are dropped,
visibly. Real tokenizer (the model file's own), real database; the whole test runs
in a transaction that is rolled back, so nothing reaches the broker."""

import pytest
from django.db import transaction

from inference import selectors
from inference.models import Generation, Message
from inference.services import ChatError, chat_send, conversation_input
from inference.tokens import count_chat_tokens


def text_of(model, tokens: int) -> str:
    """A message of about `tokens` tokens in the model's chat template."""
    unit = "The lighthouse keeper counted the waves. "

    def count(units: int) -> int:
        return count_chat_tokens(model, [{"role": "user", "content": unit * units}])

    per_unit = (count(40) - count(20)) / 20
    units = round((tokens - count(0)) / per_unit)
    assert abs(count(units) - tokens) <= per_unit
    return unit * units


@pytest.fixture
def rolled_back(settings):
    settings.CHAT_REQUIRE_WORKER = False  # the check under test comes before any worker
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def answered(generation: Generation, text: str = "Noted.") -> None:
    Generation.objects.filter(pk=generation.pk).update(state=Generation.DONE, text=text)


def test_a_first_message_longer_than_the_context_is_refused_with_both_numbers(
    cast, default_model, rolled_back
):
    huge = text_of(default_model, default_model.n_ctx + 500)
    for overflow in (None, "drop_oldest"):  # nothing older to drop
        with pytest.raises(ChatError) as refused:
            chat_send(user=cast.alice, content=huge, overflow=overflow)
        assert refused.value.code == "context_overflow"
        message = str(refused.value)
        assert f"{default_model.n_ctx:,}" in message
        prompt_tokens = count_chat_tokens(default_model, [{"role": "user", "content": huge}])
        assert f"{prompt_tokens:,} tokens" in message
    assert not Message.objects.exists() and not Generation.objects.exists()


def test_a_new_conversation_queues_exactly_its_system_prompt_and_message(
    cast, default_model, rolled_back
):
    conversation, _, generation = chat_send(
        user=cast.alice, content="Hello there.", system_prompt="Answer in French."
    )
    assert (
        generation.input_messages
        == conversation_input(conversation)
        == [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello there."},
        ]
    )


def test_a_conversations_questions_and_answers_are_stored_in_order(
    cast, default_model, rolled_back
):
    # The first message and its answer are inserted together; a follow-up one by one.
    conversation, first, gen1 = chat_send(user=cast.alice, content="Hello there.")
    answered(gen1)
    _, second, gen2 = chat_send(
        user=cast.alice, conversation_id=conversation.pk, content="And then?"
    )
    stored = list(conversation.messages.all())
    assert [(m.role, m.content, m.generation_id) for m in stored] == [
        (Message.USER, "Hello there.", None),
        (Message.ASSISTANT, "", gen1.pk),
        (Message.USER, "And then?", None),
        (Message.ASSISTANT, "", gen2.pk),
    ]
    assert (stored[0].pk, stored[2].pk) == (first.pk, second.pk)
    assert first.created_at == stored[0].created_at <= stored[1].created_at
    assert first.author == cast.alice


def test_a_follow_up_to_a_disabled_model_is_refused_and_saves_nothing(
    cast, default_model, rolled_back
):
    conversation, _, gen1 = chat_send(user=cast.alice, content="Hello there.")
    answered(gen1)
    type(default_model).objects.filter(pk=default_model.pk).update(enabled=False)
    before = (Message.objects.count(), Generation.objects.count())
    with pytest.raises(ChatError) as refused:
        chat_send(user=cast.alice, conversation_id=conversation.pk, content="And then?")
    assert refused.value.code == "unknown_model"
    assert default_model.name in str(refused.value)
    assert (Message.objects.count(), Generation.objects.count()) == before


def test_an_overflowing_follow_up_is_refused_or_drops_the_oldest_turns_visibly(
    cast, default_model, rolled_back
):
    # Two turns of about 40 % of the context each: the third message does not fit.
    share = int(default_model.n_ctx * 0.4)
    conversation, first, gen1 = chat_send(user=cast.alice, content=text_of(default_model, share))
    answered(gen1)
    _, second, gen2 = chat_send(
        user=cast.alice, conversation_id=conversation.pk, content=text_of(default_model, share)
    )
    answered(gen2)
    third = text_of(default_model, share)
    messages_before = Message.objects.count()

    with pytest.raises(ChatError) as refused:
        chat_send(user=cast.alice, conversation_id=conversation.pk, content=third)
    assert refused.value.code == "context_overflow"
    assert f"context is {default_model.n_ctx:,}" in str(refused.value)
    assert Message.objects.count() == messages_before, "a refused message must save nothing"
    assert not Message.objects.filter(dropped_from_context=True).exists()

    _, _, gen3 = chat_send(
        user=cast.alice, conversation_id=conversation.pk, content=third, overflow="drop_oldest"
    )
    dropped = Message.objects.filter(conversation=conversation, dropped_from_context=True)
    assert {m.pk for m in dropped} == {first.pk, gen1.message.pk}
    assert [m["content"] for m in gen3.input_messages] == [second.content, "Noted.", third]
    prompt_tokens = count_chat_tokens(default_model, gen3.input_messages)
    assert prompt_tokens + gen3.params["max_tokens"] <= default_model.n_ctx
    # The conversation shows which turns were dropped.
    snapshot = selectors.conversation_snapshot(conversation)
    shown = {m["id"]: m["dropped_from_context"] for m in snapshot["messages"]}
    assert shown[first.pk] and shown[gen1.message.pk]
    assert not shown[second.pk] and not shown[gen3.message.pk]
