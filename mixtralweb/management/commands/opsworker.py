"""Start this deployment's ops worker: `manage.py opsworker`.

It runs the maintenance tasks that beat schedules (the reapers, job re-drive,
telemetry rollups, alerts) from this deployment's own ops queue, one at a time.
Run exactly one per deployment beside one `celery -A mixtralweb beat`.
"""

import os
import shutil
import sys

from django.core.management.base import BaseCommand

from mixtralweb import namespace


class Command(BaseCommand):
    help = "Run the Celery worker for this deployment's maintenance tasks (its ops queue)."

    def add_arguments(self, parser):
        parser.add_argument("--loglevel", default="INFO")

    def handle(self, *args, loglevel, **options):
        celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or "celery"
        argv = [
            celery,
            "-A",
            "mixtralweb",
            "worker",
            "--queues",
            namespace.ops_queue(),
            "--hostname",
            namespace.worker_name("ops"),
            "--pool",
            "solo",
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
        sys.stdout.flush()
        os.execv(celery, argv)
