"""Settings for the shop, read from environment variables.

Defaults are safe for trying the project locally: DEBUG is off, the database is
an SQLite file beside manage.py, and the secret key is a local-only placeholder.
Production sets DATABASE_URL (postgres://...), SECRET_KEY, DEBUG and
ALLOWED_HOSTS; with DEBUG off and a real secret, ``manage.py check --deploy``
passes.
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), not {value!r}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, not {value!r}") from exc


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}") from exc


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY") or "django-insecure-local-only-do-not-deploy"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    # django-ninja serves its interactive docs from its own static files.
    "ninja",
    "django_tasks_db",
    "batching",
    "products",
    "orders",
    "jobs",
    "api",
    # Benchmark commands (bench_live, bench_load); nothing else imports it.
    "bench",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files, answered before sessions, CSRF or auth run (see STORAGES).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "api.middleware.NoStoreMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The debug toolbar exists only when DEBUG is on: with DEBUG off neither the
# app, its middleware nor its URLs are loaded.
DEBUG_TOOLBAR = DEBUG and env_bool("DEBUG_TOOLBAR", True)
if DEBUG_TOOLBAR:
    INSTALLED_APPS.append("debug_toolbar")
    # Inside the CSP middleware, so that the policy it sends names the nonce
    # the toolbar's script and style are given.
    csp = MIDDLEWARE.index("django.middleware.csp.ContentSecurityPolicyMiddleware")
    MIDDLEWARE.insert(csp + 1, "debug_toolbar.middleware.DebugToolbarMiddleware")
    INTERNAL_IPS = ["127.0.0.1", "::1"]

ROOT_URLCONF = "shop.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                # csp_nonce, for {% csp_nonce_attr %} on inline <script> and <style>.
                "django.template.context_processors.csp",
            ],
        },
    },
]

WSGI_APPLICATION = "shop.wsgi.application"
ASGI_APPLICATION = "shop.asgi.application"


def check_pooled_connection(connection) -> None:
    """The pool's ``check``: a connection is tried (one empty query) before it is lent.

    A dead connection is rarely alone: a database restart or failover ends
    every backend. psycopg_pool would try the idle ones one at a time, waiting
    1, 2, 4... seconds between tries, and a request would time out behind a
    few of them; so the first dead one has the pool check every idle one at
    once (``ConnectionPool.check``), and the request waits for a new one only.
    """
    from psycopg_pool import ConnectionPool

    try:
        ConnectionPool.check_connection(connection)
    except Exception:
        connection._pool.check()  # the pool lending it (psycopg sets it, as Django reads it)
        raise


def database_from_env() -> dj_database_url.DBConfig:
    """The default database: DATABASE_URL, or an SQLite file beside manage.py."""
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
    config = dj_database_url.parse(url)
    options = config.setdefault("OPTIONS", {})
    if config["ENGINE"] == "django.db.backends.postgresql":
        # Django's native pool (psycopg_pool). CONN_MAX_AGE must stay 0 with it.
        # ``check``: after a database restart or failover the pool's connections
        # are all dead; unchecked, each would fail one request before being dropped.
        options.setdefault(
            "pool",
            {
                "min_size": env_int("DB_POOL_MIN_SIZE", 2),
                "max_size": env_int("DB_POOL_MAX_SIZE", 10),
                "timeout": env_int("DB_POOL_TIMEOUT", 10),
                "check": check_pooled_connection,
            },
        )
        config["CONN_MAX_AGE"] = 0
    elif config["ENGINE"] == "django.db.backends.sqlite3":
        # IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue
        # on the busy timeout instead of failing mid-transaction; WAL lets
        # readers go on while a chunk is written.
        options.setdefault("transaction_mode", "IMMEDIATE")
        options.setdefault("timeout", 30)
        options.setdefault(
            "init_command",
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        )
        # The test database is a file too, not memory: the processes a test
        # starts (job workers, a killed import) share it, as they share a
        # PostgreSQL test database.
        config.setdefault("TEST", {}).setdefault("NAME", str(BASE_DIR / "test-db.sqlite3"))
    config.setdefault("TEST", {})
    return config


DATABASES = {"default": database_from_env()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Static files (the admin's, the reports', Swagger UI's from ninja) are served by
# WhiteNoise from STATIC_ROOT, which `manage.py collectstatic` fills (`make serve`
# runs it). With DEBUG off they are stored compressed (gzip, and Brotli when the
# brotli package is installed) under content-hashed names, cached for a year;
# the names come from the manifest collectstatic writes, so a page cannot be
# rendered before collectstatic has run. With DEBUG on (and in the tests,
# tests/conftest.py) they are served as they are, found in the apps at each
# request, without collectstatic.
STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT") or BASE_DIR / "staticfiles")
STATIC_MANIFEST = env_bool("STATIC_MANIFEST", not DEBUG)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if STATIC_MANIFEST
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# Security: strict by default whenever DEBUG is off; each can be relaxed by
# environment (for example behind a proxy that terminates TLS elsewhere).
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("SECURE_PROXY_SSL_HEADER", False) else None
)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy on every page: scripts, styles, images and requests
# from the shop itself only; an inline <script> or <style> runs only with the
# request's nonce ({% csp_nonce_attr %}), and inline style attributes not at
# all. Swagger UI's icons are data: images.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF, CSP.NONCE],
    "style-src": [CSP.SELF, CSP.NONCE],
    "img-src": [CSP.SELF, "data:"],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}

# Bulk operations. Every service method's chunk is BULK_CHUNK_SIZE rows (an
# order counts its lines) unless the caller passes chunk_size.
BULK_CHUNK_SIZE = env_int("BULK_CHUNK_SIZE", 1000)
# The entry points that move large volumes (the import commands, background
# job partitions) default to chunks of this many rows instead: at 5,000 a
# chunk's fixed cost is small beside its rows, and the live shop still waits
# at most tens of milliseconds for one (BENCHMARKS.md, bench_live). The
# catalogue import's upsert locks the products it updates as it goes, so its
# chunks are smaller: at 5,000 checkouts waited up to 58 ms (p99) for them.
BULK_VOLUME_CHUNK_SIZE = env_int("BULK_VOLUME_CHUNK_SIZE", 5000)
BULK_CATALOGUE_CHUNK_SIZE = env_int("BULK_CATALOGUE_CHUNK_SIZE", 3000)
# PostgreSQL: how long a chunk's statement waits for a row lock held by a live
# transaction before it gives up and the chunk is retried with backoff.
BULK_LOCK_TIMEOUT_MS = env_int("BULK_LOCK_TIMEOUT_MS", 50)
# How many per-row errors a BatchProcessingLog row keeps (the result keeps all).
BULK_LOG_MAX_ROW_ERRORS = env_int("BULK_LOG_MAX_ROW_ERRORS", 100)
# Transient failures (deadlock, serialization failure, lost connection) are
# retried per chunk this many times in all, with exponential backoff and jitter
# starting at BULK_RETRY_BASE_DELAY seconds and capped at BULK_RETRY_MAX_DELAY.
BULK_RETRY_ATTEMPTS = env_int("BULK_RETRY_ATTEMPTS", 4)
BULK_RETRY_BASE_DELAY = env_float("BULK_RETRY_BASE_DELAY", 0.05)
BULK_RETRY_MAX_DELAY = env_float("BULK_RETRY_MAX_DELAY", 2.0)
# A running run whose heartbeat is older than this is shown as interrupted.
BULK_STALE_RUN_SECONDS = env_int("BULK_STALE_RUN_SECONDS", 900)
# PostgreSQL fast paths (COPY, array upserts and updates, guarded stock); off
# runs the portable path every database shares.
BULK_PG_FAST_PATHS = env_bool("BULK_PG_FAST_PATHS", True)

# JSON API (/api/). Batches of up to API_SYNC_MAX_ROWS rows run during the
# request; larger ones (up to API_MAX_ROWS) become background jobs.
API_SYNC_MAX_ROWS = env_int("API_SYNC_MAX_ROWS", 5000)
API_MAX_ROWS = env_int("API_MAX_ROWS", 100_000)
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 16 * 1024 * 1024)
# Django refuses bodies above this before any view runs (as a 400); the API
# answers 413 by its own limit, so Django's must not be the lower one.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(API_MAX_BODY_BYTES, 2_621_440)
# An Idempotency-Key whose request has had no answer for this long is taken
# to belong to a dead process, and the key is free again.
IDEMPOTENCY_PENDING_SECONDS = env_int("IDEMPOTENCY_PENDING_SECONDS", 600)
# /metrics is open unless this is set; then it needs "Authorization: Bearer <token>".
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")

# Background jobs (django.tasks). The embedded default keeps the queue in the
# database and needs no extra server: run `manage.py db_worker` (any number, on
# any machine that reaches the database). TASKS_BACKEND=django_tasks_celery.CeleryBackend
# sends the same tasks to Celery instead (docs/jobs-celery.md): workers are
# `celery -A jobs.celery worker`, the broker is CELERY_BROKER_URL.
TASKS_BACKEND = os.environ.get("TASKS_BACKEND") or "django_tasks_db.DatabaseBackend"
TASKS_BACKEND_CELERY = "django_tasks_celery.CeleryBackend"
TASKS = {
    "default": {
        "BACKEND": TASKS_BACKEND,
        "QUEUES": ["default"],
        "OPTIONS": {"CELERY_APP": "jobs.celery.app"}
        if TASKS_BACKEND == TASKS_BACKEND_CELERY
        else {},
    }
}
# Celery, read by jobs/celery.py (the CELERY_ namespace); used by the Celery backend only.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "amqp://guest:guest@127.0.0.1:5672//"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The queue that Django's "default" task queue maps to: give each deployment its own.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE") or "shop"
# A worker process reserves one task at a time: a partition runs for long, and a
# prefetched one would wait behind it while another worker idles.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Acknowledged when a task starts (Celery's default): take-over of a killed
# worker's partition is the reapers' work (jobs/tasks.py), not redelivery, and
# RabbitMQ's consumer_timeout would cut a long partition held unacknowledged.
CELERY_TASK_ACKS_LATE = False
# Job state lives in the database; a result backend only serves
# `task.get_result()` (with the task's name and args: RESULT_EXTENDED).
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or None
CELERY_RESULT_EXTENDED = True
if TASKS_BACKEND == TASKS_BACKEND_CELERY and CELERY_RESULT_BACKEND is None:
    # "get_result() will not work": nothing in the shop calls it.
    SILENCED_SYSTEM_CHECKS = ["django_tasks_celery.W001"]
# Rows per job partition: each partition is one resumable run on one worker.
JOB_PARTITION_ROWS = env_int("JOB_PARTITION_ROWS", 10_000)
# A running partition whose worker is silent this long (no chunk committed) is
# taken over by another worker; /health fails when queued work has waited this
# long with no worker showing life. A dead worker on the same host is seen at once.
JOB_STALE_SECONDS = env_int("JOB_STALE_SECONDS", 300)
# How often each unfinished job's watchdog task looks for stale partitions.
JOB_WATCH_SECONDS = env_int("JOB_WATCH_SECONDS", 30)
# `manage.py purge_history` deletes finished jobs, batch logs and task results
# older than this many days by default (docs/operations-history.md).
HISTORY_RETENTION_DAYS = env_int("HISTORY_RETENTION_DAYS", 30)

# Cache: Redis when REDIS_URL is set, process-local memory otherwise.
REDIS_URL = os.environ.get("REDIS_URL", "")
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
        if REDIS_URL
        else {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "shop",
            # The default (300) would cull a warmed catalogue as it is written.
            "OPTIONS": {"MAX_ENTRIES": env_int("CACHE_MAX_ENTRIES", 100_000)},
        }
    )
}
# Product cards and top recommendations (products/cache.py): writes drop what
# they change; the timeout only bounds a read racing a write.
CACHE_TIMEOUT = env_int("CACHE_TIMEOUT", 600)
# How many recommendations are cached per user (the largest `limit` served).
CACHE_RECOMMENDATIONS = env_int("CACHE_RECOMMENDATIONS", 20)

# Admin CSV/JSONL imports: each upload's sidecar (owner, job, preview,
# result) lives here, its rows in a held job's staged input; up to
# ADMIN_IMPORT_SYNC_MAX_ROWS rows run in the request, more in a job.
ADMIN_IMPORT_DIR = Path(os.environ.get("ADMIN_IMPORT_DIR") or BASE_DIR / "var" / "imports")
ADMIN_IMPORT_SYNC_MAX_ROWS = env_int("ADMIN_IMPORT_SYNC_MAX_ROWS", 5000)
ADMIN_IMPORT_MAX_BYTES = env_int("ADMIN_IMPORT_MAX_BYTES", 200 * 1024 * 1024)
# A ceiling on an admin upload's rows, beside its bytes: the upload streams
# its rows into a job's staged input, so the web process stays small at any
# size; this bounds how much one upload may ask of the database and workers.
ADMIN_IMPORT_MAX_ROWS = env_int("ADMIN_IMPORT_MAX_ROWS", 10_000_000)
# The preview's dry run checks the first rows only (every row is staged, and
# the confirm imports them all).
ADMIN_IMPORT_PREVIEW_ROWS = env_int("ADMIN_IMPORT_PREVIEW_ROWS", 10_000)
# Every import file reader (admin, import commands): a gzipped file that
# inflates to more is refused; a line (a CSV record) longer than this many
# characters, its line break included, is a bad line, read in pieces and dropped.
IMPORT_MAX_DECOMPRESSED_BYTES = env_int("IMPORT_MAX_DECOMPRESSED_BYTES", 512 * 1024 * 1024)
IMPORT_MAX_LINE_LENGTH = env_int("IMPORT_MAX_LINE_LENGTH", 1024 * 1024)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}
