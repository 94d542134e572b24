"""Configuration comes from the environment, with defaults that run the embedded stack."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def effective(expr: str, **env) -> str:
    """Evaluate a settings expression in a fresh interpreter with `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    code = f"import json, mixtralweb.settings as s; print(json.dumps([{expr}]))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_the_default_database_is_sqlite_in_var():
    engine, name = effective("s.DATABASES['default']['ENGINE'], s.DATABASES['default']['NAME']")
    assert engine == "django.db.backends.sqlite3"
    assert name == str(ROOT / "var" / "db.sqlite3")


def test_database_url_accepts_postgresql_urls():
    out = effective(
        "s.DATABASES['default']['ENGINE'], s.DATABASES['default']['HOST'], "
        "s.DATABASES['default']['NAME']",
        DATABASE_URL="postgresql://u:p@db.example:5433/work",
    )
    assert out == ["django.db.backends.postgresql", "db.example", "work"]


def test_database_url_accepts_sqlite_paths(tmp_path):
    db = tmp_path / "x.sqlite3"
    out = effective("s.DATABASES['default']['NAME']", DATABASE_URL=f"sqlite:///{db}")
    assert out == [str(db)]


def test_redis_url_feeds_the_broker_and_the_channel_layer():
    out = effective(
        "s.CELERY_BROKER_URL, "
        "[h['address'] for h in s.CHANNEL_LAYERS['default']['CONFIG']['hosts']]",
        REDIS_URL="redis://cache.example:6380/2",
    )
    assert out == ["redis://cache.example:6380/2", ["redis://cache.example:6380/2"]]
