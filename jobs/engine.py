"""The export engine: keyset batches streamed to a part file, checkpointed, resumable exactly."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from traceback import format_exception

from flask import current_app, has_app_context
from huey.exceptions import TaskTimeout
from redis import exceptions as redis_exc
from sqlalchemy import Connection, func, select, update
from sqlalchemy import exc as sa_exc

from jobs import dispatch, fastcsv, lanes, signals
from jobs.datasets import DATASETS, Dataset, InvalidParams
from jobs.fastcsv import neutralise
from jobs.models import ExportJob, JobAttempt, JobState, User, db, locked, utcnow
from jobs.storage import LocalStorage, Part, Prefix, storage

log = logging.getLogger(__name__)

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
    """How far a part file is known to be good: on disk (fsynced) and recorded in the job row.

    `part` names the claim's part file that holds the `bytes` bytes, `sha256` is their digest
    (a resume checks both before writing on), and `complete` says every row is in them: the
    export only needs publishing.
    """

    last_key: object = None
    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    part: str | None = None
    complete: bool = False

    @classmethod
    def from_json(cls, data: dict | None) -> Checkpoint:
        return cls(**data) if data else cls()


_faults_seen: Counter = Counter()


def fault(step: str) -> None:
    """Tests only: SIGKILL this worker's process group at the step FAULT_INJECT names.

    FAULT_INJECT is "step" or "step:n" (the n-th time this process reaches it). Steps, in the
    order an export meets them: written (bytes written, not yet fsynced), synced (fsynced, the
    checkpoint not yet committed), checkpointed (committed), final (the last bytes fsynced,
    the final checkpoint not yet committed), published (the file renamed into place, the job
    not yet marked succeeded), committed (marked succeeded, the email not yet handed to its
    lane). Refused in production (webapp.config).
    """
    spec = current_app.config.get("FAULT_INJECT", "") if has_app_context() else ""
    name, _, nth = spec.partition(":")
    if name != step:
        return
    _faults_seen[step] += 1
    if _faults_seen[step] >= int(nth or 1):
        log.warning("FAULT_INJECT: killing this consumer at step %r", spec)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _checkpoint(out: Part, position: Checkpoint, on_checkpoint: Callable[[Checkpoint], None],
                complete: bool = False) -> None:
    """Fsync, then record: a checkpoint never counts a byte that is not on disk."""
    fault("written")
    out.sync()
    fault("final" if complete else "synced")
    position.bytes, position.sha256 = out.size, out.sha256
    position.part, position.complete = out.name, complete
    on_checkpoint(replace(position))
    fault("checkpointed")


class Cancelled(Exception):
    """The job was cancelled while it ran: stop between batches."""


class TooManyRows(ValueError):
    """The export does not fit the chosen format (xlsx holds about a million rows)."""


def stream(
    conn: Connection,
    dataset: Dataset,
    org_id: int,
    params: dict[str, str],
    out: Part,
    start: Checkpoint,
    on_checkpoint: Callable[[Checkpoint], None],
    batch_rows: int = 5000,
    interval: float = 0.5,
    fmt: str = "csv",
    bom: bool = False,
) -> Checkpoint:
    """Write the dataset in `fmt` to `out` from `start`; call on_checkpoint a few times a second.

    `out` must already hold exactly the `start.bytes` good bytes of `start`. A checkpoint is
    reported only after the bytes it counts are fsynced, so a resume from it is byte-identical;
    the last one is `complete`. csv.gz closes a gzip member at every checkpoint (concatenated
    members are one valid gzip stream), so it resumes like csv. xlsx always starts from zero.
    """
    if fmt == "xlsx":
        return _stream_xlsx(conn, dataset, org_id, params, out, on_checkpoint, batch_rows,
                            interval)
    if fmt not in RESUMABLE:
        raise InvalidParams({"format": f"unknown format {fmt!r}"})
    position = Checkpoint(start.last_key, start.rows)
    gzip_member: list = []  # the open member's compressor, if any

    def emit(data: bytes) -> None:
        if fmt == "csv.gz":
            if not gzip_member:
                gzip_member.append(zlib.compressobj(6, zlib.DEFLATED, 31))  # 31: gzip framing
            data = gzip_member[0].compress(data)
        out.write(data)

    def checkpoint(complete: bool = False) -> None:
        if gzip_member:
            out.write(gzip_member.pop().flush())
        _checkpoint(out, position, on_checkpoint, complete)

    if out.size == 0:
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
    checkpoint(complete=True)
    return position


def _stream_xlsx(conn: Connection, dataset: Dataset, org_id: int, params: dict[str, str],
                 out: Part, on_checkpoint: Callable[[Checkpoint], None], batch_rows: int,
                 interval: float) -> Checkpoint:
    """One sheet with typed cells, in XlsxWriter's constant_memory mode (rows go to a temp
    file as they come; the zip is written at the end, streamed through `out`, which hashes it).
    Checkpoints report progress only, but the last, which records the finished file."""
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
            on_checkpoint(Checkpoint(position.last_key, position.rows))
            fault("checkpointed")
            last_checkpoint = time.monotonic()
    book.close()
    _checkpoint(out, position, on_checkpoint, complete=True)
    return position


def host() -> str:
    """This machine's name in claims (WORKER_HOST overrides it, e.g. in containers whose
    hostnames repeat)."""
    return os.environ.get("WORKER_HOST") or socket.gethostname()


def worker_name() -> str:
    return f"{host()}:{os.getpid()}"


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
        job.claimed_by = job.lease_expires_at = job.checkpoint = None
        db.session.commit()
        storage().discard_parts(job_id)  # a failed job leaves no part behind
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


def _reset_session(job_id: int, attempt_id: int) -> tuple[ExportJob, JobAttempt]:
    """Roll back, also when an alarm interrupted the session half-way through a commit or the
    database cut its connection (then the session starts afresh); the job and the attempt,
    read again, to record how the attempt ended."""
    try:
        db.session.rollback()
    except Exception:
        db.session.close()
    return db.session.get(ExportJob, job_id), db.session.get(JobAttempt, attempt_id)


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
    claim = f"{attempt.worker}#{attempt.number}"  # as _claim wrote it (the row may change)
    attempt_id = attempt.id
    # Stop cleanly at a checkpoint just before the lane's hard timeout (SIGALRM) would strike
    # at a random point; the hard limit stays as the backstop for a stuck query.
    limit = lanes.exports.settings.timeout
    soft_deadline = time.monotonic() + limit - min(limit * 0.25, 5.0)
    heartbeat = _Heartbeat(current_app._get_current_object(), job.id, claim)
    files = storage()

    def on_checkpoint(cp: Checkpoint) -> None:
        _save(job.id, claim, checkpoint=asdict(cp), rows_done=cp.rows, bytes=cp.bytes,
              lease_expires_at=utcnow() + _lease())
        if cp.complete:
            return  # all that is left is to publish: no reason to stop now
        if lanes.stopping():
            raise Interrupted
        if time.monotonic() > soft_deadline:
            raise TaskTimeout(f"timeout ({limit}s)")

    try:
        heartbeat.start()
        _export(job, attempt, claim, files, on_checkpoint)
        attempt.outcome = "succeeded"
    except Cancelled:
        db.session.rollback()
        files.discard_parts(job.id)
        attempt.outcome = "cancelled"
    except LostClaim:
        db.session.rollback()
        attempt.outcome = "abandoned"
        attempt.error = "another worker took the job over after this one's lease lapsed"
    except (Interrupted, KeyboardInterrupt):  # KeyboardInterrupt: Huey's forced shutdown
        _disarm_hard_timeout()
        job, attempt = _reset_session(job_id, attempt_id)
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
        job, attempt = _reset_session(job_id, attempt_id)
        timed_out = _caused_by(exc, TaskTimeout)
        error = reason(timed_out or exc)
        retry = not is_permanent(exc) and _tries(job) < max_attempts
        keep_part = retry and _may_keep_part(exc, files)
        owned = True
        try:
            _save(job.id, claim, commit=False,
                  state=JobState.RETRYING if retry else JobState.FAILED,
                  error=error, lease_expires_at=None, enqueued_at=None,
                  finished_at=None if retry else utcnow(),
                  **({} if keep_part else {"checkpoint": None}))
        except (Cancelled, LostClaim) as outcome:
            retry, owned = False, isinstance(outcome, Cancelled)
        attempt.outcome = "timed_out" if timed_out else "failed"
        attempt.error, attempt.finished_at = error, utcnow()
        attempt.traceback = "".join(format_exception(exc))[-20_000:]
        if owned and not retry:
            db.session.flush()  # refresh() would overwrite the attempt's unsaved outcome
            db.session.refresh(job)
            signals.export_finished.send(current_app._get_current_object(), job=job)
        db.session.commit()
        if owned and not keep_part:  # a failed or cancelled job leaves no part behind
            files.discard_parts(job.id)
        raise AttemptFailed(error, retry, attempt.number) from exc
    finally:
        heartbeat.done.set()
    attempt.finished_at = utcnow()
    db.session.commit()


def _export(job: ExportJob, attempt: JobAttempt, claim: str, files: LocalStorage,
            on_checkpoint: Callable[[Checkpoint], None]) -> None:
    """Write the job's file from its checkpoint, publish it, and mark the job succeeded in the
    session (the caller commits).

    Every instant is safe to die in: the checkpoint names the part holding its bytes and their
    digest, so the next claim copies a verified prefix into a part of its own (or starts over,
    noting why); a complete checkpoint is only published; a file published before the commit
    that should have followed is recognised by its length and digest and not written again.
    """
    dataset = DATASETS.get(job.dataset)
    if dataset is None:
        raise PermanentFailure(f"The dataset {job.dataset!r} no longer exists.")
    params = dataset.clean_params(job.params)
    start = Checkpoint.from_json(job.checkpoint)
    if job.format not in RESUMABLE and not start.complete:
        start = Checkpoint()
    if start.complete and start.part:
        published = files.final_name(start.part)
        if files.verify(published, start.bytes, start.sha256):
            _disarm_hard_timeout()
            _succeed(job, claim, published, start)
            return
    keep = Prefix(start.part, start.bytes, start.sha256) if start.part and start.bytes else None
    out, problem = files.open_part(job.id, attempt.number, job.format, keep)
    with out:
        if problem:
            attempt.note = f"Started over from the first row: {problem}."
            log.warning("job %s: %s", job.id, attempt.note)
            start = Checkpoint()
        elif keep:  # the copy is this claim's now: say so before the old part goes
            start = replace(start)
            _checkpoint(out, start, on_checkpoint, complete=start.complete)
        files.discard_parts(job.id, keep=out.name)
        if start.complete:  # every row is in the copied prefix
            position = start
        else:
            with db.engine.connect() as conn:
                if job.rows_total is None:
                    total = conn.execute(dataset.count(job.org_id, params)).scalar_one()
                    _save(job.id, claim, rows_total=total,
                          lease_expires_at=utcnow() + _lease())
                position = stream(conn, dataset, job.org_id, params, out, start, on_checkpoint,
                                  current_app.config["EXPORT_BATCH_ROWS"],
                                  current_app.config["CHECKPOINT_INTERVAL"], job.format,
                                  current_app.config["CSV_BOM"])
    _disarm_hard_timeout()  # the rest is short and must not be cut in half
    published = files.publish(out)
    fault("published")
    _succeed(job, claim, published, position)


def _succeed(job: ExportJob, claim: str, published: str, final: Checkpoint) -> None:
    """Mark the job succeeded with its file and digest, and record the owner's email, in the
    session's transaction (while this worker still holds its claim)."""
    _save(job.id, claim, commit=False, state=JobState.SUCCEEDED, file_name=published,
          sha256=final.sha256, bytes=final.bytes, rows_done=final.rows, finished_at=utcnow(),
          lease_expires_at=None)
    dispatch.on_commit(db.session(), lambda: fault("committed"))  # before the email's send
    db.session.refresh(job)
    signals.export_finished.send(current_app._get_current_object(), job=job)


