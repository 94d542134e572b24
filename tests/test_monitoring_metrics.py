"""/metrics: Prometheus text, its access rule, and counts shared across processes."""

import uuid

import pytest
from django.contrib.auth import get_user_model
from prometheus_client.parser import text_string_to_metric_families

from inference.models import Generation, LanguageModel
from monitoring import prometheus, telemetry
from monitoring.models import RequestMetrics


@pytest.fixture
def model(db):
    return LanguageModel.objects.create(name=f"m-{uuid.uuid4().hex[:8]}", path="unused.gguf")


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user("metrics-user")


def finished(user, model, **metrics):
    gen = Generation.objects.create(user=user, model=model, state=Generation.DONE)
    values = dict(prompt_tokens=120, completion_tokens=41, queue_ms=50.0, ttft_ms=150.0)
    values.update(decode_ms=4000.0, e2e_ms=4300.0)
    values.update(metrics)
    RequestMetrics.objects.create(generation=gen, **values)
    return gen


def scrape(client, **headers):
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    return {
        sample.name + repr(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def test_a_scrape_without_credentials_is_refused(client, db, settings):
    settings.METRICS_TOKEN = "s3cret"
    response = client.get("/metrics")
    assert response.status_code == 401 and response["WWW-Authenticate"].startswith("Bearer")


def test_a_wrong_token_is_refused(client, db, settings):
    settings.METRICS_TOKEN = "s3cret"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer guess").status_code == 403


def test_an_empty_token_setting_accepts_no_token(client, db, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code in (401, 403)


def test_a_non_staff_session_is_refused(client, user, settings):
    settings.METRICS_TOKEN = ""
    client.force_login(user)
    assert client.get("/metrics").status_code == 403


def test_a_staff_session_may_scrape(client, db, settings):
    staff = get_user_model().objects.create_user("ops", is_staff=True)
    client.force_login(staff)
    assert client.get("/metrics").status_code == 200


def test_tokens_and_latencies_are_counted_once_per_generation(client, user, model, settings):
    settings.METRICS_TOKEN = "s3cret"
    auth = {"HTTP_AUTHORIZATION": "Bearer s3cret"}
    gen = finished(user, model)
    assert prometheus.observe(gen) is True
    assert prometheus.observe(gen) is False, "a repeated signal is not counted twice"
    finished_again = finished(user, model, completion_tokens=1, decode_ms=None)
    prometheus.observe(finished_again)
    values = scrape(client, **auth)
    label = repr([("model", model.name)])
    assert values["workbench:prompt_tokens_total" + label] == 240
    assert values["workbench:generation_tokens_total" + label] == 42
    assert values["workbench:request_queue_time_seconds_count" + label] == 2
    assert values["workbench:time_to_first_token_seconds_sum" + label] == pytest.approx(0.4)
    # 40 gaps between 41 tokens, each 0.1 s on average
    assert values["workbench:inter_token_latency_seconds_count" + label] == 40
    le = repr([("le", "0.1"), ("model", model.name)])
    assert values["workbench:inter_token_latency_seconds_bucket" + le] == 40
    assert values["workbench:e2e_request_latency_seconds_count" + label] == 2
    state = repr([("model", model.name), ("state", "done")])
    assert values["workbench:request_finished_total" + state] == 2


def test_running_and_waiting_come_from_the_database(client, user, model, settings):
    settings.METRICS_TOKEN = "t"
    Generation.objects.create(user=user, model=model, state=Generation.QUEUED)
    Generation.objects.create(user=user, model=model, state=Generation.QUEUED)
    Generation.objects.create(user=user, model=model, state=Generation.RUNNING)
    values = scrape(client, HTTP_AUTHORIZATION="Bearer t")
    label = repr([("model", model.name)])
    assert values["workbench:num_requests_waiting" + label] == 2
    assert values["workbench:num_requests_running" + label] == 1


def test_gpu_gauges_come_from_the_telemetry_of_every_host(
    client, db, settings, fake_gpus, redis_client
):
    settings.METRICS_TOKEN = "t"
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    telemetry.sample_once("host-a")
    telemetry.sample_once("host-b")
    values = scrape(client, HTTP_AUTHORIZATION="Bearer t")
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    key = repr([("gpu", "1"), ("host", "host-b"), ("uuid", "GPU-fake-0001")])
    assert values["workbench:gpu_memory_used_bytes" + key] == 20 * 2**30
    assert values["workbench:gpu_utilization_ratio" + key] == 0.5
    assert values["workbench:gpu_temperature_celsius" + key] == 60.0
    assert values["workbench:gpu_power_watts" + key] == 250.0


def test_without_a_gpu_there_are_no_gpu_series_not_zeros(
    client, db, settings, no_gpu, redis_client
):
    settings.METRICS_TOKEN = "t"
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    telemetry.sample_once("cpu-host")
    values = scrape(client, HTTP_AUTHORIZATION="Bearer t")
    assert not [k for k in values if k.startswith("workbench:gpu_")]


def test_load_gauges_under_vllm_names_come_from_the_database_and_live_workers(
    stack, transactional_db, client, settings
):
    """vllm:num_requests_running and _waiting per model from the rows; the KV-cache
    usage from the heartbeat of the live worker that serves the model."""
    from inference.registry import ensure_default_model

    settings.METRICS_TOKEN = "t"
    served = ensure_default_model()
    idle = LanguageModel.objects.create(name=f"m-{uuid.uuid4().hex[:8]}", path="unused.gguf")
    user = get_user_model().objects.create_user("vllm-names")
    Generation.objects.create(user=user, model=idle, state=Generation.QUEUED)
    Generation.objects.create(user=user, model=idle, state=Generation.RUNNING)
    Generation.objects.create(user=user, model=idle, state=Generation.RUNNING)
    values = scrape(client, HTTP_AUTHORIZATION="Bearer t")
    label = repr([("model_name", idle.name)])
    assert values["vllm:num_requests_waiting" + label] == 1
    assert values["vllm:num_requests_running" + label] == 2
    # No live worker serves that one: no KV figure, not a zero.
    assert "vllm:kv_cache_usage_perc" + label not in values
    usage = values["vllm:kv_cache_usage_perc" + repr([("model_name", served.name)])]
    assert 0 <= usage <= 1
