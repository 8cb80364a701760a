"""The export engine: claim a job, keep its lease, save its checkpoints, run it to its file.

A little over 400 lines on purpose: claim, lease, checkpoint saves and the attempt's ending are
one protocol on the job row (who holds the claim, when it lapses, what an ending writes), and
reading it in one place is what lets each instant be checked against a crash.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from traceback import format_exception

from flask import current_app
from huey.exceptions import TaskTimeout
from sqlalchemy import Select, func, select, update

from jobs import datasets, dispatch, lanes, signals, source
from jobs.checkpoints import Checkpoint, fault, record_checkpoint
from jobs.failures import AttemptFailed, PermanentFailure, caused_by, is_permanent, reason
from jobs.formats import RESUMABLE, stream
from jobs.models import ExportJob, JobAttempt, JobState, User, db, locked, utcnow
from jobs.storage import PartsChanged, Prefix, Storage, storage

log = logging.getLogger(__name__)


def host() -> str:
    """This machine's name in claims (WORKER_HOST overrides it, e.g. in containers whose
    hostnames repeat)."""
    return os.environ.get("WORKER_HOST") or socket.gethostname()


def worker_name() -> str:
    return f"{host()}:{os.getpid()}"


class Cancelled(Exception):
    """The job was cancelled while it ran: stop between batches."""


class LostClaim(Exception):
    """Another worker took the job over after this one's lease lapsed: stop, touch nothing."""


class Deferred(Exception):
    """The owner already has their share of running exports: try again shortly."""


class Interrupted(Exception):
    """The consumer is shutting down: the job was checkpointed and must go back on its lane."""


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
    if dispatch.stopping(job):  # retried while its cancelled attempt still stops
        if job.lease_expires_at is not None and job.lease_expires_at > now:
            db.session.rollback()
            raise Deferred  # that worker still writes its part: look again shortly
        dispatch.end_stopped_attempt(job, "the worker stopped responding (its lease lapsed)")
        fault("ended_stopped")
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
    state, holder = db.session.execute(
        select(ExportJob.state, ExportJob.claimed_by).where(ExportJob.id == job_id)).one()
    db.session.rollback()
    # Still our claim but no longer running: cancelled, maybe retried since (dispatch.retry
    # leaves the claim to the attempt that has to stop).
    raise Cancelled if state == JobState.CANCELLED or holder == claim else LostClaim


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


