"""Deleting a conversation deletes its text; what it cost stays for the usage pages.

Alice owns the conversation; nobody else is involved."""

from __future__ import annotations

from django.test import Client

from inference.models import Conversation, Generation, Message
from monitoring.models import RequestMetrics

SECRET = "alice-private-91d2"


def alices_conversation(cast, model, *, state=Generation.DONE):
    conversation = Conversation.objects.create(owner=cast.alice, model=model, title="Plans")
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content=f"{SECRET} q"
    )
    gen = Generation.objects.create(
        user=cast.alice,
        model=model,
        conversation=conversation,
        state=state,
        text=f"{SECRET} answer" if state == Generation.DONE else "",
        input_messages=[{"role": "user", "content": f"{SECRET} q"}],
        prompt_tokens=11,
        completion_tokens=7,
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    return conversation, gen


def delete(user, conversation):
    client = Client()
    client.force_login(user)
    return client.post(f"/c/{conversation.pk}/delete/")


def test_it_deletes_the_messages_prompts_and_answers_and_keeps_the_metrics(cast, default_model):
    conversation, gen = alices_conversation(cast, default_model)
    RequestMetrics.objects.create(generation=gen, prompt_tokens=11, completion_tokens=7)
    response = delete(cast.alice, conversation)
    assert response.status_code == 302
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.exists()
    gen.refresh_from_db()
    assert gen.text == "" and gen.input_messages == [] and gen.prompt_text == ""
    assert (gen.prompt_tokens, gen.completion_tokens) == (11, 7)
    metrics = RequestMetrics.objects.get(generation=gen)
    assert (metrics.prompt_tokens, metrics.completion_tokens) == (11, 7)


def test_an_answer_that_ends_after_its_conversation_was_deleted_keeps_no_text(cast, default_model):
    conversation, gen = alices_conversation(cast, default_model, state=Generation.RUNNING)
    delete(cast.alice, conversation)
    # The worker's last write, as it finishes a run it was asked to stop.
    gen.refresh_from_db()
    gen.text = f"{SECRET} late words"
    gen.finish(Generation.CANCELLED, "Stopped by request.")
    gen.refresh_from_db()
    assert gen.state == Generation.CANCELLED
    assert gen.text == "" and gen.input_messages == []


def test_deleting_one_conversation_leaves_the_other_answers_alone(cast, default_model):
    conversation, _ = alices_conversation(cast, default_model)
    _, kept = alices_conversation(cast, default_model)
    api = Generation.objects.create(
        user=cast.alice, model=default_model, source=Generation.SOURCE_API, text="api answer"
    )
    delete(cast.alice, conversation)
    kept.refresh_from_db()
    api.refresh_from_db()
    assert kept.text == f"{SECRET} answer" and api.text == "api answer"
