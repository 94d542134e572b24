"""One record per generation, through the real stack: worker, database, Redis."""

import socket
import time

from inference.models import Generation
from monitoring import prometheus, telemetry
from monitoring.models import UsageDaily
from tests.test_chat_stream import send_and_collect


def _counter(redis_client, model, field):
    return int(redis_client.hget(prometheus._counters_key(model), field) or 0)


def test_a_finished_chat_is_recorded_summed_and_counted(
    stack, cast, default_model, ws_factory, redis_client
):
    before = _counter(redis_client, default_model.name, "generation_tokens")
    ws = ws_factory(cast.alice)
    accepted, _, _, _ = send_and_collect(ws, content="Say hi.", params={"max_tokens": 12})
    gen = Generation.objects.select_related("metrics").get(pk=accepted["generation"])
    m = gen.metrics
    assert gen.user == cast.alice and gen.source == "chat" and gen.state == "done"
    assert m.e2e_ms >= m.queue_ms + m.ttft_ms > 0
    assert m.host and m.pid and m.cpu_mean_pct is not None
    # The worker sums the day for Alice once the generation has ended.
    deadline = time.monotonic() + 10
    while not UsageDaily.objects.filter(user=cast.alice).exists():
        assert time.monotonic() < deadline, "the daily rollup was not refreshed"
        time.sleep(0.1)
    day = UsageDaily.objects.get(user=cast.alice)
    assert day.requests == 1 and day.completion_tokens == m.completion_tokens
    assert day.prompt_tokens == m.prompt_tokens and day.source == "chat"
    assert day.vram_peak_max_bytes is None, "no GPU here: unknown, not zero"
    after = _counter(redis_client, default_model.name, "generation_tokens")
    assert after - before == m.completion_tokens


def test_the_model_worker_reports_its_host_as_having_no_gpu(stack):
    def worker_host():
        hosts = [h for h in telemetry.current_hosts() if h["host"] == socket.gethostname()]
        return hosts[0] if hosts else None

    deadline = time.monotonic() + 20
    while worker_host() is None:
        assert time.monotonic() < deadline, "the worker's telemetry thread never reported"
        time.sleep(0.3)
    assert worker_host()["gpus"] == 0
