"""Configuration read from the environment (see DESIGN.md, "Configuration")."""
from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

log = logging.getLogger("txmon.config")

ROOT = Path(__file__).resolve().parent.parent
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789"
DEV_SERVICE_KEY = "dev-service-key"
TEST_JWT_SECRET = "test-jwt-secret-0123456789abcdef0123"
TEST_SERVICE_KEY = "test-service-key"
ENVIRONMENTS = ("development", "test", "production")
COMMITTED_SECRETS = {DEV_JWT_SECRET, DEV_SERVICE_KEY, TEST_JWT_SECRET, TEST_SERVICE_KEY}
MIN_JWT_SECRET_BYTES = 32


class ConfigError(RuntimeError):
    """Start-up configuration is unusable (e.g. a missing secret in production)."""


def normalize_database_url(url: str) -> str:
    """Accept postgres://, postgresql:// and postgresql+psycopg:// and use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


# Loopback and private ranges: a scraper on the host or the deployment's own network.
DEFAULT_METRICS_ALLOW = ("127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,"
                         "fc00::/7")


def _networks_env(name: str, default: str) -> tuple:
    raw = os.environ.get(name) or default
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} must be a comma-separated list of networks (CIDR), "
                          f"got {raw!r}") from exc


class Config:
    """Settings for a running service; every value comes from the environment."""

    DEFAULT_ENV = "development"

    def __init__(self) -> None:
        env = os.environ
        self.TXMON_ENV = env.get("TXMON_ENV") or self.DEFAULT_ENV
        if self.TXMON_ENV not in ENVIRONMENTS:
            raise ConfigError(f"TXMON_ENV must be one of {', '.join(ENVIRONMENTS)}, "
                              f"got {self.TXMON_ENV!r}; refusing to start")
        self.SQLALCHEMY_DATABASE_URI = normalize_database_url(
            env.get("DATABASE_URL") or f"sqlite:///{ROOT / 'var' / 'txmon.db'}"
        )
        self.REDIS_URL = env.get("REDIS_URL", "redis://localhost:6379/0")
        self.SMTP_URL = env.get("SMTP_URL") or None
        self.MAIL_DIR = env.get("TXMON_MAIL_DIR", str(ROOT / "var" / "mail"))
        self.TXMON_ADMIN_EMAIL = env.get("TXMON_ADMIN_EMAIL", "admin@localhost")
        self.TXMON_PUBLIC_URL = env.get("TXMON_PUBLIC_URL", "http://127.0.0.1:8000")
        self.ALERT_LARGE_DEBIT_CENTS = _int_env("TXMON_ALERT_LARGE_DEBIT_CENTS", 5000)
        self.ALERT_RAPID_COUNT = _int_env("TXMON_ALERT_RAPID_COUNT", 10)
        self.ALERT_RAPID_WINDOW_S = _int_env("TXMON_ALERT_RAPID_WINDOW_S", 300)
        self.DEFAULT_LOW_BALANCE_CENTS = _int_env("TXMON_DEFAULT_LOW_BALANCE_CENTS", 100)
        self.CELERY_VISIBILITY_TIMEOUT_S = _int_env("CELERY_VISIBILITY_TIMEOUT_S", 86400 + 3600)
        self.CELERY_BROKER_URL = env.get("CELERY_BROKER_URL") or None
        self.CELERY_PREFETCH = _int_env("CELERY_PREFETCH", 4)
        # Completed outbox rows are deleted this many days after completion (0: kept).
        self.OUTBOX_KEEP_DAYS = _int_env("TXMON_OUTBOX_KEEP_DAYS", 7)
        self.WS_QUEUE_SIZE = _int_env("TXMON_WS_QUEUE_SIZE", 256)
        self.WS_MAX_PER_USER = _int_env("TXMON_WS_MAX_PER_USER", 5)  # open sockets per caller
        # Plain HTTP requests running at once per API process; websockets are not counted
        # (api_service/admission.py). 0: no limit.
        self.HTTP_CONCURRENCY = _int_env("TXMON_HTTP_CONCURRENCY", 2)
        self.RATELIMIT_USER = env.get("TXMON_RATELIMIT_USER", "600/minute")
        self.RATELIMIT_STORAGE_URI = env.get("TXMON_RATELIMIT_STORAGE", self.REDIS_URL)
        self.RATELIMIT_IN_MEMORY_FALLBACK_ENABLED = True
        self.RATELIMIT_HEADERS_ENABLED = True
        # The API's statements are cancelled past this (a request then gets 503); 0: never.
        self.DB_STATEMENT_TIMEOUT_MS = _int_env("TXMON_DB_STATEMENT_TIMEOUT_MS", 5000)
        self.SQLALCHEMY_ENGINE_OPTIONS = engine_options(
            self.SQLALCHEMY_DATABASE_URI, statement_timeout_ms=self.DB_STATEMENT_TIMEOUT_MS)
        self.METRICS_ALLOW = _networks_env("TXMON_METRICS_ALLOW", DEFAULT_METRICS_ALLOW)
        keys = env.get("TXMON_SERVICE_KEYS", "")
        self.SERVICE_KEYS = [k.strip() for k in keys.split(",") if k.strip()]
        self.JWT_SECRET = env.get("TXMON_JWT_SECRET", "")
        self.JWT_MAX_TTL_S = _int_env("TXMON_JWT_MAX_TTL_S", 86400)
        self.JWT_ISSUER = env.get("TXMON_JWT_ISSUER") or None  # set: tokens must carry it
        self.JWT_AUDIENCE = env.get("TXMON_JWT_AUDIENCE") or None
        # Failed authentications (bad JWT, wrong X-API-Key) per client address.
        self.RATELIMIT_AUTH_FAILURES = env.get("TXMON_RATELIMIT_AUTH_FAILURES", "20/minute")
        self._apply_secret_defaults()

    def _apply_secret_defaults(self) -> None:
        missing = [name for name, value in (("TXMON_SERVICE_KEYS", self.SERVICE_KEYS),
                                            ("TXMON_JWT_SECRET", self.JWT_SECRET)) if not value]
        if self.TXMON_ENV == "production":
            self._check_production(missing)
            return
        if not missing:
            return
        if self.TXMON_ENV == "development":
            log.warning("Using development defaults for %s (never do this in production)",
                        ", ".join(missing))
        if not self.SERVICE_KEYS:
            self.SERVICE_KEYS = [DEV_SERVICE_KEY]
        if not self.JWT_SECRET:
            self.JWT_SECRET = DEV_JWT_SECRET

    def _check_production(self, missing: list[str]) -> None:
        """Every problem at once, so an operator fixes the environment in one go."""
        problems = [f"{name} is not set" for name in missing]
        if self.JWT_SECRET in COMMITTED_SECRETS:
            problems.append("TXMON_JWT_SECRET is a committed development value")
        elif self.JWT_SECRET and len(self.JWT_SECRET.encode()) < MIN_JWT_SECRET_BYTES:
            problems.append(f"TXMON_JWT_SECRET is under {MIN_JWT_SECRET_BYTES} bytes")
        if any(k in COMMITTED_SECRETS for k in self.SERVICE_KEYS):
            problems.append("TXMON_SERVICE_KEYS holds a committed development value")
        if not self.SMTP_URL:
            problems.append("SMTP_URL is not set (emails would be written to files)")
        if problems:
            raise ConfigError("TXMON_ENV=production: " + "; ".join(problems)
                              + "; refusing to start")

    def as_dict(self) -> dict:
        """Upper-case settings, ready for ``app.config.update``."""
        return {k: v for k, v in vars(self).items() if k.isupper()}


def engine_options(url: str, *, statement_timeout_ms: int = 0) -> dict:
    """Pool settings per database: a real pool on Postgres, a long busy wait on SQLite.

    ``statement_timeout_ms`` (the API's): Postgres cancels a statement that runs, or waits
    for a lock, longer than that. The outbox's statements plan every run (shared/outbox.py
    PLAN_EVERY_RUN).
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    # Per process. Under gevent the pool is what bounds concurrent sessions: requests wait
    # for a connection (pool_timeout) instead of pushing Postgres past max_connections.
    options = {"pool_size": _int_env("TXMON_DB_POOL_SIZE", 8),
               "max_overflow": _int_env("TXMON_DB_MAX_OVERFLOW", 4), "pool_timeout": 20,
               "pool_pre_ping": False, "pool_recycle": 1800}
    settings = []
    if statement_timeout_ms > 0:
        settings.append(f"-c statement_timeout={statement_timeout_ms}")
    if settings:
        options["connect_args"] = {"options": " ".join(settings)}
    return options


