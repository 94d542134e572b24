from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        # Open sockets hear when what their user may see changes.
        from . import receivers  # noqa: F401
