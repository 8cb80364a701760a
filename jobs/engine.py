"""The export engine: keyset batches streamed to a part file, checkpointed, resumable exactly."""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import BinaryIO

from flask import current_app
from huey.exceptions import TaskTimeout
from sqlalchemy import Connection, and_, func, or_, select, update

from jobs import lanes
from jobs.datasets import DATASETS, Dataset, InvalidParams
from jobs.storage import LocalStorage
from webapp.models import ExportJob, JobAttempt, JobState, User, db, utcnow

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """Stop spreadsheets from running a text cell as a formula (OWASP CSV injection)."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def _format_money(v) -> str:
    return f"{v:.2f}"


def _format_datetime(v: datetime) -> str:
    return v.isoformat(sep=" ", timespec="seconds")


def _format_text(v) -> str:
    return neutralise(str(v))


FORMATTERS: dict[str, Callable] = {
    "int": int,
    "money": _format_money,
    "datetime": _format_datetime,
    "text": _format_text,
}


@dataclass
class Checkpoint:
    """How far a part file is known to be good: on disk (fsynced) and recorded in the job row."""

    last_key: object = None
    rows: int = 0
    bytes: int = 0

    @classmethod
    def from_json(cls, data: dict | None) -> Checkpoint:
        return cls(**data) if data else cls()


class Cancelled(Exception):
    """The job was cancelled while it ran: stop between batches."""


def stream(
    conn: Connection,
    dataset: Dataset,
    org_id: int,
    params: dict[str, str],
    out: BinaryIO,
    start: Checkpoint,
    on_checkpoint: Callable[[Checkpoint], None],
    batch_rows: int = 5000,
    interval: float = 0.5,
) -> Checkpoint:
    """Write the dataset as CSV to `out` from `start`; call on_checkpoint a few times a second.

    `out` must already hold exactly `start.bytes` good bytes. A checkpoint is reported only
    after the bytes it counts are flushed and fsynced, so a resume from it is byte-identical.
    """
    position = Checkpoint(start.last_key, start.rows, start.bytes)
    formatters = [FORMATTERS[c.kind] for c in dataset.columns]
    key_index = dataset.column_names.index(dataset.key)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def emit() -> None:
        data = buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()
        out.write(data)
        position.bytes += len(data)

    def checkpoint() -> None:
        out.flush()
        os.fsync(out.fileno())
        on_checkpoint(Checkpoint(position.last_key, position.rows, position.bytes))

    if position.bytes == 0:
        writer.writerow(dataset.column_names)
        emit()
    last_checkpoint = time.monotonic()
    while True:
        rows = conn.execute(dataset.batch(org_id, params, position.last_key, batch_rows)).all()
        if not rows:
            break
        writer.writerows(
            [fmt(v) if v is not None else "" for fmt, v in zip(formatters, row, strict=True)]
            for row in rows
        )
        emit()
        position.rows += len(rows)
        position.last_key = rows[-1][key_index]
        if time.monotonic() - last_checkpoint >= interval:
            checkpoint()
            last_checkpoint = time.monotonic()
    checkpoint()
    return position


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def storage() -> LocalStorage:
    return LocalStorage(current_app.config["EXPORT_DIR"])


class AttemptFailed(Exception):
    """An attempt ended in error; `retry` says whether the job goes back on its lane."""

    def __init__(self, error: str, retry: bool):
        super().__init__(error)
        self.retry = retry


class Deferred(Exception):
    """The owner already has their share of running exports: try again shortly."""


class Interrupted(Exception):
    """The consumer is shutting down: the job was checkpointed and must go back on its lane."""


def _lease_until() -> datetime:
    return utcnow() + timedelta(seconds=current_app.config["LEASE_SECONDS"])


def _claim(job_id: int) -> tuple[ExportJob, JobAttempt] | None:
    """Take the job for this worker, or None when another worker holds it or it is over.

    One conditional UPDATE decides between concurrent deliveries of the same message (only
    one sees its row change); the owner's running exports are counted in the same transaction,
    after the owner's row is locked, so fair share holds across workers. Raises Deferred.
    """
    now = utcnow()
    job = db.session.get(ExportJob, job_id)
    if job is None:
        return None
    db.session.execute(select(User.id).where(User.id == job.user_id).with_for_update())
    claimed = db.session.execute(
        update(ExportJob)
        .where(ExportJob.id == job_id)
        .where(or_(ExportJob.state.in_([JobState.QUEUED, JobState.RETRYING]),
                   and_(ExportJob.state == JobState.RUNNING,
                        or_(ExportJob.lease_expires_at.is_(None),
                            ExportJob.lease_expires_at < now))))
        .values(state=JobState.RUNNING, lease_expires_at=_lease_until(), error=None)
    ).rowcount
    if not claimed:
        db.session.rollback()
        return None
    running = db.session.scalar(
        select(func.count()).select_from(ExportJob).where(
            ExportJob.user_id == job.user_id, ExportJob.id != job_id,
            ExportJob.state == JobState.RUNNING, ExportJob.lease_expires_at >= now)
    )
    if running >= current_app.config["EXPORTS_RUNNING_PER_USER"]:
        db.session.rollback()
        raise Deferred
    db.session.refresh(job)
    job.started_at = job.started_at or now
    attempt = JobAttempt(job=job, number=len(job.attempts) + 1, worker=worker_name())
    db.session.add(attempt)
    db.session.commit()
    return job, attempt


class _Heartbeat(threading.Thread):
    """Renews the job's lease while the attempt runs, even through a long query."""

    def __init__(self, app, job_id: int):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.app, self.job_id, self.done = app, job_id, threading.Event()

    def run(self) -> None:
        every = self.app.config["LEASE_SECONDS"] / 3
        with self.app.app_context():
            while not self.done.wait(every):
                with db.engine.begin() as conn:
                    conn.execute(update(ExportJob)
                                 .where(ExportJob.id == self.job_id,
                                        ExportJob.state == JobState.RUNNING)
                                 .values(lease_expires_at=_lease_until()))


