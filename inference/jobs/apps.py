from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "inference.jobs"
    label = "jobs"
    verbose_name = "Long-context jobs"

    def ready(self) -> None:
        # Jobs move on when one of their passes ends (inference's generation_finished).
        from . import receivers  # noqa: F401
