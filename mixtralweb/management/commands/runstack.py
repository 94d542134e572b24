"""`make run`: the whole product in the foreground, one combined log, Ctrl-C stops it.

Prepares the database, the first admin and the default model, makes sure Redis
answers (starting a local redis-server with its data in var/ if needed), then runs
the ASGI server, one Celery worker for the default model and Celery beat.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from honcho.manager import Manager

from inference.registry import apply_default_model_settings, ensure_default_model
from mixtralweb import namespace
from mixtralweb.web_server import daphne_argv


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def local_redis_argv(binary: str, port: int, data_dir) -> list[str]:
    """The local redis-server of `make run`. Its data survives a restart, even a crash
    or a kill (an append-only file in var/redis/, synced every second): queued
    answers' tasks, live workers' and sessions' keys."""
    return [
        binary,
        *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)),
        *("--save", "60 1", "--appendonly", "yes", "--appendfsync", "everysec"),
    ]


class Command(BaseCommand):
    help = "Run the web server, a worker for the default model, beat and the ops worker."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", default=os.environ.get("PORT", "8000"))

    def handle(self, *args, host, port, **options):
        self.stdout.write("Preparing the database…")
        call_command("migrate", interactive=False, verbosity=0)
        self.ensure_admin()
        for note in apply_default_model_settings():
            self.stdout.write(f"Default model: {note}")
        model = ensure_default_model()
        self.stdout.write(f"Default model: {model.name} ({model.path})")

        manager = Manager()
        # Every process of this deployment uses the same namespace in Redis.
        env = {**os.environ, "REDIS_NAMESPACE": namespace.namespace()}
        redis_url = settings.REDIS_URL
        if not redis_answers(redis_url):
            redis_url = self.start_local_redis(manager, redis_url)
            env["REDIS_URL"] = redis_url

        python = sys.executable
        bin_dir = os.path.dirname(python)
        manager.add_process("web", shlex.join(daphne_argv(host=host, port=port)), env=env)
        manager.add_process("worker", f"{python} manage.py modelworker {model.name}", env=env)
        # Maintenance tasks (the reaper) get their own small worker, so that they
        # run even while the model worker is busy or gone.
        manager.add_process("ops", f"{python} manage.py opsworker", env=env)
        manager.add_process(
            "beat",
            f"{bin_dir}/celery -A mixtralweb beat --loglevel INFO "
            f"--schedule {settings.CELERY_BEAT_SCHEDULE_FILENAME}",
            env=env,
        )
        self.stdout.write(
            self.style.SUCCESS(f"\nOpen http://{host}:{port}/ — Ctrl-C stops everything.\n")
        )
        self.stdout.flush()
        manager.loop()
        sys.exit(manager.returncode or 0)

    def ensure_admin(self) -> None:
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME")
        if username and os.environ.get("DJANGO_SUPERUSER_PASSWORD"):
            call_command("createsuperuser", interactive=False, verbosity=0)
            self.stdout.write(f"Created the admin {username!r} from DJANGO_SUPERUSER_*.")
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(
            "admin", os.environ.get("DJANGO_SUPERUSER_EMAIL", ""), password
        )
        self.stdout.write(
            self.style.WARNING(
                "\nCreated the first admin. This password is shown once only:\n"
                f"    username: admin\n    password: {password}\n"
            )
        )

    def start_local_redis(self, manager: Manager, url: str) -> str:
        parsed = urlparse(url)
        if parsed.hostname not in {"127.0.0.1", "localhost", "::1", None}:
            raise CommandError(f"Redis at {url} does not answer, and it is not local.")
        binary = shutil.which("redis-server") or self.install_redis()
        port = parsed.port or 6379
        data_dir = settings.VAR_DIR / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.stdout.write(f"Redis does not answer at {url}: starting redis-server on port {port}.")
        manager.add_process("redis", shlex.join(local_redis_argv(binary, port, data_dir)))
        local_url = f"redis://127.0.0.1:{port}/{(parsed.path or '/0').lstrip('/') or 0}"
        # The others start beside it and retry until it answers.
        return local_url

    def install_redis(self) -> str:
        hint = "Install it with: sudo apt-get install redis-server  (or set REDIS_URL)"
        if os.geteuid() != 0:
            raise CommandError(f"redis-server is not installed. {hint}")
        self.stdout.write("redis-server is not installed: installing it with apt-get…")
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "redis-server"],
        ):
            if subprocess.call(command, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}):
                raise CommandError(f"apt-get failed. {hint}")
        binary = shutil.which("redis-server")
        if not binary:
            raise CommandError(f"redis-server is still missing. {hint}")
        return binary
