from django.apps import AppConfig

# Registry presets whose n_parallel the planner works out, and the catalog entries
# that describe the deployment each one is for: (catalog model, quantization, GPU).
PRESET_DEPLOYMENTS = {
    "mixtral-8x22b-a100-80gb": ("mixtral-8x22b", "Q3_K_M", "a100-80gb"),
}


class PlannerConfig(AppConfig):
    """The capacity planner: will this model fit on this GPU, how fast will it run,
    and how many people can use it at once. It reads inference (the model files,
    the registry) and monitoring (recorded runs); inference never imports it."""

    name = "monitoring.planner"
    label = "planner"
    verbose_name = "Capacity planner"

    def ready(self) -> None:
        from inference.registry import provide_preset_option

        from .report import suggested_n_parallel

        for preset, (model, quant, gpu) in PRESET_DEPLOYMENTS.items():
            provide_preset_option(
                preset,
                "n_parallel",
                lambda options, model=model, quant=quant, gpu=gpu: suggested_n_parallel(
                    gpu=gpu, model=model, quant=quant, options=options
                ),
            )
