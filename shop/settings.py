"""Settings for the shop, read from environment variables (docs/settings.md)."""

import os
from collections.abc import Callable
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

BASE_DIR = Path(__file__).resolve().parent.parent


BOOLEANS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(
    ("0", "false", "no", "off"), False
)


def env[T](name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
    """The variable ``name`` parsed, ``default`` when unset or empty."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return parse(value)
    except (KeyError, ValueError) as exc:
        raise ImproperlyConfigured(f"{name} must be {expected}, not {value!r}") from exc


def env_bool(name: str, default: bool) -> bool:
    return env(name, default, lambda v: BOOLEANS[v.strip().lower()], "a boolean (1/0, true/false)")


def env_int(name: str, default: int) -> int:
    return env(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    return env(name, default, float, "a number")


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
    "ninja",
    "django_tasks_db",
    "batching",
    "products",
    "orders",
    "jobs",
    "api",
    "bench",  # benchmark commands only
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
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

# With DEBUG off neither the toolbar's app, its middleware nor its URLs exist.
DEBUG_TOOLBAR = DEBUG and env_bool("DEBUG_TOOLBAR", True)
if DEBUG_TOOLBAR:
    INSTALLED_APPS.append("debug_toolbar")
    # Inside the CSP middleware: the policy names the nonce the toolbar's script gets.
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

    A dead connection is rarely alone (a database restart ends them all), so
    the first one found has the pool check every idle one at once instead of
    a request trying them one by one with backoff.
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
        # Django's native pool (psycopg_pool); CONN_MAX_AGE must stay 0 with it.
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
        # IMMEDIATE: writers queue on the busy timeout at BEGIN instead of failing
        # mid-transaction; WAL lets readers go on while a chunk is written.
        options.setdefault("transaction_mode", "IMMEDIATE")
        options.setdefault("timeout", 30)
        options.setdefault("init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        # A file, not memory: the processes a test starts (job workers) share it.
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

# Served by WhiteNoise from STATIC_ROOT (`collectstatic`); with the manifest on, a
# page cannot render before collectstatic has run (docs/deploy.md).
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

# Security: strict whenever DEBUG is off; each can be relaxed by environment.
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
# Inline <script> and <style> need the request's nonce; Swagger UI's icons are data: images.
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

BULK_CHUNK_SIZE = env_int("BULK_CHUNK_SIZE", 1000)
BULK_VOLUME_CHUNK_SIZE = env_int("BULK_VOLUME_CHUNK_SIZE", 5000)
BULK_CATALOGUE_CHUNK_SIZE = env_int("BULK_CATALOGUE_CHUNK_SIZE", 3000)
BULK_LOCK_TIMEOUT_MS = env_int("BULK_LOCK_TIMEOUT_MS", 50)
BULK_LOG_MAX_ROW_ERRORS = env_int("BULK_LOG_MAX_ROW_ERRORS", 100)
BULK_RETRY_ATTEMPTS = env_int("BULK_RETRY_ATTEMPTS", 4)
BULK_RETRY_BASE_DELAY = env_float("BULK_RETRY_BASE_DELAY", 0.05)
BULK_RETRY_MAX_DELAY = env_float("BULK_RETRY_MAX_DELAY", 2.0)
BULK_STALE_RUN_SECONDS = env_int("BULK_STALE_RUN_SECONDS", 900)
BULK_PG_FAST_PATHS = env_bool("BULK_PG_FAST_PATHS", True)

API_SYNC_MAX_ROWS = env_int("API_SYNC_MAX_ROWS", 5000)
API_MAX_ROWS = env_int("API_MAX_ROWS", 100_000)
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 16 * 1024 * 1024)
# Django refuses larger bodies with a 400 before the API's own 413: never the lower limit.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(API_MAX_BODY_BYTES, 2_621_440)
IDEMPOTENCY_PENDING_SECONDS = env_int("IDEMPOTENCY_PENDING_SECONDS", 600)
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")

# Background jobs: the queue in the database (`manage.py db_worker`), or Celery
# (docs/jobs-celery.md).
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
# Celery (read by jobs/celery.py), for the Celery backend only.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "amqp://guest:guest@127.0.0.1:5672//"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE") or "shop"
# One task at a time: a prefetched partition would wait behind a long one.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Acknowledged at start: the reapers (jobs/tasks.py) take over a killed worker's
# partition, and RabbitMQ's consumer_timeout would cut one held unacknowledged.
CELERY_TASK_ACKS_LATE = False
# Job state lives in the database; a result backend only serves `task.get_result()`.
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or None
CELERY_RESULT_EXTENDED = True
if TASKS_BACKEND == TASKS_BACKEND_CELERY and CELERY_RESULT_BACKEND is None:
    # "get_result() will not work": nothing in the shop calls it.
    SILENCED_SYSTEM_CHECKS = ["django_tasks_celery.W001"]
JOB_PARTITION_ROWS = env_int("JOB_PARTITION_ROWS", 10_000)
JOB_STALE_SECONDS = env_int("JOB_STALE_SECONDS", 300)
JOB_WATCH_SECONDS = env_int("JOB_WATCH_SECONDS", 30)
HISTORY_RETENTION_DAYS = env_int("HISTORY_RETENTION_DAYS", 30)

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
CACHE_TIMEOUT = env_int("CACHE_TIMEOUT", 600)
CACHE_RECOMMENDATIONS = env_int("CACHE_RECOMMENDATIONS", 20)

ADMIN_IMPORT_DIR = Path(os.environ.get("ADMIN_IMPORT_DIR") or BASE_DIR / "var" / "imports")
ADMIN_IMPORT_SYNC_MAX_ROWS = env_int("ADMIN_IMPORT_SYNC_MAX_ROWS", 5000)
ADMIN_IMPORT_MAX_BYTES = env_int("ADMIN_IMPORT_MAX_BYTES", 200 * 1024 * 1024)
ADMIN_IMPORT_MAX_ROWS = env_int("ADMIN_IMPORT_MAX_ROWS", 10_000_000)
ADMIN_IMPORT_PREVIEW_ROWS = env_int("ADMIN_IMPORT_PREVIEW_ROWS", 10_000)
IMPORT_MAX_DECOMPRESSED_BYTES = env_int("IMPORT_MAX_DECOMPRESSED_BYTES", 512 * 1024 * 1024)
IMPORT_MAX_LINE_LENGTH = env_int("IMPORT_MAX_LINE_LENGTH", 1024 * 1024)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}
