"""mixtralweb.db.insert_together on the real PostgreSQL: linked rows in one
statement, in order, all or nothing."""

import pytest
from django.db import DataError, connection, transaction
from django.test.utils import CaptureQueriesContext

from inference.models import Conversation, Generation, Message
from mixtralweb.db import insert_together


@pytest.fixture
def rolled_back():
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def new_chat(user, model, answer_role=Message.ASSISTANT):
    conversation = Conversation(owner=user, model=model, title="Linked")
    generation = Generation(
        user=user, model=model, conversation=conversation, input_messages=[], params={}
    )
    question = Message(conversation=conversation, role=Message.USER, author=user, content="Hi")
    answer = Message(conversation=conversation, role=answer_role, generation=generation)
    return conversation, generation, question, answer


def test_linked_rows_go_in_one_statement_with_their_ids(cast, default_model, rolled_back):
    assert connection.vendor == "postgresql"
    conversation, generation, question, answer = new_chat(cast.alice, default_model)
    with CaptureQueriesContext(connection) as queries:
        insert_together([[conversation], [generation], [question, answer]])
    assert len(queries) == 1 and queries[0]["sql"].startswith("WITH ")
    stored = list(Message.objects.filter(conversation=conversation.pk).order_by("pk"))
    assert [(m.pk, m.role, m.generation_id) for m in stored] == [
        (question.pk, Message.USER, None),
        (answer.pk, Message.ASSISTANT, generation.pk),
    ]
    assert question.pk < answer.pk
    assert Generation.objects.get(pk=generation.pk).conversation_id == conversation.pk
    # The instances are saved ones now, their links in place without a query.
    with CaptureQueriesContext(connection) as queries:
        assert answer.generation is generation and generation.conversation is conversation
        assert answer.conversation_id == generation.conversation_id == conversation.pk
    assert len(queries) == 0
    assert not conversation._state.adding and conversation._state.db == "default"
    conversation.title = "Renamed"
    conversation.save()  # an UPDATE: it exists
    assert Conversation.objects.get(pk=conversation.pk).title == "Renamed"


def test_a_failing_row_inserts_nothing_and_leaves_the_instances_as_they_were(
    cast, default_model, rolled_back
):
    before = (Conversation.objects.count(), Generation.objects.count(), Message.objects.count())
    # The answer's role is longer than its column: the last INSERT fails.
    conversation, generation, question, answer = new_chat(
        cast.alice, default_model, answer_role="x" * 50
    )
    with pytest.raises(DataError), transaction.atomic():
        insert_together([[conversation], [generation], [question, answer]])
    after = (Conversation.objects.count(), Generation.objects.count(), Message.objects.count())
    assert after == before
    assert conversation.pk is None and generation.pk is None and answer.pk is None
    assert generation.conversation is conversation and answer.generation is generation
    assert generation.conversation_id is None


def test_links_must_point_back_to_an_earlier_single_row(cast, default_model, rolled_back):
    conversation, generation, question, answer = new_chat(cast.alice, default_model)
    with pytest.raises(ValueError, match="not inserted before it"):
        insert_together([[generation], [conversation]])
    other = Conversation(owner=cast.alice, model=default_model)
    conversation, generation, question, answer = new_chat(cast.alice, default_model)
    with pytest.raises(ValueError, match="must hold only it"):
        insert_together([[conversation, other], [question]])
    saved = Conversation.objects.create(owner=cast.alice, model=default_model)
    with pytest.raises(ValueError, match="new instances of one model only"):
        insert_together([[saved]])
    # Refused after an earlier link was made: that one is undone too.
    conversation, generation, question, answer = new_chat(cast.alice, default_model)
    stray = Generation(user=cast.alice, model=default_model, input_messages=[], params={})
    answer.generation = stray
    with pytest.raises(ValueError, match="not inserted before it"):
        insert_together([[conversation], [generation], [question, answer]])
    assert generation.conversation_id is None and generation.conversation is conversation
    assert not Conversation.objects.filter(title="Linked").exists()
