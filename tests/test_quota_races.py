"""Quotas hold under concurrent requests: several web processes (here, threads with
their own database connections) checking and inserting at the same moment let
exactly the limit through. Alice and Bob share team Red; Charlie is on his own."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from inference import services
from inference.models import Generation, LanguageModel
from inference.openai_api import parsing
from inference.openai_api.errors import ApiError
from inference.openai_api.views import start_generation
from inference.tokens import count_chat_tokens
from mixtralweb import namespace, redis_pool
from mixtralweb.accounts.models import ApiKey, Quota

CALLERS = 8


def at_once(calls) -> list:
    """Run every call in its own thread, released together; their results or errors."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(index, call):
        try:
            barrier.wait()
            results[index] = call()
        except Exception as exc:  # noqa: BLE001 - the refusals are what is counted
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.fixture
def ready(default_model, settings):
    """A model with the default model's file and no worker. The checks under test
    come before any worker, and what they let through must not run: a worker of
    another module's stack would still be writing its answers while these tables
    are emptied (nothing here waits for it)."""
    settings.CHAT_REQUIRE_WORKER = False
    model = LanguageModel.objects.create(
        name="quota-races", path=default_model.path, n_ctx=default_model.n_ctx
    )
    # The tokenizer is loaded once, before the threads race.
    count_chat_tokens(model, [{"role": "user", "content": "Hi"}])
    yield model
    redis_pool.client().delete(namespace.model_queue(model.name), namespace.bulk_queue(model.name))


def test_concurrent_api_calls_get_exactly_the_concurrency_limit_through(cast, ready):
    Quota.objects.create(user=cast.charlie, concurrent_generations=2)
    _, secret = ApiKey.issue(user=cast.charlie, name="script")
    key = ApiKey.objects.get(user=cast.charlie)
    body = {
        "model": ready.name,
        "messages": [{"role": "user", "content": "Hi"}],
    }

    def call():
        return start_generation(key=key, parsed=parsing.parse_chat(body))

    results = at_once([call] * CALLERS)
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(refused) == CALLERS - 2, results
    assert all(r.status == 429 for r in refused)
    assert Generation.objects.filter(user=cast.charlie).count() == 2


def test_concurrent_chats_of_a_team_get_exactly_its_per_minute_limit_through(cast, ready):
    Quota.objects.create(team=cast.red, requests_per_minute=3)

    def chat(user):
        return lambda: services.chat_send(
            user=user, content=f"Hello from {user}", model_name=ready.name
        )

    results = at_once([chat(cast.alice), chat(cast.bob)] * (CALLERS // 2))
    refused = [r for r in results if isinstance(r, services.ChatError)]
    assert len(refused) == CALLERS - 3, results
    assert all(r.code == "quota" and "Team Red's limit" in str(r) for r in refused)
    assert Generation.objects.filter(user__in=[cast.alice, cast.bob]).count() == 3


def test_concurrent_follow_ups_in_several_conversations_get_exactly_the_limit_through(cast, ready):
    """Each follow-up writes its message before it checks the quota: the lock must
    not deadlock with the key locks those writes take."""
    from inference.models import Conversation

    Quota.objects.create(user=cast.alice, concurrent_generations=2)
    conversations = [
        Conversation.objects.create(owner=cast.alice, model=ready, title=f"Chat {n}")
        for n in range(CALLERS)
    ]

    def follow_up(conversation):
        return lambda: services.chat_send(
            user=cast.alice, conversation_id=conversation.pk, content="And then?"
        )

    results = at_once([follow_up(c) for c in conversations])
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == CALLERS - 2, results
    assert all(isinstance(r, services.ChatError) and r.code == "quota" for r in refused), refused
    assert Generation.objects.filter(user=cast.alice).count() == 2
