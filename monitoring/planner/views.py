"""The planner's page: a form of names and numbers, and the plan beneath it.

The page plans catalog models and registered models only; planning an arbitrary
GGUF path is for `manage.py plan`, so that the web page never opens files a user
names.
"""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from inference.models import LanguageModel

from . import catalog, present
from .compute import KV_TYPES, PlanError
from .report import make_report

# What the page plans before anyone asks: the deployment this project was built for.
DEFAULTS = {
    "gpu": "a100-80gb",
    "model": "mixtral-8x22b",
    "quant": "Q3_K_M",
    "ctx": "65536",
    "kv": "q8_0",
    "flash_attn": "auto",
    "host": catalog.DEFAULT_HOST,
    "users": "",
}
FLASH_ATTN_CHOICES = {"auto": None, "on": True, "off": False}


def _form_values(query) -> dict:
    """The form as submitted; what it leaves out, as DEFAULTS has it. A quantization
    goes with a catalog model only: none plans a registered model from its own files
    (a registered model may share a catalog model's name)."""
    values = {key: query.get(key, default).strip() for key, default in DEFAULTS.items()}
    if values["model"] not in catalog.MODELS or ("model" in query and "quant" not in query):
        values["quant"] = ""
    return values


def _whole_number(text: str, what: str) -> int | None:
    if text == "":
        return None
    try:
        return int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise PlanError(f"{what} must be a whole number, not {text!r}") from None


@login_required
def planner(request):
    values = _form_values(request.GET)
    report = error = None
    status = 200
    try:
        if values["flash_attn"] not in FLASH_ATTN_CHOICES:
            raise PlanError(
                f"unknown flash attention choice {values['flash_attn']!r}; "
                f"valid: {', '.join(FLASH_ATTN_CHOICES)}"
            )
        if (
            values["model"] not in catalog.MODELS
            and not LanguageModel.objects.filter(name=values["model"]).exists()
        ):
            names = [*catalog.MODELS, *LanguageModel.objects.values_list("name", flat=True)]
            raise PlanError(f"unknown model {values['model']!r}; valid: {', '.join(names)}")
        report = make_report(
            gpu=values["gpu"],
            model=values["model"],
            quant=values["quant"] or None,
            n_ctx=_whole_number(values["ctx"], "the context"),
            kv=values["kv"],
            flash_attn=FLASH_ATTN_CHOICES[values["flash_attn"]],
            host=values["host"],
            users=_whole_number(values["users"], "the number of users at once"),
        )
    except PlanError as exc:
        error, status = str(exc), 400
    context = {
        "values": values,
        "gpus": catalog.GPUS.values(),
        "hosts": catalog.HOSTS.values(),
        "catalog_models": catalog.MODELS.values(),
        "registered_models": LanguageModel.objects.all(),
        "quants": catalog.QUANTS,
        "kv_types": KV_TYPES,
        "flash_attn_choices": FLASH_ATTN_CHOICES,
        "error": error,
        "report": report,
    }
    if report is not None:
        context.update(
            headline=present.headline(report),
            sections=present.sections(report),
            options=present.option_rows(report),
            concurrency=present.concurrency_rows(report),
            measured=present.measured_rows(report),
            assumptions=report.plan.assumptions,
        )
    return render(request, "planner/planner.html", context, status=status)
