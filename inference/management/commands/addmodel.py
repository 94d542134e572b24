"""Register a GGUF model: `manage.py addmodel PATH --name NAME [load options]`.

PATH is the model's file, or the first file of a model split into several
(`...-00001-of-00005.gguf`): the others are found beside it and checked too. The
files are inspected and the load options are checked before anything is saved; a
bad or missing file or a combination llama.cpp would refuse is reported, and
nothing is registered. Running it again for the same name updates that model.
"""

import json

from django.core.management.base import BaseCommand, CommandError

from inference.gguf import GGUFError
from inference.registry import (
    PRESETS,
    LoadOptionsError,
    environment_notes,
    options_in_force,
    register_model,
)


def on_off_auto(value: str) -> str:
    lowered = value.lower()
    if lowered in {"on", "true", "1", "yes"}:
        return "on"
    if lowered in {"off", "false", "0", "no"}:
        return "off"
    if lowered == "auto":
        return "auto"
    raise ValueError(value)


class Command(BaseCommand):
    help = "Inspect a GGUF file and register it as a model (or update the named model)."

    def add_arguments(self, parser):
        parser.add_argument(
            "path", help="the GGUF file; for a model in several files, the first (-00001-of-...)"
        )
        parser.add_argument("--name", required=True, help="a slug, e.g. mixtral-8x22b")
        parser.add_argument("--description", default="")
        parser.add_argument(
            "--preset",
            choices=sorted(PRESETS),
            help="named load options (docs/models.md); explicit options override them",
        )
        parser.add_argument("--n-ctx", type=int)
        parser.add_argument("--n-gpu-layers", type=int, help="-1: every layer on the GPU")
        parser.add_argument("--flash-attn", type=on_off_auto, metavar="on|off|auto")
        parser.add_argument("--type-k", choices=["f16", "q8_0", "q4_0"])
        parser.add_argument("--type-v", choices=["f16", "q8_0", "q4_0"])
        parser.add_argument("--n-threads", type=int, help="0: the machine's physical cores")
        parser.add_argument("--n-threads-batch", type=int, help="0: the same as --n-threads")
        parser.add_argument("--n-batch", type=int)
        parser.add_argument("--n-parallel", type=int, help="sequences decoded together")
        parser.add_argument("--job-sequences", type=int, help="of those, at most this many jobs")
        parser.add_argument(
            "--split-mode",
            choices=["none", "layer", "row"],
            help="several GPUs: whole layers (default), rows of each matrix, or none (one GPU)",
        )
        parser.add_argument("--main-gpu", type=int, help="with --split-mode none: the GPU to use")
        parser.add_argument(
            "--tensor-split", metavar="N0,N1,...", help='share of each GPU, e.g. "3,1"'
        )

    def handle(self, *args, path, name, description, preset, **options):
        load = {
            key: options[key]
            for key in ("n_ctx", "n_gpu_layers", "flash_attn", "type_k", "type_v")
            + ("n_threads", "n_threads_batch", "n_batch", "n_parallel", "job_sequences")
            + ("split_mode", "main_gpu", "tensor_split")
            if options.get(key) is not None
        }
        try:
            model = register_model(
                name=name, path=path, preset=preset, description=description, **load
            )
        except GGUFError as exc:
            raise CommandError(str(exc)) from exc
        except LoadOptionsError as exc:
            reasons = "\n".join(f"  --{k.replace('_', '-')}: {v}" for k, v in exc.errors.items())
            raise CommandError(f"{path}: load options refused:\n{reasons}") from exc
        report = model.inspection
        files = report.get("files", [])
        listing = ":" + "".join(f"\n  {file}" for file in files) if len(files) > 1 else ""
        self.stdout.write(
            self.style.SUCCESS(f"Registered {model.name} ({model.path})")
            + f"\n{model.files_summary}{listing}\n"
            + json.dumps(
                {
                    k: report.get(k)
                    for k in (
                        "architecture",
                        "parameter_count",
                        "expert_count",
                        "expert_used_count",
                        "block_count",
                        "context_length",
                        "file_type",
                        "tensor_count",
                        "tensor_bytes",
                        "file_bytes",
                    )
                },
                indent=2,
            )
            + f"\nLoad options: n_ctx={model.n_ctx} n_gpu_layers={model.n_gpu_layers} "
            f"flash_attn={model.flash_attn} type_k={model.type_k} type_v={model.type_v} "
            f"n_threads={model.n_threads} n_threads_batch={model.n_threads_batch} "
            f"n_batch={model.n_batch} n_parallel={model.n_parallel} "
            f"job_sequences={model.job_sequences} split_mode={model.split_mode} "
            f"main_gpu={model.main_gpu} tensor_split={model.tensor_split or '-'}"
            + f"\n{in_force_line(model)}"
            + "".join(f"\nNote: {note}" for note in environment_notes(model, worker=False))
            + f"\nStart its worker with: manage.py modelworker {model.name}"
        )


def in_force_line(model) -> str:
    """What a worker started on this machine uses where the stored options leave the
    choice to it (the Workers page shows what each live worker uses)."""
    force = options_in_force(model)
    auto = " (llama.cpp's choice: the physical cores)"
    line = (
        f"In force for a worker on this machine: n_threads={force['n_threads']}"
        f"{auto if not model.n_threads else ''} n_threads_batch={force['n_threads_batch']} "
        f"n_ubatch={force['n_ubatch']} extra_buffers={force['extra_buffers']} "
        f"prefix_cache_mb={force['prefix_cache_mb']}"
    )
    if model.flash_attn == "auto":
        line += " flash_attn=auto (llama.cpp decides when the worker loads)"
    return line
