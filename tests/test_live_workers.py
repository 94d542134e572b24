"""Reading the live workers from Redis (inference/workers.py), on a scratch index in
the real Redis: expired entries leave the index, a key that expired before its index
entry is skipped, and the read survives Redis forgetting its scripts (a restart)."""

import json
import time

import pytest

from inference import workers


@pytest.fixture
def scratch_index(redis_client, monkeypatch):
    index = f"test:workers:live:{time.monotonic_ns()}"
    monkeypatch.setattr(workers, "INDEX_KEY", index)
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
    assert redis_client.zscore(workers.INDEX_KEY, expired) is None
    assert redis_client.zcard(workers.INDEX_KEY) == 3


def test_an_empty_index_reads_as_no_workers(scratch_index):
    assert workers.live_workers() == []


def test_the_read_survives_redis_forgetting_its_scripts(scratch_index, redis_client):
    scratch_index("a", "smol", 30)
    assert len(workers.live_workers()) == 1
    redis_client.script_flush()  # what a restart does to EVALSHA's cache
    assert len(workers.live_workers()) == 1
