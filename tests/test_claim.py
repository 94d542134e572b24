"""A worker's claim of a queued generation (Generation.objects.claim_queued): on
PostgreSQL one statement that returns the row and its model, elsewhere an UPDATE
and a read. Both give the same generation, and only one claimer ever wins."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from inference.models import Generation

ONE_STATEMENT = pytest.param(
    True,
    id="one",
    marks=pytest.mark.skipif(
        connection.vendor != "postgresql", reason="the one-statement claim is PostgreSQL's"
    ),
)
BOTH_PATHS = pytest.mark.parametrize(
    "one_statement", [ONE_STATEMENT, False], ids=["one", "portable"]
)


@pytest.fixture
def queued(cast, default_model):
    return Generation.objects.create(
        user=cast.alice,
        model=default_model,
        input_messages=[{"role": "user", "content": "Hello — ünïcode"}],
        params={"temperature": 0.5, "max_tokens": 12, "stop": ["\n\n"]},
    )


def fields(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in instance._meta.concrete_fields}


@BOTH_PATHS
def test_a_claim_marks_the_generation_running_and_returns_it_as_stored(queued, one_statement):
    gen = Generation.objects.claim_queued(queued.pk, "host:42", one_statement=one_statement)

    assert gen.state == Generation.RUNNING and gen.worker == "host:42" and gen.attempts == 1
    assert gen.started_at is not None and gen.started_at == gen.heartbeat_at
    # JSON decoded, dates aware, the model loaded: exactly what the ORM reads back.
    assert gen.input_messages == [{"role": "user", "content": "Hello — ünïcode"}]
    assert gen.params["stop"] == ["\n\n"]
    stored = Generation.objects.select_related("model").get(pk=queued.pk)
    assert fields(gen) == fields(stored)
    with CaptureQueriesContext(connection) as queries:
        assert fields(gen.model) == fields(stored.model)
    assert len(queries) == 0, "the model came with the claim"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's claim")
def test_on_postgresql_the_claim_is_one_statement(queued):
    with CaptureQueriesContext(connection) as queries:
        gen = Generation.objects.claim_queued(queued.pk, "host:42")
    assert gen is not None and len(queries) == 1


@BOTH_PATHS
def test_only_the_first_claim_wins(queued, one_statement):
    assert Generation.objects.claim_queued(queued.pk, "a:1", one_statement=one_statement)
    assert Generation.objects.claim_queued(queued.pk, "b:2", one_statement=one_statement) is None
    stored = Generation.objects.get(pk=queued.pk)
    assert stored.worker == "a:1" and stored.attempts == 1


@BOTH_PATHS
def test_a_generation_that_is_not_queued_is_not_claimed(queued, one_statement):
    Generation.objects.filter(pk=queued.pk).update(state=Generation.CANCELLED)
    assert Generation.objects.claim_queued(queued.pk, "a:1", one_statement=one_statement) is None
    assert Generation.objects.claim_queued(10**9, "a:1", one_statement=one_statement) is None
    assert Generation.objects.get(pk=queued.pk).attempts == 0
