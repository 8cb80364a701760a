"""The export engine: keyset batches streamed to a part file, checkpointed, resumable exactly."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from traceback import format_exception
from typing import BinaryIO

from flask import current_app
from huey.exceptions import TaskTimeout
from redis import exceptions as redis_exc
from sqlalchemy import Connection, func, select, update
from sqlalchemy import exc as sa_exc

from jobs import fastcsv, lanes
from jobs.datasets import DATASETS, Dataset, InvalidParams
from jobs.fastcsv import neutralise
from jobs.storage import LocalStorage
from webapp import emails
from webapp.models import ExportJob, JobAttempt, JobState, User, db, locked, utcnow

MIME_TYPES = {
    "csv": "text/csv",  # Flask adds "; charset=utf-8" to text types
    "csv.gz": "application/gzip",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
XLSX_MAX_ROWS = 1_048_575  # Excel's sheet limit, less the header row
RESUMABLE = {"csv", "csv.gz"}  # xlsx is one zip written at the end: it restarts from zero


def _format_text(v) -> str:
    return neutralise(str(v))


# Typed cells for xlsx: numbers stay numbers (negative amounts included), dates stay dates.
XLSX_CELLS: dict[str, Callable] = {
    "int": int,
    "money": float,
    "datetime": lambda v: v,
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


class TooManyRows(ValueError):
    """The export does not fit the chosen format (xlsx holds about a million rows)."""


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
    fmt: str = "csv",
    bom: bool = False,
) -> Checkpoint:
    """Write the dataset in `fmt` to `out` from `start`; call on_checkpoint a few times a second.

    `out` must already hold exactly `start.bytes` good bytes. A checkpoint is reported only
    after the bytes it counts are flushed and fsynced, so a resume from it is byte-identical.
    csv.gz closes a gzip member at every checkpoint (concatenated members are one valid gzip
    stream), so it can be cut back to a checkpoint like csv. xlsx always starts from zero.
    """
    if fmt == "xlsx":
        return _stream_xlsx(conn, dataset, org_id, params, out, on_checkpoint, batch_rows,
                            interval)
    if fmt not in RESUMABLE:
        raise InvalidParams({"format": f"unknown format {fmt!r}"})
    position = Checkpoint(start.last_key, start.rows, start.bytes)
    gzip_member: list = []  # the open member's compressor, if any

    def emit(data: bytes) -> None:
        if fmt == "csv.gz":
            if not gzip_member:
                gzip_member.append(zlib.compressobj(6, zlib.DEFLATED, 31))  # 31: gzip framing
            data = gzip_member[0].compress(data)
        out.write(data)
        position.bytes += len(data)

    def checkpoint() -> None:
        if gzip_member:
            tail = gzip_member.pop().flush()
            out.write(tail)
            position.bytes += len(tail)
        out.flush()
        os.fsync(out.fileno())
        on_checkpoint(Checkpoint(position.last_key, position.rows, position.bytes))

    if position.bytes == 0:
        emit(("\ufeff".encode() if bom else b"") + fastcsv.header(dataset))
    last_checkpoint = time.monotonic()
    pages = fastcsv.batches(conn, dataset, org_id, params, position.last_key, batch_rows)
    try:
        for batch in pages:
            emit(batch.data)
            position.rows += batch.rows
            position.last_key = batch.last_key
            if time.monotonic() - last_checkpoint >= interval:
                checkpoint()
                last_checkpoint = time.monotonic()
    finally:
        pages.close()  # also on cancel: stop reading ahead
    checkpoint()
    return position


def _stream_xlsx(conn: Connection, dataset: Dataset, org_id: int, params: dict[str, str],
                 out: BinaryIO, on_checkpoint: Callable[[Checkpoint], None], batch_rows: int,
                 interval: float) -> Checkpoint:
    """One sheet with typed cells, in XlsxWriter's constant_memory mode (rows go to a temp
    file as they come; the zip is written at the end). Checkpoints report progress only."""
    import xlsxwriter

    book = xlsxwriter.Workbook(out, {
        "constant_memory": True, "strings_to_formulas": False, "strings_to_numbers": False,
        "strings_to_urls": False, "default_date_format": "yyyy-mm-dd hh:mm:ss",
    })
    sheet = book.add_worksheet(dataset.name[:31])
    money = book.add_format({"num_format": "0.00"})
    for i, column in enumerate(dataset.columns):
        if column.kind == "money":
            sheet.set_column(i, i, 12, money)
        elif column.kind == "datetime":
            sheet.set_column(i, i, 19)
    sheet.write_row(0, 0, dataset.column_names)
    cells = [XLSX_CELLS[c.kind] for c in dataset.columns]
    key_index = dataset.column_names.index(dataset.key)
    position = Checkpoint()
    last_checkpoint = time.monotonic()
    while True:
        rows = conn.execute(dataset.batch(org_id, params, position.last_key, batch_rows)).all()
        if not rows:
            break
        if position.rows + len(rows) > XLSX_MAX_ROWS:
            book.close()
            raise TooManyRows(f"An xlsx sheet holds at most {XLSX_MAX_ROWS:,} rows; "
                              "choose csv or csv.gz, or narrow the filters.")
        for n, row in enumerate(rows, start=position.rows + 1):
            sheet.write_row(n, 0, [cell(v) if v is not None else None
                                   for cell, v in zip(cells, row, strict=True)])
        position.rows += len(rows)
        position.last_key = rows[-1][key_index]
        if time.monotonic() - last_checkpoint >= interval:
            on_checkpoint(Checkpoint(position.last_key, position.rows, 0))
            last_checkpoint = time.monotonic()
    book.close()
    out.flush()
    os.fsync(out.fileno())
    position.bytes = out.tell()
    on_checkpoint(Checkpoint(position.last_key, position.rows, position.bytes))
    return position


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def storage() -> LocalStorage:
    return LocalStorage(current_app.config["EXPORT_DIR"])


class PermanentFailure(Exception):
    """Retrying cannot help (bad parameters, a dataset that is gone): fail at once, say why."""


class LostClaim(Exception):
    """Another worker took the job over after this one's lease lapsed: stop, touch nothing."""


