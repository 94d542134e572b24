"""Queued answers whose task is gone are sent again, or fail with the reason.

A task can be lost between the commit and the broker (Redis down at that moment) or
inside the broker (a Redis without persistence restarted). The reaper
(`inference.tasks.requeue_stranded_generations`, on beat) reads what really waits in
this deployment's queues (inference/broker.py) in the real Redis. The model here
has no worker, so whatever is queued stays where the test can see it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from inference import broker
from inference.models import Generation, LanguageModel
from inference.selectors import generation_snapshot, queue_position
from inference.tasks import REQUEUE_MAX, enqueue, requeue_stranded_generations
from mixtralweb import namespace, redis_pool


@pytest.fixture
def model(transactional_db, settings):
    settings.GENERATION_STRANDED_AFTER_S = 30
    model = LanguageModel.objects.create(name="stranded-model", path="/nowhere.gguf", n_ctx=512)
    yield model
    redis_pool.client().delete(namespace.model_queue(model.name), namespace.bulk_queue(model.name))


def queued(model, user, seconds_ago: float) -> Generation:
    gen = Generation.objects.create(
        user=user, model=model, state=Generation.QUEUED, input_messages=[], params={}
    )
    Generation.objects.filter(pk=gen.pk).update(
        queued_at=timezone.now() - timedelta(seconds=seconds_ago)
    )
    gen.refresh_from_db()
    return gen


def test_a_queued_answer_whose_task_was_lost_is_sent_again(model, cast):
    lost = queued(model, cast.alice, seconds_ago=60)  # never reached the broker
    assert lost.pk not in broker.waiting_generations([model.name])
    assert requeue_stranded_generations() == {"requeued": 1, "failed": 0}
    assert lost.pk in broker.waiting_generations([model.name])
    # Now it waits in its queue: left alone, not sent twice.
    assert requeue_stranded_generations() == {"requeued": 0, "failed": 0}


def test_one_waiting_in_its_queue_or_queued_just_now_is_left_alone(model, cast):
    waiting = queued(model, cast.alice, seconds_ago=60)
    enqueue(waiting)
    queued(model, cast.bob, seconds_ago=1)  # its task may still be on its way
    assert requeue_stranded_generations() == {"requeued": 0, "failed": 0}


def test_after_being_lost_too_often_it_fails_with_the_reason(model, cast):
    gen = queued(model, cast.alice, seconds_ago=60)
    queue = namespace.model_queue(model.name)
    for _ in range(REQUEUE_MAX):
        assert requeue_stranded_generations()["requeued"] == 1
        redis_pool.client().delete(queue)  # the broker loses it again
    assert requeue_stranded_generations() == {"requeued": 0, "failed": 1}
    gen.refresh_from_db()
    assert gen.state == Generation.FAILED
    assert f"lost {REQUEUE_MAX} times" in gen.reason


def test_an_answer_for_a_disabled_model_fails_with_the_reason(model, cast):
    gen = queued(model, cast.alice, seconds_ago=60)
    LanguageModel.objects.filter(pk=model.pk).update(enabled=False)
    assert requeue_stranded_generations() == {"requeued": 0, "failed": 1}
    gen.refresh_from_db()
    assert gen.state == Generation.FAILED and "disabled" in gen.reason


def test_nobody_waits_behind_a_lost_task_and_it_shows_no_estimate(model, cast):
    lost = queued(model, cast.alice, seconds_ago=60)  # never reached the broker
    fresh = queued(model, cast.bob, seconds_ago=1)
    assert queue_position(fresh) == 1
    snapshot = generation_snapshot(lost)
    assert snapshot["stranded"] is True and snapshot["eta_s"] is None
    # The reaper sends it again: it waits in its queue, and counts again.
    assert requeue_stranded_generations() == {"requeued": 1, "failed": 0}
    assert queue_position(fresh) == 2
    assert generation_snapshot(lost)["stranded"] is False
