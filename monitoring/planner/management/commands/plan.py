"""manage.py plan: will this model fit on this GPU, how fast will it run, and how
many people can use it at once?"""

import argparse
import json

from django.core.management.base import BaseCommand, CommandError

from monitoring.planner import catalog
from monitoring.planner.compute import KV_TYPES, PlanError
from monitoring.planner.present import as_text
from monitoring.planner.report import FLASH_ATTN_MODES, make_report


class Command(BaseCommand):
    help = (
        "Plan a model on a GPU: memory, headroom, largest context, offloading, decode and "
        "prompt speed, how many people at once at what context, llama.cpp settings. "
        "--model is a catalog model (with --quant), a registered model's name or the path "
        "of a GGUF file (the first file of a model in several)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--gpu", required=True, help=f"one of: {catalog.names(catalog.GPUS)}, or a CPU host"
        )
        parser.add_argument(
            "--model",
            required=True,
            help=f"one of: {catalog.names(catalog.MODELS)}; a registered model; a GGUF path "
            "(for a model in several files, the first: ...-00001-of-0000N.gguf)",
        )
        parser.add_argument("--quant", help=f"catalog models only: {catalog.names(catalog.QUANTS)}")
        parser.add_argument(
            "--ctx", type=int, help="context tokens (default: the model's n_ctx or trained)"
        )
        parser.add_argument("--kv", default="f16", help=f"KV cache type: {', '.join(KV_TYPES)}")
        parser.add_argument(
            "--flash-attn",
            choices=["auto", "on", "off"],
            default="auto",
            help="as LanguageModel.flash_attn and llama.cpp's -fa; auto (the default) is "
            "planned on, as llama.cpp turns it on where the device has the kernel",
        )
        parser.add_argument(
            "--no-flash-attn", dest="flash_attn", action="store_const", const="off",
            help=argparse.SUPPRESS,
        )  # fmt: skip
        parser.add_argument(
            "--host",
            default=catalog.DEFAULT_HOST,
            help=f"CPU side for offloaded layers: {catalog.names(catalog.HOSTS)}",
        )
        parser.add_argument(
            "--users",
            type=int,
            help="people chatting at once; the KV pool is split between them and one job "
            "(default: as many 8,192-token chats as half the pool holds)",
        )
        parser.add_argument("--json", action="store_true", help="print the plan as JSON")

    def handle(self, *args, **options):
        try:
            report = make_report(
                gpu=options["gpu"],
                model=options["model"],
                quant=options["quant"],
                n_ctx=options["ctx"],
                kv=options["kv"],
                flash_attn=FLASH_ATTN_MODES[options["flash_attn"]],
                host=options["host"],
                users=options["users"],
            )
        except PlanError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps(report.as_json(), indent=2))
        else:
            self.stdout.write(as_text(report))
