"""The worker heartbeat (inference/workers.py), on a scratch index in the real Redis:
expired entries leave the index, a key that expired before its index entry is
skipped, the read survives Redis forgetting its scripts (a restart), and the
heartbeat's table row is created once, then updated in place."""

import json
import time

import pytest

from inference import workers


@pytest.fixture
def scratch_index(redis_client, settings):
    # A namespace of its own: this index, and the keys of the workers it lists.
    settings.REDIS_NAMESPACE = f"test-workers-{time.monotonic_ns()}"
    index = workers.index_key()
    keys = []

    def add(name: str, model: str, expires_in_s: float, value: bool = True) -> str:
        key = f"{index}:{name}"
        keys.append(key)
        if value:
            state = {"model": model, "host": "h", "pid": len(keys), "state": "ready"}
            redis_client.set(key, json.dumps(state), ex=60)
        redis_client.zadd(index, {key: time.time() + expires_in_s})
        return key

    yield add
    redis_client.delete(index, *keys)


def test_only_live_workers_are_read_and_the_expired_leave_the_index(scratch_index, redis_client):
    scratch_index("a", "smol", 30)
    scratch_index("b", "mixtral", 30)
    expired = scratch_index("c", "smol", -1)
    scratch_index("d", "smol", 30, value=False)  # its key expired first

    found = workers.live_workers()

    assert [(w["model"], w["pid"]) for w in found] == [("mixtral", 2), ("smol", 1)]
    assert [w["pid"] for w in workers.live_workers("smol")] == [1]
    assert redis_client.zscore(workers.index_key(), expired) is None
    assert redis_client.zcard(workers.index_key()) == 3


def test_an_empty_index_reads_as_no_workers(scratch_index):
    assert workers.live_workers() == []


def test_the_read_survives_redis_forgetting_its_scripts(scratch_index, redis_client):
    scratch_index("a", "smol", 30)
    assert len(workers.live_workers()) == 1
    redis_client.script_flush()  # what a restart does to EVALSHA's cache
    assert len(workers.live_workers()) == 1


def test_another_deployments_workers_are_not_read(scratch_index, settings):
    scratch_index("a", "smol", 30)
    mine = settings.REDIS_NAMESPACE
    settings.REDIS_NAMESPACE = f"{mine}-other"
    assert workers.live_workers() == []
    settings.REDIS_NAMESPACE = mine
    assert len(workers.live_workers()) == 1


def test_serving_problem_judges_the_workers_it_is_given():
    def worker(model, state):
        return {"model": model, "host": "h", "pid": 1, "state": state, "reason": "no file"}

    assert workers.serving_problem("smol", [worker("smol", "ready")]) is None
    assert workers.serving_problem("smol", [worker("smol", "loading")]) is None
    assert "No worker is serving the model 'smol'" in workers.serving_problem(
        "smol", [worker("mixtral", "ready")]
    )
    # The worker's own reason (paths, llama.cpp's words) is for staff only.
    for_users = workers.serving_problem("smol", [worker("smol", "failed")])
    assert "failed to load it" in for_users and "no file" not in for_users
    assert "failed to load it (no file)" in workers.serving_problem(
        "smol", [worker("smol", "failed")], detail=True
    )
    assert "No worker" in workers.serving_problem("smol", [])


# transaction=True: a heartbeat write starts with close_old_connections(), which ends
# a test case's enclosing transaction.
@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_row_is_created_once_then_updated(scratch_index, redis_client):
    from inference.models import WorkerHeartbeat

    beat = workers.Heartbeat("smol", "CPU")
    try:
        beat.write()
        row = WorkerHeartbeat.objects.get(host=beat.host, pid=beat.pid)
        assert (row.state, row.model_name, row.generation_id) == ("loading", "smol", None)
        started, seen = row.started_at, row.seen_at

        beat.report(state=WorkerHeartbeat.READY, load_progress=1.0)
        row.refresh_from_db()
        assert (row.state, row.load_progress) == ("ready", 1.0)
        assert row.started_at == started and row.seen_at > seen
        assert WorkerHeartbeat.objects.filter(host=beat.host, pid=beat.pid).count() == 1

        # A row removed meanwhile (an administrator's cleanup) is written again.
        WorkerHeartbeat.objects.filter(pk=row.pk).delete()
        beat.report(state=WorkerHeartbeat.FAILED, reason="out of memory while loading")
        again = WorkerHeartbeat.objects.get(host=beat.host, pid=beat.pid)
        assert (again.state, again.reason) == ("failed", "out of memory while loading")
        assert [w["state"] for w in workers.live_workers("smol")] == ["failed"]
    finally:
        redis_client.delete(workers.worker_key(beat.host, beat.pid))
