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


# Runs settings with no SECRET_KEY and a umask that hides nothing; an audit hook
# looks at the key file at every audited step (every open, every chmod...), so a
# moment where the key exists with a wider mode is seen.
KEY_FILE_WATCH = """
import os, sys, json, stat
os.umask(0)
key = os.path.join(os.environ["VAR_DIR"], "secret_key")
modes = []
def watch(event, args):
    try:
        modes.append(stat.S_IMODE(os.stat(key).st_mode))
    except OSError:
        pass
sys.addaudithook(watch)
import mixtralweb.settings as s
print(json.dumps([sorted(set(modes)), len(s.SECRET_KEY), os.listdir(os.environ["VAR_DIR"])]))
"""


def test_the_generated_secret_key_file_is_never_readable_by_others(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    run = subprocess.run(
        [sys.executable, "-c", KEY_FILE_WATCH],
        cwd=ROOT,
        env={**clean, "VAR_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    modes, key_length, names = json.loads(run.stdout)
    assert modes == [0o600]
    assert key_length >= 50
    assert not [name for name in names if name.startswith("secret_key.")]
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    # A second start reads the same key.
    again = effective("s.SECRET_KEY", VAR_DIR=str(tmp_path), SECRET_KEY="")
    assert again == [(tmp_path / "secret_key").read_text().strip()]


def test_email_url_configures_djangos_email_backend_and_turns_alert_email_on():
    out = effective(
        "s.EMAIL_BACKEND, s.EMAIL_HOST, s.EMAIL_PORT, s.EMAIL_HOST_USER, s.EMAIL_USE_TLS, "
        "s.ALERT_EMAIL, s.ALERT_EMAILS",
        EMAIL_URL="smtp://alerts:secret@mail.example.com:587/?tls=True",
        ALERT_EMAILS="ops@example.com, oncall@example.com",
    )
    assert out == [
        "django.core.mail.backends.smtp.EmailBackend",
        "mail.example.com",
        587,
        "alerts",
        True,
        True,
        ["ops@example.com", "oncall@example.com"],
    ]
    # Nothing configured: no alert e-mail to a mail server that is not there.
    assert effective("s.ALERT_EMAIL, s.EMAIL_HOST") == [False, "localhost"]