class Deferred(Exception):
    """The owner already has their share of running exports: try again shortly."""


class Interrupted(Exception):
    """The consumer is shutting down: the job was checkpointed and must go back on its lane."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # includes refused and reset connections
    TimeoutError,
    TaskTimeout,
    sa_exc.OperationalError,  # lost or refused database connection, lock and statement timeouts
    sa_exc.TimeoutError,  # no connection free in the pool
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                  errno.ENOTDIR, errno.EISDIR}


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, InvalidParams | PermanentFailure | TooManyRows)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, TRANSIENT_ERRORS)


def reason(exc: BaseException) -> str:
    """A one-line reason a user can read (SQLAlchemy appends SQL and links on later lines)."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, InvalidParams):
        return f"Invalid parameters: {first}"
    if isinstance(exc, PermanentFailure | TooManyRows):
        return first
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"Storage error: {os.strerror(exc.errno)}{where}"
    if isinstance(exc, TaskTimeout):
        return f"TaskTimeout: the attempt ran past the lane's hard limit ({first})"
    if is_transient(exc):
        return f"Temporary failure ({type(exc).__name__}): {first}"
    return f"{type(exc).__name__}: {first}"


class AttemptFailed(Exception):
    """An attempt ended in error; `retry` says whether the job goes back on its lane."""

    def __init__(self, error: str, retry: bool, attempt: int = 1):
        super().__init__(error)
        self.retry = retry
        self.attempt = attempt


def _lease() -> timedelta:
    return timedelta(seconds=current_app.config.get("JOB_LEASE", 60.0))


