"""Shared set-up for benchmarks: a migrated bench database and the running stack."""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.core.management import call_command

from mixtralweb.web_server import daphne_argv
from tests.conftest import Stack, free_port

ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or f"sqlite:///{settings.DATABASES['default']['NAME']}"


def prepare_database() -> None:
    """Create (PostgreSQL) and migrate the bench database."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("postgresql"):
        import psycopg

        admin = psycopg.connect(
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
            user=db.get("USER") or "postgres",
            dbname="postgres",
            autocommit=True,
        )
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]])
        if not exists.fetchone():
            admin.execute(f'CREATE DATABASE "{db["NAME"]}"')
        admin.close()
    call_command("migrate", interactive=False, verbosity=0)


def start_stack() -> Stack:
    from inference.registry import ensure_default_model

    ensure_default_model()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1"}
    stack = Stack(port, env)
    stack.start("bench-web", daphne_argv(host="127.0.0.1", port=port))
    stack.start_worker("bench-worker")
    stack.wait_http()
    stack.wait_worker()
    return stack


def bench_user(username: str = "bench"):
    from django.contrib.auth import get_user_model

    User = get_user_model()
    user, _ = User.objects.get_or_create(username=username)
    return user
