"""Settings from the environment, with embedded defaults that live in the instance folder."""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

from flask import Flask

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 5000


class ConfigError(RuntimeError):
    """A setting the app cannot start without; `load_or_exit` shows it as one line."""


def instance_path() -> Path:
    """Where every default file lives; INSTANCE_PATH moves it so copies can run side by side."""
    return Path(os.environ.get("INSTANCE_PATH") or ROOT / "instance").resolve()


def _secret_key(instance: Path, production: bool) -> str | None:
    """SECRET_KEY from the environment; in development, the one generated into the instance
    folder, or None until something first signs with it (`ensure_secret_key`)."""
    key = os.environ.get("SECRET_KEY")
    if key:
        return key
    if production:
        raise ConfigError("SECRET_KEY must be set when EXPORTDESK_ENV=production")
    path = instance / "secret_key"
    return path.read_text().strip() if path.exists() else None


def ensure_secret_key(app: Flask) -> str:
    """The app's key; in development generated once into the instance folder, on first use
    rather than at start-up, so a command that only reads (or fails) leaves no folder behind.
    Processes that race to make it agree: the first file linked into place wins."""
    if not app.config["SECRET_KEY"]:
        path = Path(app.instance_path) / "secret_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            mine = path.with_name(f".secret_key.{os.getpid()}")
            with os.fdopen(os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
                fh.write(secrets.token_hex(32))
            try:
                os.link(mine, path)
            except FileExistsError:
                pass
            finally:
                mine.unlink()
        app.config["SECRET_KEY"] = path.read_text().strip()
    return app.config["SECRET_KEY"]


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return default if raw is None else raw.strip().lower() in ("1", "true", "yes", "on")


def _fault_injection(production: bool) -> str:
    """FAULT_INJECT (tests only: jobs.checkpoints.fault) kills workers on purpose: never in
    production."""
    step = os.environ.get("FAULT_INJECT", "")
    if step and production:
        raise ConfigError("FAULT_INJECT is for tests; unset it when EXPORTDESK_ENV=production")
    return step


def _base_url(production: bool) -> str:
    """BASE_URL, the site address in emailed links; in development, when unset, the address
    `flask dev` serves (PORT), so links work after `PORT=8000 make dev`. Production must say
    it: a guess there would email links nobody can open."""
    url = os.environ.get("BASE_URL", "").strip()
    if url:
        return url.rstrip("/")
    if production:
        raise ConfigError("BASE_URL must be set when EXPORTDESK_ENV=production (the site "
                          "address in emailed links, e.g. https://exports.example.com)")
    return f"http://127.0.0.1:{os.environ.get('PORT') or DEFAULT_PORT}"


def _storage_url() -> str:
    """STORAGE_URL: `s3://bucket/prefix` puts export files in that bucket; unset, EXPORT_DIR."""
    url = os.environ.get("STORAGE_URL", "").strip()
    if url and (not url.startswith("s3://") or not url[5:].split("/")[0]):
        raise ConfigError(f"STORAGE_URL must look like s3://bucket/prefix, not {url!r}")
    return url


MIN_PART_SIZE = 5 * 1024**2  # the smallest part S3 accepts (all but an upload's last)


def _part_size(production: bool) -> int:
    """S3_PART_SIZE: the bytes of each part (and checkpoint) of a bucket's upload. Smaller
    than S3's 5 MiB only outside production (tests, against a server configured for it)."""
    size = int(os.environ.get("S3_PART_SIZE", 16 * 1024**2))
    if size < MIN_PART_SIZE and production:
        raise ConfigError(f"S3_PART_SIZE must be at least {MIN_PART_SIZE} bytes (5 MiB): "
                          "S3 refuses smaller parts")
    return size


def load_or_exit() -> dict:
    """`load`, but a missing or refused setting stops start-up with one line, no traceback."""
    try:
        return load()
    except ConfigError as exc:
        raise SystemExit(f"exportdesk cannot start: {exc}") from None


def load() -> dict:
    """The app's configuration, read from the environment at start-up."""
    instance = instance_path()  # made by the first thing that writes in it, not here
    production = os.environ.get("EXPORTDESK_ENV", "development") == "production"
    return {
        "PRODUCTION": production,
        "SECRET_KEY": _secret_key(instance, production),
        "SQLALCHEMY_DATABASE_URI": os.environ.get("DATABASE_URL")
        or f"sqlite:///{instance / 'exportdesk.db'}",
        "BROKER_URL": os.environ.get("BROKER_URL", ""),
        # What can be exported (docs/datasets.md); the demo's datasets when unset.
        "DATASETS_FILE": os.environ.get("DATASETS_FILE", ""),
        # The team's database that exports read (read-only); the app's own when unset.
        "SOURCE_DATABASE_URL": os.environ.get("SOURCE_DATABASE_URL", ""),
        "SOURCE_STATEMENT_TIMEOUT": _seconds("SOURCE_STATEMENT_TIMEOUT", 300),
        # The form's row estimate gives up after this (a page waits for it).
        "ROW_ESTIMATE_TIMEOUT": _seconds("ROW_ESTIMATE_TIMEOUT", 2),
        "EXPORT_DIR": os.environ.get("EXPORT_DIR") or str(instance / "exports"),
        "STORAGE_URL": _storage_url(),
        # An S3-compatible server's address (MinIO, Ceph, R2, Garage...); unset: AWS S3.
        # Region and credentials: the standard AWS variables (docs/configuration.md).
        "S3_ENDPOINT_URL": os.environ.get("S3_ENDPOINT_URL", "").strip(),
        "S3_PART_SIZE": _part_size(production),
        # Downloads from a bucket redirect to a presigned address valid this long; off, the
        # app streams the file (a bucket the browsers cannot reach).
        "DOWNLOAD_REDIRECT": _flag("DOWNLOAD_REDIRECT", True),
        "DOWNLOAD_URL_TTL": timedelta(seconds=_seconds("DOWNLOAD_URL_TTL", 300)),
        "EXPORT_BATCH_ROWS": int(os.environ.get("EXPORT_BATCH_ROWS", 10_000)),
        "CHECKPOINT_INTERVAL": _seconds("CHECKPOINT_INTERVAL", 0.5),
        # An export still running this long has its rows counted, for its progress bar.
        "COUNT_AFTER": _seconds("COUNT_AFTER", 1.0),
        # Start csv and csv.gz files with a UTF-8 byte order mark, so Excel reads them as UTF-8.
        "CSV_BOM": _flag("CSV_BOM", False),
        "EXPORTS_RUNNING_PER_USER": int(os.environ.get("EXPORTS_RUNNING_PER_USER", 1)),
        "EXPORTS_QUEUED_PER_USER": int(os.environ.get("EXPORTS_QUEUED_PER_USER", 5)),
        "TASK_MODULES": [m for m in os.environ.get("TASK_MODULES", "").split(",") if m],
        # A running job's claim lapses unless renewed (at every checkpoint) within JOB_LEASE.
        "JOB_LEASE": _seconds("JOB_LEASE", 60),
        # The reconciler sends a queued job the lane never got once it is this old.
        "RECONCILE_GRACE": _seconds("RECONCILE_GRACE", 10),
        "IDEMPOTENCY_TTL": timedelta(hours=24),
        # The admin lanes page flags the critical lane when its oldest task waits longer.
        "CRITICAL_SLA_SECONDS": _seconds("CRITICAL_SLA_SECONDS", 5),
        "SMTP_URL": os.environ.get("SMTP_URL", ""),
        "MAIL_FROM": os.environ.get("MAIL_FROM", "exportdesk <exportdesk@localhost>"),
        "BASE_URL": _base_url(production),
        "DOWNLOAD_LINK_TTL": timedelta(seconds=_seconds("DOWNLOAD_LINK_TTL", 7 * 86400)),
        "DOWNLOAD_LINK_LOGIN": _flag("DOWNLOAD_LINK_LOGIN", False),
        "EXPORT_FAILURE_EMAIL": _flag("EXPORT_FAILURE_EMAIL", True),
        # A schedule whose runs failed this many times in a row pauses itself and emails its
        # owner (docs/schedules.md); 0: never.
        "SCHEDULE_FAILURE_LIMIT": int(os.environ.get("SCHEDULE_FAILURE_LIMIT", 3)),
        # Webhooks (docs/webhooks.md): seconds an endpoint has to answer; whether endpoints may
        # be private, loopback or link-local addresses (off: a webhook cannot probe the
        # internal network); a factor on the retry delays (tests shrink them).
        "WEBHOOK_TIMEOUT": _seconds("WEBHOOK_TIMEOUT", 5),
        "WEBHOOK_ALLOW_PRIVATE": _flag("WEBHOOK_ALLOW_PRIVATE", False),
        "WEBHOOK_RETRY_SCALE": _seconds("WEBHOOK_RETRY_SCALE", 1.0),
        "PASSWORD_RESET_TTL": timedelta(seconds=_seconds("PASSWORD_RESET_TTL", 3600)),
        "INVITATION_TTL": timedelta(seconds=_seconds("INVITATION_TTL", 7 * 86400)),
        # Failed logins allowed per account (email as typed) and per client address within
        # the window; past that, even the right password waits (docs/people.md). 0: no limit.
        "LOGIN_FAILURE_LIMIT": int(os.environ.get("LOGIN_FAILURE_LIMIT", 10)),
        "LOGIN_FAILURE_WINDOW": timedelta(seconds=_seconds("LOGIN_FAILURE_WINDOW", 900)),
        # How many reverse proxies stand before the app: their X-Forwarded-For (client address)
        # and X-Forwarded-Proto are believed that many hops deep; 0 believes none.
        "PROXY_HOPS": int(os.environ.get("PROXY_HOPS", 0)),
        # A login lasts at most this long, however active; then log in again.
        "SESSION_MAX_AGE": timedelta(seconds=_seconds("SESSION_MAX_AGE", 14 * 86400)),
        "EXPORT_RETENTION": timedelta(seconds=_seconds("EXPORT_RETENTION", 7 * 86400)),
        # Retention deletes a file or part (a bucket's multipart upload) no job needs once it
        # is this old: younger, it may belong to a transaction still in flight.
        "ORPHAN_GRACE": _seconds("ORPHAN_GRACE", 3600),
        # A failed attempt keeps its part to resume from only while parts hold at most this.
        "EXPORT_PARTS_BUDGET": int(os.environ.get("EXPORT_PARTS_BUDGET", 2 * 1024**3)),
        # The lanes page warns when the export folder's disk has less free space than this.
        "DISK_FREE_WARNING": int(os.environ.get("DISK_FREE_WARNING", 1024**3)),
        "FAULT_INJECT": _fault_injection(production),
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": production,
        "WTF_CSRF_CHECK_DEFAULT": False,  # checked in one hook that knows about API tokens
        "WTF_CSRF_TIME_LIMIT": None,
    }
