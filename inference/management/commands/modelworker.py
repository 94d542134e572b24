"""Start a Celery worker for one registered model: `manage.py modelworker NAME`.

One worker process loads the model once and runs its generations in a pool of
threads, n_parallel of them at once in one llama.cpp context (inference/serving.py).
More throughput beyond one GPU means more workers, each on its own GPU
(CUDA_VISIBLE_DEVICES) or host.
"""

import os
import shutil
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.models import LanguageModel
from inference.registry import apply_default_model_settings
from inference.serving import pool_size
from mixtralweb import namespace


class Command(BaseCommand):
    help = "Run a Celery worker that serves the named model's queue."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--loglevel", default="INFO")

    def handle(self, *args, name, loglevel, **options):
        if name == settings.DEFAULT_MODEL_NAME:
            for note in apply_default_model_settings():
                self.stdout.write(f"{name}: {note}")
        model = LanguageModel.objects.filter(name=name).first()
        if model is None:
            known = ", ".join(LanguageModel.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"No model named {name!r} is registered (registered: {known}).")
        celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or "celery"
        argv = [
            celery,
            "-A",
            "mixtralweb",
            "worker",
            "--queues",
            # Interactive first: with queue_order_strategy "priority" a job pass
            # starts only when no chat message is waiting.
            f"{model.queue_name},{model.bulk_queue_name}",
            "--hostname",
            namespace.worker_name(model.name),
            "--concurrency",
            str(pool_size(model)),
            "--pool",
            "threads",
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
        os.environ["WORKER_MODEL"] = model.name
        sys.stdout.flush()
        os.execv(celery, argv)
