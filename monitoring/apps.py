from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    verbose_name = "Monitoring"

    def ready(self) -> None:
        # Connect the signal receivers: generation_finished (daily rollup, Prometheus
        # counters) and Celery's worker_ready (GPU telemetry in model workers).
        from monitoring import receivers, telemetry  # noqa: F401
