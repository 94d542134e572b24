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


def test_on_sqlite_a_transaction_that_read_first_waits_for_another_writer(tmp_path):
    """Two connections to the embedded database, as the web server and a worker:
    one writes and holds its transaction a moment; the other reads, then writes.
    It waits and succeeds, where a deferred transaction failed at once with
    "database is locked"."""
    script = """
import django, os, threading, time
os.environ["DJANGO_SETTINGS_MODULE"] = "mixtralweb.settings"
django.setup()
from django.db import connection, transaction
with connection.cursor() as c:
    c.execute("CREATE TABLE t (x INTEGER)")
    c.execute("INSERT INTO t VALUES (0)")
began = threading.Event()

def writer():
    with transaction.atomic():
        with connection.cursor() as c:
            c.execute("UPDATE t SET x = x + 1")
        began.set()
        time.sleep(0.5)
    connection.close()

thread = threading.Thread(target=writer)
thread.start()
began.wait()
with transaction.atomic():
    with connection.cursor() as c:
        c.execute("SELECT x FROM t")
        c.execute("UPDATE t SET x = x + 10")
thread.join()
with connection.cursor() as c:
    c.execute("SELECT x FROM t")
    print(c.fetchone()[0])
"""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**clean, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "11"