def _may_keep_part(exc: BaseException, files: LocalStorage) -> bool:
    """Whether a failed attempt that will be retried keeps its part to resume from: not when
    the disk is full (the part would fail the next export too), nor beyond EXPORT_PARTS_BUDGET
    bytes of parts on disk."""
    full = _caused_by(exc, OSError)
    if full is not None and full.errno in (errno.ENOSPC, errno.EDQUOT):
        return False
    try:
        return files.parts_bytes() <= current_app.config["EXPORT_PARTS_BUDGET"]
    except OSError:
        return False


def _process_gone(pid: int) -> bool:
    """True when no process `pid` runs on this host (or only its zombie, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return not os.path.exists(f"/proc/{pid}")


def release_dead_claims() -> list[int]:
    """Jobs claimed by worker processes of this host that are gone: released (retrying, to be
    sent again by the caller) now; returns their ids.

    A consumer calls it when it starts and whenever it checks its workers, so an export whose
    worker died resumes within seconds instead of after its lease. A dead worker of another
    host cannot be seen from here: its jobs wait for the lease (jobs.dispatch.reconcile).
    A job cancelled while running whose worker died before it stopped gets its attempt ended
    and its parts removed (the worker would have done both).
    """
    prefix = f"{host()}:"
    claims = db.session.execute(
        select(ExportJob.id, ExportJob.claimed_by, ExportJob.state).where(
            ExportJob.state.in_((JobState.RUNNING, JobState.CANCELLED)),
            ExportJob.claimed_by.startswith(prefix, autoescape=True),
            ExportJob.attempts.any(JobAttempt.finished_at.is_(None)))
    ).all()
    db.session.rollback()
    released = []
    for job_id, claim, state in claims:
        pid = claim[len(prefix):].partition("#")[0]
        if not pid.isdigit() or not _process_gone(int(pid)):
            continue
        gone = f"its worker process ({claim.partition('#')[0]}) is gone"
        if state == JobState.CANCELLED:
            db.session.execute(
                update(JobAttempt)
                .where(JobAttempt.job_id == job_id, JobAttempt.finished_at.is_(None))
                .values(outcome="cancelled", finished_at=utcnow(), error=gone))
            db.session.commit()
            storage().discard_parts(job_id)
            continue
        moved = db.session.execute(
            update(ExportJob)
            .where(ExportJob.id == job_id, ExportJob.claimed_by == claim,
                   ExportJob.state == JobState.RUNNING)
            .values(state=JobState.RETRYING, claimed_by=None, lease_expires_at=None,
                    enqueued_at=None)
        ).rowcount
        if moved:
            db.session.execute(
                update(JobAttempt)
                .where(JobAttempt.job_id == job_id, JobAttempt.finished_at.is_(None))
                .values(outcome="lost", finished_at=utcnow(), error=gone)
            )
        db.session.commit()
        if moved:
            released.append(job_id)
    if released:
        log.info("jobs of this host's dead workers go back on their lane: %s", released)
    return released
