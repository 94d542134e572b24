"""A misspelled CELERY_* setting is silently ignored: assert the effective values."""

from django.conf import settings

from mixtralweb.celery import app


def test_it_acks_late_and_requeues_when_a_worker_dies():
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True


def test_it_prefetches_one_task_per_worker_process():
    assert app.conf.worker_prefetch_multiplier == 1


def test_visibility_timeout_outlasts_the_longest_generation():
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert visibility > app.conf.task_time_limit > app.conf.task_soft_time_limit
    assert app.conf.task_soft_time_limit == settings.GENERATION_TIME_LIMIT_S


def test_it_uses_redis_as_the_broker():
    assert app.conf.broker_url == settings.REDIS_URL
    assert app.conf.broker_url.startswith("redis://")


def test_tasks_without_a_queue_go_to_this_deployments_ops_queue(settings):
    settings.REDIS_NAMESPACE = "deployment-a"
    route = app.amqp.router.route({}, "inference.tasks.reap_stale_generations")
    assert route["queue"].name == "deployment-a.ops"


def test_alerts_are_evaluated_by_beat_and_sent_from_the_ops_queue(settings):
    """Neither the evaluation nor a message runs in a model worker: all three go to
    the deployment's ops queue (a model worker consumes only its model's queues)."""
    settings.REDIS_NAMESPACE = "deployment-a"
    app.loader.import_default_modules()  # as a worker does at start: autodiscovery
    entry = app.conf.beat_schedule["evaluate-alerts"]
    assert entry["task"] == "monitoring.tasks.evaluate_alerts"
    assert entry["schedule"] == settings.ALERT_EVALUATE_INTERVAL_S
    for name in [entry["task"], "monitoring.notify.send_webhook", "monitoring.notify.send_email"]:
        assert name in app.tasks, f"{name} is not registered"
        assert app.amqp.router.route({}, name)["queue"].name == "deployment-a.ops"
    webhook = app.tasks["monitoring.notify.send_webhook"]
    assert webhook.retry_backoff and webhook.max_retries == settings.ALERT_WEBHOOK_MAX_RETRIES


def test_a_worker_keeps_its_database_connection_from_one_task_to_the_next(transactional_db):
    """Celery's Django fixup (installed in every worker) would reconnect for every
    task; with CELERY_DB_REUSE_MAX set, Django's CONN_MAX_AGE decides."""
    from celery.fixups.django import DjangoWorkerFixup
    from celery.signals import task_prerun
    from django.db import connection

    from inference.tasks import generate

    fixup = DjangoWorkerFixup(app)
    connection.close()  # a healthy connection to start from (an earlier test may
    connection.ensure_connection()  # have left this process's one broken)
    before = connection.connection
    for _ in range(3):
        fixup.on_task_prerun(sender=generate)
        task_prerun.send(sender=generate, task_id="t", task=generate, args=(), kwargs={})
        fixup.on_task_postrun(sender=generate)
    connection.ensure_connection()
    assert connection.connection is before