def _claim(job_id: int, max_attempts: int) -> tuple[ExportJob, JobAttempt] | None:
    """Take the job for this worker under a row lock; None when it must not run here now.

    Runnable: queued, retrying, or running with a lapsed lease (its worker died). A second
    delivery of the same message while the job runs, or after it ended, does nothing: under
    the lock exactly one of two concurrent deliveries sees a runnable job. Fair share: with
    the owner's row locked too, raises Deferred while the owner has their share running.
    """
    db.session.rollback()
    job = locked(ExportJob, job_id)
    now = utcnow()
    live_claim = (job is not None and job.state == JobState.RUNNING
                  and job.lease_expires_at is not None and job.lease_expires_at > now)
    if job is None or job.state not in JobState.ACTIVE or live_claim:
        db.session.rollback()
        return None
    locked(User, job.user_id)
    running = db.session.scalar(
        select(func.count()).select_from(ExportJob).where(
            ExportJob.user_id == job.user_id, ExportJob.id != job_id,
            ExportJob.state == JobState.RUNNING, ExportJob.lease_expires_at > now)
    )
    if running >= current_app.config["EXPORTS_RUNNING_PER_USER"]:
        db.session.rollback()
        raise Deferred
    number = len(job.attempts) + 1
    if _tries(job) + 1 > max_attempts:  # only after workers died mid-attempt
        job.state = JobState.FAILED
        job.error = f"Gave up after {max_attempts} attempts" + (
            f"; last error: {job.error}" if job.error else " (its workers stopped responding)")
        job.finished_at = now
        job.claimed_by = job.lease_expires_at = None
        db.session.commit()
        return None
    attempt = JobAttempt(job=job, number=number, worker=worker_name())
    db.session.add(attempt)
    job.state = JobState.RUNNING
    job.claimed_by = f"{attempt.worker}#{number}"
    job.lease_expires_at = now + _lease()
    job.started_at = job.started_at or now
    job.error = None
    db.session.commit()
    return job, attempt


def _tries(job: ExportJob) -> int:
    """Attempts made since the job was (re)started: a retry by hand (which sets started_at to
    the time it was asked for) gets a fresh allowance."""
    since = job.started_at or datetime.min
    return sum(1 for attempt in job.attempts if attempt.started_at >= since)


def _save(job_id: int, claim: str, commit: bool = True, **values) -> None:
    """Write to the job only while this worker still holds its claim.

    Raises Cancelled when the job was cancelled meanwhile, LostClaim when another worker owns it.
    """
    done = db.session.execute(
        update(ExportJob)
        .where(ExportJob.id == job_id, ExportJob.claimed_by == claim,
               ExportJob.state == JobState.RUNNING)
        .values(**values)
    ).rowcount
    if done == 1:
        if commit:
            db.session.commit()
        return
    state = db.session.scalar(select(ExportJob.state).where(ExportJob.id == job_id))
    db.session.rollback()
    raise Cancelled if state == JobState.CANCELLED else LostClaim


class _Heartbeat(threading.Thread):
    """Renews the claim's lease while the attempt runs, also through a long query."""

    def __init__(self, app, job_id: int, claim: str):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.app, self.job_id, self.claim, self.done = app, job_id, claim, threading.Event()

    def run(self) -> None:
        with self.app.app_context():
            while not self.done.wait(_lease().total_seconds() / 3):
                with db.engine.begin() as conn:
                    conn.execute(update(ExportJob)
                                 .where(ExportJob.id == self.job_id,
                                        ExportJob.claimed_by == self.claim,
                                        ExportJob.state == JobState.RUNNING)
                                 .values(lease_expires_at=utcnow() + _lease()))


def _disarm_hard_timeout() -> None:
    """The attempt is already ending: let it record how, without the alarm cutting it short."""
    if threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)


def _reset_session() -> None:
    """Roll back, also when an alarm interrupted the session half-way through a commit."""
    try:
        db.session.rollback()
    except Exception:
        db.session.close()