def run(job_id: int, max_attempts: int) -> None:
    """Run (or resume) one export job to the end, recording the attempt.

    Raises AttemptFailed (retry or not), Deferred (fair share) or Interrupted (shutdown).
    """
    if lanes.stopping():  # taken from the queue while our consumer shuts down: give it back
        raise Interrupted
    claimed = _claim(job_id)
    if claimed is None:
        return
    job, attempt = claimed
    # Stop cleanly at a checkpoint just before the lane's hard timeout (SIGALRM) would strike
    # at a random point; the hard limit stays as the backstop for a stuck query.
    limit = lanes.exports.settings.timeout
    soft_deadline = time.monotonic() + limit - min(limit * 0.1, 5.0)
    heartbeat = _Heartbeat(current_app._get_current_object(), job.id)
    files = storage()
    try:
        heartbeat.start()
        dataset = DATASETS.get(job.dataset)
        if dataset is None:
            raise InvalidParams({"dataset": f"{job.dataset!r} no longer exists"})
        params = dataset.clean_params(job.params)
        with db.engine.connect() as conn:
            if job.rows_total is None:
                job.rows_total = conn.execute(dataset.count(job.org_id, params)).scalar_one()
                db.session.commit()

            def on_checkpoint(cp: Checkpoint) -> None:
                db.session.refresh(job, ["state"])
                if job.state == JobState.CANCELLED:
                    raise Cancelled
                job.checkpoint = asdict(cp)
                job.rows_done = cp.rows
                job.bytes = cp.bytes
                job.lease_expires_at = _lease_until()
                db.session.commit()
                if lanes.stopping():
                    raise Interrupted
                if time.monotonic() > soft_deadline:
                    raise TaskTimeout(f"timeout ({limit}s)")

            start = Checkpoint.from_json(job.checkpoint)
            with files.open_part(job.id, job.format, start.bytes) as out:
                stream(conn, dataset, job.org_id, params, out, start, on_checkpoint,
                       current_app.config["EXPORT_BATCH_ROWS"],
                       current_app.config["CHECKPOINT_INTERVAL"])
        job.file_name = files.publish(job.id, job.format)
        job.state = JobState.SUCCEEDED
        attempt.outcome = "succeeded"
    except Cancelled:
        db.session.rollback()
        files.discard_part(job.id, job.format)
        attempt.outcome = "cancelled"
    except (Interrupted, KeyboardInterrupt):  # KeyboardInterrupt: Huey's forced shutdown
        _disarm_hard_timeout()
        db.session.rollback()
        job.state = JobState.QUEUED
        attempt.outcome = "interrupted"
        _end(job, attempt)
        raise Interrupted from None
    except Exception as exc:
        _disarm_hard_timeout()
        db.session.rollback()
        permanent = isinstance(exc, InvalidParams)
        retry = not permanent and attempt.number < max_attempts
        timed_out = _caused_by(exc, TaskTimeout)
        attempt.outcome = "timed_out" if timed_out else "failed"
        attempt.error = job.error = (f"TaskTimeout: {timed_out}" if timed_out
                                     else f"{type(exc).__name__}: {exc}")
        job.state = JobState.RETRYING if retry else JobState.FAILED
        if not retry:
            job.finished_at = utcnow()
            files.discard_part(job.id, job.format)
        _end(job, attempt)
        raise AttemptFailed(job.error, retry) from exc
    finally:
        heartbeat.done.set()
    job.finished_at = job.finished_at or utcnow()
    _end(job, attempt)


def _disarm_hard_timeout() -> None:
    """The attempt is already ending: let it record how, without the alarm cutting it short."""
    if threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)


def _caused_by(exc: BaseException | None, kind: type) -> BaseException | None:
    """The `kind` exception behind exc, also when a driver wrapped it (SQLAlchemy does)."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return None


def _end(job: ExportJob, attempt: JobAttempt) -> None:
    attempt.finished_at = utcnow()
    job.lease_expires_at = None
    db.session.commit()


def reap_lapsed_leases(max_attempts: int) -> list[int]:
    """Jobs whose worker died (lease lapsed): back on their lane, or failed after the last try.

    Returns the ids to send to the lane again. Safe to run in every consumer at once: each
    job changes state in one conditional UPDATE, so only one reaper acts on it.
    """
    now = utcnow()
    lapsed = db.session.scalars(
        select(ExportJob).where(ExportJob.state == JobState.RUNNING,
                                ExportJob.lease_expires_at < now)
    ).all()
    resend = []
    for job in lapsed:
        last = job.attempts[-1] if job.attempts else None
        retry = len(job.attempts) < max_attempts
        reason = f"worker {last.worker if last else '?'} stopped responding (lease expired)"
        values = dict(state=JobState.RETRYING if retry else JobState.FAILED,
                      lease_expires_at=None)
        if not retry:
            values.update(error=f"{reason} after {len(job.attempts)} attempts",
                          finished_at=now)
        won = db.session.execute(
            update(ExportJob).where(ExportJob.id == job.id, ExportJob.state == JobState.RUNNING,
                                    ExportJob.lease_expires_at < now).values(**values)
        ).rowcount
        if won and last is not None and last.outcome is None:
            last.outcome, last.error, last.finished_at = "lost", reason, now
        if won and retry:
            resend.append(job.id)
        elif won:
            storage().discard_part(job.id, job.format)
    db.session.commit()
    return resend