class TestConfig(Config):
    """Configuration for the test suite: fixed secrets; rate limits in the test's Redis."""

    DEFAULT_ENV = "test"

    def __init__(self, database_url: str | None = None, redis_url: str | None = None) -> None:
        os.environ.setdefault("TXMON_SERVICE_KEYS", TEST_SERVICE_KEY)
        os.environ.setdefault("TXMON_JWT_SECRET", TEST_JWT_SECRET)
        super().__init__()
        self.TESTING = True
        if database_url:
            self.SQLALCHEMY_DATABASE_URI = normalize_database_url(database_url)
            self.SQLALCHEMY_ENGINE_OPTIONS = engine_options(
                self.SQLALCHEMY_DATABASE_URI, statement_timeout_ms=self.DB_STATEMENT_TIMEOUT_MS)
        if redis_url:
            self.REDIS_URL = self.RATELIMIT_STORAGE_URI = redis_url
        # Admission control on, its limit above the in-process concurrency tests' thread
        # count (16), so every thread's request is in flight at once.
        self.HTTP_CONCURRENCY = 32
        # Many tests fail authentication on purpose; the limit's own tests lower it.
        self.RATELIMIT_AUTH_FAILURES = "100000/minute"
        self.RATELIMIT_USER = "100000/minute"  # a test module's calls share one key
