"""The data model: organisations, users, API tokens, export jobs and their attempts, emails,
schedules, webhooks, the audit log, and the demo tables: what the workers and the web app both
read and write."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

from flask import current_app
from flask_login import UserMixin
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import JSON, ForeignKey, Index, Numeric, String, Text, delete, or_
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates
from werkzeug.security import check_password_hash, generate_password_hash

from jobs import datasets


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


T = TypeVar("T")


def utcnow() -> datetime:
    """Naive UTC, the one time zone every database here stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def write_lock() -> bool:
    """Serialise this transaction with every other writer until it ends; returns whether the
    caller must lock the rows it reads as well (SELECT ... FOR UPDATE).

    SQLite has no row locks: the transaction takes the database's write lock up front (BEGIN
    IMMEDIATE), and no row needs one (False). Other databases (PostgreSQL) lock rows (True).
    Call it before any other write in the transaction.
    """
    session = db.session
    if session.get_bind().dialect.name != "sqlite":
        return True
    if not session.connection().connection.dbapi_connection.in_transaction:
        # After a write, this transaction already holds the lock.
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")
    return False


def locked(model: type[T], ident: int) -> T | None:
    """The row, re-read under a write lock held until the session's transaction ends: its own
    on PostgreSQL (SELECT ... FOR UPDATE), the database's on SQLite (`write_lock`). Call it
    before any other write in the transaction."""
    if write_lock():
        return db.session.get(model, ident, populate_existing=True, with_for_update=True)
    return db.session.get(model, ident, populate_existing=True)


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    ACTIVE = (QUEUED, RUNNING, RETRYING)
    FINISHED = (SUCCEEDED, FAILED, CANCELLED, EXPIRED)


def progress(state: str, rows_done: int, rows_total: int | None) -> float:
    """A job's share done, 0 to 1; also for plain rows, as the admin list reads them."""
    if state == JobState.SUCCEEDED:
        return 1.0
    if not rows_total:
        return 0.0
    return min(rows_done / rows_total, 1.0)


class Organisation(db.Model):
    __tablename__ = "organisations"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    slug: Mapped[str] = mapped_column(String(60), unique=True)
    # The value of a dataset's tenant column on this organisation's rows (its id when unset).
    data_key: Mapped[str | None] = mapped_column(String(200), default=None)

    @property
    def data_key_or_id(self) -> str:
        return self.data_key if self.data_key is not None else str(self.id)


class User(UserMixin, db.Model):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    role: Mapped[str] = mapped_column(String(20), default="user")
    # Set: the account can no longer log in, nor use its session or API tokens; its jobs stay.
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime | None] = mapped_column(default=utcnow)  # NULL: made before
    organisation: Mapped[Organisation] = relationship()

    @validates("email")
    def _lowercase_email(self, _key: str, email: str) -> str:
        """Stored lowercase, so a lookup is an exact match on the unique index."""
        return email.strip().lower()

    @property
    def is_active(self) -> bool:
        """Flask-Login's name for "not disabled": login_user refuses an inactive user."""
        return self.disabled_at is None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_staff(self) -> bool:
        """Admins and viewers: both see the admin console; only admins act in it."""
        return self.role in ("admin", "viewer")

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)


class UserSession(db.Model):
    """A login: the session cookie names it, so logout, a password change or disabling the
    account ends it on the server, whatever copy of the cookie is still around."""

    __tablename__ = "user_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the cookie's id
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
    user: Mapped[User] = relationship()


def prune_sessions(now: datetime) -> int:
    """Delete the sessions that ended or outlived SESSION_MAX_AGE (the housekeeping task does,
    every 10 minutes): none can log anyone in again, and a row is written at every login
    (failed logins prune themselves, webapp.auth). Returns how many went."""
    pruned = db.session.execute(delete(UserSession).where(or_(
        UserSession.ended_at.is_not(None),
        UserSession.created_at < now - current_app.config["SESSION_MAX_AGE"])))
    db.session.commit()
    return pruned.rowcount


