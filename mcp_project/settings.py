"""Settings for the agent hub: one env-driven file that fails loudly on bad values."""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from mcp_project import logging as hub_logging

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("HUB_VAR_DIR", BASE_DIR / "var"))

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    return _env_number(name, default, minimum, int, "an integer")


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    return _env_number(name, default, minimum, float, "a number")


def _env_number(name: str, default, minimum, parse, kind: str):
    """The environment's `name` read by `parse` (int, float), at least `minimum`; `kind` names
    what it must be in the error."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {kind}, got {raw!r}") from None
    if not value >= minimum:  # NaN too
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


DEFAULT_SECRET_KEY = "insecure-development-key-change-me"  # noqa: S105  (refused in production)
SECRET_KEY = env_str("DJANGO_SECRET_KEY", DEFAULT_SECRET_KEY)
DEBUG = env_bool("DJANGO_DEBUG", True)
# Production mode turns the deploy checks in agents/checks.py into errors.
HUB_PRODUCTION = env_bool("HUB_PRODUCTION", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "drf_spectacular",
    "channels",
    "agents",
    "messaging",
    "contexts",
    "security",
    "axes",
    "django_prometheus",
    "ops",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "ops.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # The client address of each request, for the audit log.
    "security.middleware.RequestSourceMiddleware",
    # Serves collected static files (the admin's) from the process itself, so a container needs
    # no web server beside it.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "mcp_project.urls"
ASGI_APPLICATION = "mcp_project.asgi.application"
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
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# SQLite (WAL, immediate transactions) is the embedded default; DATABASE_URL selects PostgreSQL.
DATABASE_URL = env_str("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL,
            # Bounded so long-lived consumers cannot pile up idle connections (PITFALLS P10).
            conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
            conn_health_checks=True,
        )
    }
    # The planner's cost of reading a page out of order, for the hub's sessions. At PostgreSQL's
    # default, 4 (a spinning disk), discovery by capability read every agent, a sequential scan
    # hashed against the capability's holders, instead of looking each holder up by key: over
    # 10,000 agents 2.4-9.9 ms of the database's time for the count and again for the page,
    # against 0.5 ms (EXPLAIN ANALYZE). 1.1 is the usual value for SSDs and for tables held in
    # memory; 0 leaves the server's own setting (and sends no `options`, which PgBouncer refuses
    # unless told to ignore it).
    RANDOM_PAGE_COST = env_float("DATABASE_RANDOM_PAGE_COST", 1.1)
    if RANDOM_PAGE_COST:
        _options = DATABASES["default"].setdefault("OPTIONS", {})
        _options["options"] = (
            f"{_options.get('options', '')} -c random_page_cost={RANDOM_PAGE_COST}".strip()
        )
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(VAR_DIR / "hub.sqlite3")),
            "OPTIONS": {
                # IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on the busy
                # timeout instead of failing with "database is locked" on lock upgrade.
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                # WAL: readers never wait for the writer. NORMAL: a commit is durable against
                # a crash of the process, not of the machine (no fsync per commit). A longer WAL
                # between checkpoints helped the message writer; its own connection also gets a
                # larger page cache and memory-mapped reads (messaging/wal.py).
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                    " PRAGMA wal_autocheckpoint=4000; PRAGMA temp_store=MEMORY;"
                ),
            },
            # Reopening a SQLite file (and re-running the PRAGMAs) on every database call of a
            # consumer costs more than the query itself; keep connections, like PostgreSQL does.
            "CONN_MAX_AGE": env_int("DATABASE_CONN_MAX_AGE", 600),
            "CONN_HEALTH_CHECKS": True,
            "TEST": {"NAME": env_str("SQLITE_TEST_PATH", str(VAR_DIR / "test-hub.sqlite3"))},
        }
    }
# The same backends wrapped by django-prometheus, which counts queries, errors and latency.
DATABASES["default"]["ENGINE"] = DATABASES["default"]["ENGINE"].replace(
    "django.db.backends.", "django_prometheus.db.backends.", 1
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: channel layer, Celery broker, presence ----------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6390/0")
CHANNEL_LAYER_BACKEND = env_str("HUB_CHANNEL_LAYER", "redis")
if CHANNEL_LAYER_BACKEND == "memory":
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
elif CHANNEL_LAYER_BACKEND == "redis":
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis, with a receive that costs one future per waiting socket.
            "BACKEND": "messaging.layer.ChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        # redis-py 8 reads with a 5 s socket timeout by default, the same as
                        # channels-redis' blocking BZPOPMIN, so an idle receive raised
                        # TimeoutError and closed the socket with 1011 (redis-py#4091,
                        # channels_redis#422). The read timeout must outlast the pop.
                        "socket_timeout": 15,
                        "socket_connect_timeout": 5,
                    }
                ],
                "prefix": env_str("HUB_CHANNEL_PREFIX", "hub"),
                # Bursts to one slow agent must not overflow its channel (PITFALLS P2); the
                # database still holds every message if they do.
                "capacity": env_int("HUB_CHANNEL_CAPACITY", 1000, minimum=10),
                "expiry": 60,
                # Consumers re-join their groups well inside this (PITFALLS P3).
                "group_expiry": env_int("HUB_GROUP_EXPIRY", 86400, minimum=10),
            },
        }
    }
else:
    raise ImproperlyConfigured("HUB_CHANNEL_LAYER must be 'redis' or 'memory'")

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Hub behaviour ----------------------------------------------------------------------------
HUB = {
    # Seconds between signs of life an agent is asked for; silent for three of these = offline.
    "HEARTBEAT_INTERVAL": env_int("HUB_HEARTBEAT_INTERVAL", 30, minimum=1),
    "AUTH_TIMEOUT": env_int("HUB_AUTH_TIMEOUT", 10, minimum=1),
    # Largest JSON payload (bytes, serialized) of a message or context entry.
    "MAX_PAYLOAD_BYTES": env_int("HUB_MAX_PAYLOAD_BYTES", 256 * 1024, minimum=1024),
    # Largest WebSocket frame the app parses; daphne enforces its own transport limit too.
    "MAX_FRAME_BYTES": env_int("HUB_MAX_FRAME_BYTES", 512 * 1024, minimum=1024),
    "REDELIVERY_DELAY": env_int("HUB_REDELIVERY_DELAY", 30, minimum=1),
    "MAX_DELIVERY_ATTEMPTS": env_int("HUB_MAX_DELIVERY_ATTEMPTS", 5, minimum=1),
    "MESSAGE_RETENTION_DAYS": env_int("HUB_MESSAGE_RETENTION_DAYS", 30, minimum=1),
    "REQUEST_TIMEOUT": env_int("HUB_REQUEST_TIMEOUT", 30, minimum=1),
    "MAX_REQUEST_TIMEOUT": env_int("HUB_MAX_REQUEST_TIMEOUT", 300, minimum=1),
    "ALLOWED_ORIGINS": env_list("HUB_ALLOWED_ORIGINS", []),
    # Groups are re-joined this often so channels-redis never expires a live member (PITFALLS P3).
    "GROUP_REFRESH_SECONDS": env_int("HUB_GROUP_REFRESH_SECONDS", 1800, minimum=1),
    "SWEEP_INTERVAL": env_int("HUB_SWEEP_INTERVAL", 15, minimum=1),
    # Name of this server process, recorded on each connection it holds.
    "SERVER_NAME": env_str("HUB_SERVER_NAME", ""),
    # WebSocket frames per second per agent (token bucket, per server process) and its burst.
    "WS_RATE": env_int("HUB_WS_RATE", 500, minimum=1),
    "WS_BURST": env_int("HUB_WS_BURST", 1000, minimum=1),
    # Refused frames in a row after which the socket is closed with 4429.
    "WS_ABUSE_LIMIT": env_int("HUB_WS_ABUSE_LIMIT", 200, minimum=1),
    # Open sockets one agent may hold at once (close 4409 past it).
    "MAX_CONNECTIONS_PER_AGENT": env_int("HUB_MAX_CONNECTIONS_PER_AGENT", 20, minimum=1),
    # Threads an HTTP server process runs requests' synchronous work on, each keeping its
    # database connection between requests (ops/http_threads.py); more requests at once wait.
    "HTTP_THREADS": env_int("HUB_HTTP_THREADS", 4, minimum=1),
    # On SIGTERM, seconds to wait for sockets closed with 1012 to finish before exiting.
    "SHUTDOWN_GRACE_SECONDS": env_int("HUB_SHUTDOWN_GRACE_SECONDS", 10, minimum=0),
    # Shared context (contexts/): seconds an entry lives after each write unless it asks otherwise.
    "CONTEXT_DEFAULT_TTL": env_int("HUB_CONTEXT_DEFAULT_TTL", 3600, minimum=1),
    # Longest ttl_seconds allowed; ttl_seconds null means this maximum. 0: no maximum, and null
    # then means the entry never expires.
    "CONTEXT_MAX_TTL": env_int("HUB_CONTEXT_MAX_TTL", 30 * 86400, minimum=0),
    # Versions of an entry kept readable at contexts/{id}/versions/, the current one included.
    "CONTEXT_HISTORY": env_int("HUB_CONTEXT_HISTORY", 10, minimum=1),
    "CONTEXT_MAX_WATCHES": env_int("HUB_CONTEXT_MAX_WATCHES", 20, minimum=1),
    "CONTEXT_PURGE_BATCH": env_int("HUB_CONTEXT_PURGE_BATCH", 1000, minimum=1),
    "CONTEXT_PURGE_INTERVAL": env_int("HUB_CONTEXT_PURGE_INTERVAL", 60, minimum=1),
    # GET contexts/ counts matches exactly up to this many; beyond it, count_exact is false.
    "CONTEXT_COUNT_CAP": env_int("HUB_CONTEXT_COUNT_CAP", 10000, minimum=1),
}
if HUB["CONTEXT_MAX_TTL"] and HUB["CONTEXT_DEFAULT_TTL"] > HUB["CONTEXT_MAX_TTL"]:
    raise ImproperlyConfigured("HUB_CONTEXT_DEFAULT_TTL must not exceed HUB_CONTEXT_MAX_TTL")
DATA_UPLOAD_MAX_MEMORY_SIZE = HUB["MAX_FRAME_BYTES"]

# Throttle counters. One process needs nothing more than memory; several processes share Redis.
CACHE_URL = env_str("HUB_CACHE_URL", "")
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}
        if CACHE_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# Admin login throttling: lock a username+address pair after repeated failures.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("HUB_ADMIN_LOGIN_FAILURES", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("HUB_ADMIN_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False

# --- REST and tokens --------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["agents.authentication.HubJWTAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # orjson-based: bounded nesting, no lone surrogates or NUL characters (agents/parsers.py).
    "DEFAULT_PARSER_CLASSES": ["agents.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "ops.schema.HubAutoSchema",
    "EXCEPTION_HANDLER": "agents.api.exception_handler",
    "DEFAULT_THROTTLE_RATES": {
        "register": env_str("HUB_THROTTLE_REGISTER", "60/min"),
        "token": env_str("HUB_THROTTLE_TOKEN", "120/min"),
        "send": env_str("HUB_THROTTLE_SEND", "6000/min"),
    },
    "UNAUTHENTICATED_USER": None,
}

SIGNING_KEY = env_str("JWT_SIGNING_KEY", SECRET_KEY)
SIMPLE_JWT = {
    "ALGORITHM": "HS256",
    "SIGNING_KEY": SIGNING_KEY,
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=env_int("JWT_ACCESS_LIFETIME", 900, minimum=5)),
    "REFRESH_TOKEN_LIFETIME": timedelta(
        seconds=env_int("JWT_REFRESH_LIFETIME", 7 * 86400, minimum=60)
    ),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": False,
    "AUTH_HEADER_TYPES": ("Bearer",),
    "USER_ID_FIELD": "id",
    "USER_ID_CLAIM": "user_id",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Agent hub API",
    "DESCRIPTION": "Registry, discovery, messaging and shared context for fleets of agents.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1/",
}

# --- Static files, i18n -----------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Production images collect static files at build time; elsewhere WhiteNoise looks them up per
# request instead of expecting a collected STATIC_ROOT.
WHITENOISE_AUTOREFRESH = not HUB_PRODUCTION
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOGIN_URL = "admin:login"

# --- Operations ---------------------------------------------------------------------------------
# /metrics answers addresses in these networks, or a request with `Authorization: Bearer <token>`;
# with neither set it is open (a system check warns about that in production).
METRICS_ALLOWED_IPS = env_list("HUB_METRICS_ALLOWED_IPS", [])
METRICS_TOKEN = env_str("HUB_METRICS_TOKEN", "")

# JSON lines in production, readable lines in development (mcp_project/logging.py).
LOG_FORMAT = env_str("HUB_LOG_FORMAT", "console" if DEBUG else "json")
LOGGING = hub_logging.config(level=env_str("HUB_LOG_LEVEL", "INFO"), fmt=LOG_FORMAT)