@contextmanager
def _sigterm_noted() -> Iterator[None]:
    """A SIGTERM reaching a Huey worker raises KeyboardInterrupt in its main thread; raised
    inside a callback of SQLite's (the source's authorizer or progress handler), it is
    swallowed and the statement fails as "not authorized" instead. The signal is noted here,
    so that an error raised after it is the interruption it stands for (the job goes back to
    the queue), not a failed attempt. Only where a Python handler is installed (a worker's
    main thread): the default action, killing the process, stays as it is elsewhere."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = False

    def noted(signum: int, frame) -> None:
        nonlocal seen
        seen = True
        previous(signum, frame)

    signal.signal(signal.SIGTERM, noted)
    try:
        yield
    except Exception as exc:
        if seen:
            raise KeyboardInterrupt from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        with _sigterm_noted():
            _export(job, attempt, claim, files, on_checkpoint)
        attempt.outcome = "succeeded"
    except Cancelled:
        db.session.rollback()
        locked(ExportJob, job_id)  # a retry's new attempt claims under this lock: not meanwhile
        db.session.refresh(attempt)
        if attempt.finished_at is not None:  # ended for us (our lease lapsed): touch nothing
            db.session.commit()
            return
        files.discard_parts(job.id)
        attempt.outcome = "cancelled"
    except LostClaim:
        db.session.rollback()
        db.session.refresh(attempt)
        if attempt.outcome not in (None, "lost"):  # ended for us (cancelled by the claim that
            db.session.commit()  # took over): that stands; "lost" we now know more about
            return
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
        timed_out = caused_by(exc, TaskTimeout)
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
        if owned and not keep_part:  # a failed or cancelled job leaves no part behind; before
            files.discard_parts(job.id)  # the commit ends the attempt, which a retry waits for
        db.session.commit()
        raise AttemptFailed(error, retry, attempt.number) from exc
    finally:
        heartbeat.done.set()
    attempt.finished_at = utcnow()
    db.session.commit()


def _export(job: ExportJob, attempt: JobAttempt, claim: str, files: Storage,
            on_checkpoint: Callable[[Checkpoint], None]) -> None:
    """Write the job's file from its checkpoint, publish it, and mark the job succeeded in the
    session (the caller commits).

    Every instant is safe to die in: the checkpoint names the part holding its bytes and their
    digest, so the next claim copies a verified prefix into a part of its own (or starts over,
    noting why); a complete checkpoint is only published; a file published before the commit
    that should have followed is recognised by its length and digest and not written again.
    """
    dataset = datasets.get(job.dataset)
    if dataset is None:
        raise PermanentFailure(f"The dataset {job.dataset!r} no longer exists.")
    params = dataset.clean_params(job.params)
    start = Checkpoint.from_json(job.checkpoint).resume_point()
    changed = job.definition is not None and job.definition != dataset.fingerprint
    if job.definition != dataset.fingerprint:
        values: dict = {"definition": dataset.fingerprint}
        if changed and (start.rows or start.part):  # never one file from two definitions
            attempt.note = (f"Started over from the first row: the dataset {dataset.name!r} "
                            "was redefined after its first rows were written.")
            log.warning("job %s: %s", job.id, attempt.note)
            start = Checkpoint()
            values.update(checkpoint=None, rows_done=0, bytes=0, rows_total=None)
        _save(job.id, claim, **values)
    if job.format not in RESUMABLE and not start.complete:
        start = Checkpoint()
    if start.complete and start.part:
        published = files.final_name(start.part)
        if files.verify(published, start.bytes, start.sha256):
            _disarm_hard_timeout()
            _succeed(job, claim, files, published, start)
            return
    keep = (Prefix(start.part, start.bytes, start.sha256, start.upload)
            if start.part and (start.bytes or start.upload) else None)
    out, problem = files.open_part(job.id, attempt.number, job.format, keep)
    with out:
        if problem:
            attempt.note = f"Started over from the first row: {problem}."
            log.warning("job %s: %s", job.id, attempt.note)
            start = Checkpoint()
        elif keep:  # the copy is this claim's now: say so before the old part goes
            start = replace(start)
            record_checkpoint(out, start, on_checkpoint, complete=start.complete)
        files.discard_parts(job.id, keep=out.name)
        if start.complete:  # every row is in the copied prefix
            position = start
        else:
            org_key = job.organisation.data_key_or_id
            counting = None
            if job.rows_total is None:  # at once when a limit (max_rows) holds the export
                after = 0.0 if dataset.max_rows else current_app.config["COUNT_AFTER"]
                counting = _Count(dataset.count(org_key, params), after)
            else:
                _check_size(dataset, job.rows_total)

            def checkpoint(cp: Checkpoint) -> None:
                """Save the count with the first checkpoint after it came back; the last
                saves the rows written instead (exact, and no wait for a count)."""
                nonlocal counting
                total = cp.rows if cp.complete else counting and counting.result()
                if total is not None:
                    if counting is not None:
                        counting.close()
                        counting = None
                    _check_size(dataset, total)
                    _save(job.id, claim, commit=False, rows_total=total)
                on_checkpoint(cp)

            try:
                with source.connect() as conn:
                    position = stream(conn, dataset, org_key, params, out, start, checkpoint,
                                      current_app.config["EXPORT_BATCH_ROWS"],
                                      current_app.config["CHECKPOINT_INTERVAL"], job.format,
                                      current_app.config["CSV_BOM"])
            finally:
                if counting is not None:
                    counting.close()
    _disarm_hard_timeout()  # the rest is short and must not be cut in half
    published = files.publish(out)
    fault("published")
    _succeed(job, claim, files, published, position)


class _Count:
    """The export's rows, counted on a connection of its own while they are written, from
    `after` seconds in: the count costs a tenth of a million-row export's time (its CPU is the
    pages' CPU), which an export done sooner does not spend on a progress bar nobody would see
    (the pages poll every one or two seconds)."""

    def __init__(self, query: Select, after: float):
        app = current_app._get_current_object()
        self._closed = threading.Event()

        def count() -> int | None:
            if self._closed.wait(after):
                return None
            with app.app_context(), source.connect() as conn:
                return conn.execute(query).scalar_one()

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="count")
        self._counted = self._pool.submit(count)

    def result(self) -> int | None:
        """The count once it came back (its error raised here), else None."""
        return self._counted.result() if self._counted.done() else None

    def close(self) -> None:
        """Do not wait: a count the export no longer needs ends within the statement timeout."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_size(dataset: datasets.Dataset, total: int) -> None:
    if dataset.max_rows is not None and total > dataset.max_rows:
        raise PermanentFailure(f"This export has {total:,} rows; {dataset.title} allows at most "
                               f"{dataset.max_rows:,}. Narrow the filters.")


def _succeed(job: ExportJob, claim: str, files: Storage, published: str,
             final: Checkpoint) -> None:
    """Mark the job succeeded with its file and digest, and record the owner's email, in the
    session's transaction (while this worker still holds its claim). A digest the checkpoint
    could not know (a bucket's upload resumed on another worker) is read back from the file."""
    _save(job.id, claim, commit=False, state=JobState.SUCCEEDED, file_name=published,
          sha256=final.sha256 or files.sha256(published), bytes=final.bytes,
          rows_done=final.rows, finished_at=utcnow(),
          lease_expires_at=None)
    dispatch.on_commit(db.session(), lambda: fault("committed"))  # before the email's send
    db.session.refresh(job)
    signals.export_finished.send(current_app._get_current_object(), job=job)


def _may_keep_part(exc: BaseException, files: Storage) -> bool:
    """Whether a failed attempt that will be retried keeps its part to resume from: not when
    the disk is full (the part would fail the next export too) or the part no longer matches
    the rows (PartsChanged), nor beyond EXPORT_PARTS_BUDGET bytes of parts."""
    if caused_by(exc, PartsChanged):
        return False
    full = caused_by(exc, OSError)
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
            ExportJob.state.in_((*JobState.ACTIVE, JobState.CANCELLED)),
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
        if state != JobState.RUNNING:  # cancelled (maybe retried since) while it ran
            job = locked(ExportJob, job_id)
            if job is not None and job.claimed_by == claim:
                dispatch.end_stopped_attempt(job, gone)
            db.session.commit()
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