class LoginFailure(db.Model):
    """A failed login, kept for the guessing limit (per account and per client address): in
    the database, so every web process counts the same failures."""

    __tablename__ = "login_failures"
    __table_args__ = (
        Index("ix_login_failures_email_at", "email", "at"),
        Index("ix_login_failures_address_at", "address", "at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    email: Mapped[str] = mapped_column(String(254))  # as typed, lowercase: no hint it exists
    address: Mapped[str] = mapped_column(String(64))


class ApiToken(db.Model):
    """A personal API token; only its SHA-256 is stored (random tokens need no salt)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(100), default=None)  # what it is for
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Recorded at most once a minute (webapp.auth), so an API call is not a write each.
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    user: Mapped[User] = relationship()

    @staticmethod
    def hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()


class ExportJob(db.Model):
    """The source of truth for an export: the queue message only carries this row's id."""

    __tablename__ = "export_jobs"
    __table_args__ = (
        Index("ix_export_jobs_user_id_idempotency_key", "user_id", "idempotency_key"),
        # The admin list pages newest first (id descending) under one filter at a time.
        Index("ix_export_jobs_state_id", "state", "id"),
        Index("ix_export_jobs_lane_id", "lane", "id"),
        Index("ix_export_jobs_dataset_id", "dataset", "id"),
        Index("ix_export_jobs_user_id_id", "user_id", "id"),
        Index("ix_export_jobs_created_at", "created_at"),
        # The overview counts what failed or succeeded lately, by when it ended.
        Index("ix_export_jobs_state_finished_at", "state", "finished_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    dataset: Mapped[str] = mapped_column(String(60))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    format: Mapped[str] = mapped_column(String(10), default="csv")
    lane: Mapped[str] = mapped_column(String(20), default="exports")
    state: Mapped[str] = mapped_column(String(20), default=JobState.QUEUED, index=True)
    rows_done: Mapped[int] = mapped_column(default=0)
    rows_total: Mapped[int | None] = mapped_column(default=None)
    bytes: Mapped[int] = mapped_column(default=0)
    file_name: Mapped[str | None] = mapped_column(String(255), default=None)
    # SHA-256 (hex) of the published file's bytes, computed while writing: the download's ETag.
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # SHA-256 of the dataset's definition the rows were written with (jobs.datasets).
    definition: Mapped[str | None] = mapped_column(String(64), default=None)
    checkpoint: Mapped[dict | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Delivery bookkeeping (docs/guarantees.md): when the lane last accepted a message for this
    # job (NULL: the reconciler must send it), who holds the running claim and until when, and
    # the client's Idempotency-Key.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    claimed_by: Mapped[str | None] = mapped_column(String(160), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    # The schedule this job is a run of (jobs.schedules); NULL for an export asked for by hand
    # (or once its schedule is deleted: jobs.schedules.delete unlinks its runs first).
    schedule_id: Mapped[int | None] = mapped_column(ForeignKey("schedules.id"), index=True,
                                                    default=None)
    user: Mapped[User] = relationship()
    organisation: Mapped[Organisation] = relationship()
    attempts: Mapped[list[JobAttempt]] = relationship(
        back_populates="job", order_by="JobAttempt.number", cascade="all, delete-orphan"
    )
    param_values: Mapped[list[JobParamValue]] = relationship(cascade="all, delete-orphan",
                                                             passive_deletes=True)

    @validates("params")
    def _index_param_values(self, _key: str, params: dict) -> dict:
        """Keep job_param_values in step with the parameters, for the admin search."""
        self.param_values = [JobParamValue(value=v) for v in param_search_values(params)]
        return params

    @property
    def finished(self) -> bool:
        return self.state in JobState.FINISHED

    @property
    def progress(self) -> float:
        return progress(self.state, self.rows_done, self.rows_total)

    @property
    def utf8_replaced(self) -> int:
        """Values written with their invalid UTF-8 bytes replaced (docs/data-quality.md)."""
        return (self.checkpoint or {}).get("replaced", 0)

    @property
    def xlsx_truncated(self) -> int:
        """Texts cut to fit an xlsx cell (docs/data-quality.md)."""
        return (self.checkpoint or {}).get("truncated", 0)

    def download_name(self) -> str:
        """What the browser saves the file as, from its dataset's `filename` pattern, e.g.
        transactions-acme-2026-11-22-42.csv. It always holds the job id (`-<id>` is added to
        a pattern without `{job}`), so two exports of one day never overwrite each other in a
        Downloads folder."""
        dataset = datasets.get(self.dataset)
        pattern = dataset.filename if dataset else datasets.DEFAULT_FILENAME
        if "{job}" not in pattern:
            pattern += "-{job}"
        stem = pattern.format(dataset=self.dataset, org=self.organisation.slug,
                              date=self.created_at.date().isoformat(), job=self.id)
        return f"{stem}.{self.format}"


def param_search_values(params: dict) -> set[str]:
    """What the admin search matches a job's parameters by: each value, lowercase."""
    return {str(value).lower() for value in params.values()}


class JobParamValue(db.Model):
    """One parameter value of a job, so searching jobs by a value is an exact match on the
    primary key (value, job_id) instead of a scan of every job's JSON."""

    __tablename__ = "job_param_values"
    value: Mapped[str] = mapped_column(Text, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("export_jobs.id", ondelete="CASCADE"),
                                        primary_key=True)


class JobAttempt(db.Model):
    """One execution of a job by a worker: when, where, and how it ended."""

    __tablename__ = "job_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("export_jobs.id"), index=True)
    number: Mapped[int]
    worker: Mapped[str] = mapped_column(String(120))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    outcome: Mapped[str | None] = mapped_column(String(20), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    traceback: Mapped[str | None] = mapped_column(Text, default=None)  # for admins only
    # What the attempt found and did about it, e.g. a part that failed its check, started over.
    note: Mapped[str | None] = mapped_column(Text, default=None)
    job: Mapped[ExportJob] = relationship(back_populates="attempts")


class EmailState:
    QUEUED = "queued"
    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"

    CLAIMABLE = (QUEUED, RETRYING)
    CANCELLABLE = (QUEUED, RETRYING, SENDING)
    RETRYABLE = (FAILED, CANCELLED)


class OutboundEmail(db.Model):
    """An email to send, recorded before it is sent: the unique key makes sending idempotent."""

    __tablename__ = "outbound_emails"
    __table_args__ = (Index("ix_outbound_emails_to_address", "to_address"),
                      Index("ix_outbound_emails_created_at", "created_at"),
                      Index("ix_outbound_emails_state_sent_at", "state", "sent_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    to_address: Mapped[str] = mapped_column(String(254))
    subject: Mapped[str] = mapped_column(String(255))
    text_body: Mapped[str] = mapped_column(Text)
    html_body: Mapped[str] = mapped_column(Text)
    message_id: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(20), default=EmailState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("export_jobs.id", ondelete="SET NULL"), index=True, default=None
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(default=None)  # its last attempt began
    sent_at: Mapped[datetime | None] = mapped_column(default=None)


class Schedule(db.Model):
    """A recurring export: which export (dataset, format, fixed parameters, a date range
    relative to each run), when (a cron expression in an IANA time zone; the presets are
    written as one), and where it stands (next run, consecutive failures, paused)."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_paused_at_next_run_at", "paused_at", "next_run_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    name: Mapped[str] = mapped_column(String(120))
    dataset: Mapped[str] = mapped_column(String(60))
    format: Mapped[str] = mapped_column(String(10), default="csv")
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # fixed, cleaned parameters
    # A relative date range (jobs.schedules.RANGES) on the dataset's range parameter
    # `range_param`, resolved at each run; `range_days` for "last_n_days".
    date_range: Mapped[str | None] = mapped_column(String(20), default=None)
    range_param: Mapped[str | None] = mapped_column(String(60), default=None)
    range_days: Mapped[int | None] = mapped_column(default=None)
    cron: Mapped[str] = mapped_column(String(120))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    skip_when_empty: Mapped[bool] = mapped_column(default=False)
    next_run_at: Mapped[datetime]  # naive UTC, like every time stored here
    last_run_at: Mapped[datetime | None] = mapped_column(default=None)  # the slot last run
    last_skipped_at: Mapped[datetime | None] = mapped_column(default=None)  # empty, skipped
    failures: Mapped[int] = mapped_column(default=0)  # consecutive failed runs
    paused_at: Mapped[datetime | None] = mapped_column(default=None)
    pause_reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    user: Mapped[User] = relationship()
    organisation: Mapped[Organisation] = relationship()

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


class WebhookEndpoint(db.Model):
    """Where a user (or, for an admin, their whole organisation) is told of events: a URL, the
    event types it wants, and its signing secret; the previous secret stays valid for a while
    after a rotation, so both sign meanwhile (jobs.webhooks)."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), index=True)
    organisation_wide: Mapped[bool] = mapped_column(default=False)  # every member's events
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list] = mapped_column(JSON, default=list)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    previous_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    user: Mapped[User] = relationship()


class DeliveryState:
    QUEUED = "queued"
    SENDING = "sending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"

    CLAIMABLE = (QUEUED, RETRYING)


class WebhookDelivery(db.Model):
    """One event for one endpoint, its body fixed when the event happened: every attempt (and
    a resend) sends the same bytes with the same webhook-id, so the receiver can drop repeats."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_endpoint_id_event_id", "endpoint_id",
                            "event_id", unique=True),)
    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id",
                                                        ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(40))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), default=DeliveryState.QUEUED)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    log: Mapped[list[WebhookAttempt]] = relationship(
        order_by="WebhookAttempt.id", cascade="all, delete-orphan", passive_deletes=True)


class WebhookAttempt(db.Model):
    """One try of a delivery: when, the endpoint's status code, or why there was none."""

    __tablename__ = "webhook_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class AdminAction(db.Model):
    """The audit log: every action an admin takes, on a job, an email, a lane or a person."""

    __tablename__ = "admin_actions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    action: Mapped[str] = mapped_column(String(40))
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("export_jobs.id", ondelete="SET NULL"), index=True, default=None)
    email_id: Mapped[int | None] = mapped_column(
        ForeignKey("outbound_emails.id", ondelete="SET NULL"), index=True, default=None)
    lane: Mapped[str | None] = mapped_column(String(20), default=None)
    subject_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id"), index=True, default=None)  # the person acted on
    org_id: Mapped[int | None] = mapped_column(
        ForeignKey("organisations.id"), index=True, default=None)  # the organisation acted on
    detail: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[User] = relationship(foreign_keys=[user_id])
    subject_user: Mapped[User | None] = relationship(foreign_keys=[subject_user_id])


class Transaction(db.Model):
    """Demo table behind the `transactions` dataset."""

    __tablename__ = "transactions"
    __table_args__ = (Index("ix_transactions_org_id_id", "org_id", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    created_at: Mapped[datetime]
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(20))
    customer_email: Mapped[str] = mapped_column(String(254))
    description: Mapped[str] = mapped_column(Text)


class Order(db.Model):
    """Demo table behind the `orders` dataset."""

    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_org_id_id", "org_id", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    created_at: Mapped[datetime]
    customer: Mapped[str] = mapped_column(String(200))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    status: Mapped[str] = mapped_column(String(20))
    items: Mapped[str] = mapped_column(Text)