def _caused_by(exc: BaseException | None, kind: type) -> BaseException | None:
    """The `kind` exception behind exc, also when a driver wrapped it (SQLAlchemy does)."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return None


def run(job_id: int, max_attempts: int) -> None:
    """Run (or resume) one export job to the end, recording the attempt.

    Safe to call twice, also at the same time: see `_claim`. Raises AttemptFailed (retry or
    not), Deferred (fair share) or Interrupted (our consumer is shutting down).
    """
    if lanes.stopping():  # taken from the queue while our consumer shuts down: give it back
        raise Interrupted
    claimed = _claim(job_id, max_attempts)
    if claimed is None:
        return
    job, attempt = claimed
    claim = job.claimed_by
    # Stop cleanly at a checkpoint just before the lane's hard timeout (SIGALRM) would strike
    # at a random point; the hard limit stays as the backstop for a stuck query.
    limit = lanes.exports.settings.timeout
    soft_deadline = time.monotonic() + limit - min(limit * 0.25, 5.0)
    heartbeat = _Heartbeat(current_app._get_current_object(), job.id, claim)
    files = storage()
    try:
        heartbeat.start()
        dataset = DATASETS.get(job.dataset)
        if dataset is None:
            raise PermanentFailure(f"The dataset {job.dataset!r} no longer exists.")
        params = dataset.clean_params(job.params)
        with db.engine.connect() as conn:
            if job.rows_total is None:
                total = conn.execute(dataset.count(job.org_id, params)).scalar_one()
                _save(job.id, claim, rows_total=total, lease_expires_at=utcnow() + _lease())

            def on_checkpoint(cp: Checkpoint) -> None:
                _save(job.id, claim, checkpoint=asdict(cp), rows_done=cp.rows, bytes=cp.bytes,
                      lease_expires_at=utcnow() + _lease())
                if lanes.stopping():
                    raise Interrupted
                if time.monotonic() > soft_deadline:
                    raise TaskTimeout(f"timeout ({limit}s)")

            start = Checkpoint.from_json(job.checkpoint)
            if job.format not in RESUMABLE:
                start = Checkpoint()
            with files.open_part(job.id, job.format, start.bytes) as out:
                stream(conn, dataset, job.org_id, params, out, start, on_checkpoint,
                       current_app.config["EXPORT_BATCH_ROWS"],
                       current_app.config["CHECKPOINT_INTERVAL"], job.format,
                       current_app.config["CSV_BOM"])
        _disarm_hard_timeout()  # the rest is short and must not be cut in half
        # Marked succeeded and published in one transaction that holds the claim's row lock.
        _save(job.id, claim, commit=False, state=JobState.SUCCEEDED,
              file_name=f"job-{int(job.id)}.{job.format}", finished_at=utcnow(),
              lease_expires_at=None)
        files.publish(job.id, job.format)
        db.session.refresh(job)
        emails.export_finished(job)  # saved in the same commit as the job's end
        attempt.outcome = "succeeded"
    except Cancelled:
        db.session.rollback()
        files.discard_part(job.id, job.format)
        attempt.outcome = "cancelled"
    except LostClaim:
        db.session.rollback()
        attempt.outcome = "abandoned"
        attempt.error = "another worker took the job over after this one's lease lapsed"
    except (Interrupted, KeyboardInterrupt):  # KeyboardInterrupt: Huey's forced shutdown
        _disarm_hard_timeout()
        _reset_session()
        try:
            _save(job.id, claim, commit=False, state=JobState.QUEUED, claimed_by=None,
                  lease_expires_at=None, enqueued_at=None)
        except (Cancelled, LostClaim):
            pass
        attempt.outcome, attempt.finished_at = "interrupted", utcnow()
        db.session.commit()
        raise Interrupted from None
    except Exception as exc:
        _disarm_hard_timeout()
        _reset_session()
        timed_out = _caused_by(exc, TaskTimeout)
        error = reason(timed_out or exc)
        retry = not is_permanent(exc) and _tries(job) < max_attempts
        owned = True
        try:
            _save(job.id, claim, commit=False,
                  state=JobState.RETRYING if retry else JobState.FAILED,
                  error=error, lease_expires_at=None, enqueued_at=None,
                  finished_at=None if retry else utcnow())
        except (Cancelled, LostClaim) as outcome:
            retry, owned = False, isinstance(outcome, Cancelled)
        attempt.outcome = "timed_out" if timed_out else "failed"
        attempt.error, attempt.finished_at = error, utcnow()
        attempt.traceback = "".join(format_exception(exc))[-20_000:]
        if owned and not retry:
            db.session.flush()  # refresh() would overwrite the attempt's unsaved outcome
            db.session.refresh(job)
            emails.export_finished(job)
        db.session.commit()
        # The part file stays, so a retry by hand resumes from the checkpoint; retention
        # removes it with the job's other files.
        raise AttemptFailed(error, retry, attempt.number) from exc
    finally:
        heartbeat.done.set()
    attempt.finished_at = utcnow()
    db.session.commit()
