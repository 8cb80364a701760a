"""The web app's only door into the lanes: submit and email after commit, cancel, retry (of
exports and of emails), reconcile, pause and resume a lane, and lane health."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from webapp.models import (
    EmailState,
    ExportJob,
    JobAttempt,
    JobState,
    OutboundEmail,
    db,
    utcnow,
)

log = logging.getLogger(__name__)
_PENDING = "exportdesk.after_commit"

CANCELLABLE = JobState.ACTIVE  # queued, running, retrying
RETRYABLE = (JobState.FAILED, JobState.CANCELLED)


class WrongState(Exception):
    """The job is not in a state that allows this operation; the message says why, for people."""


def on_commit(session: Session, send: Callable[[], None]) -> None:
    """Run `send` once the session's current transaction commits; forget it on rollback.

    Flask-SQLAlchemy has no on_commit: without it a fast worker can pick up a job whose row
    the web request has not committed yet, and find nothing.
    """
    session.info.setdefault(_PENDING, []).append(send)


@event.listens_for(Session, "after_commit")
def _send_pending(session: Session) -> None:
    for send in session.info.pop(_PENDING, []):
        try:
            send()
        except Exception as exc:  # the job row stays queued; the reconciler sends it later
            log.warning("could not hand a committed job to its lane (%s: %s); "
                        "the reconciler will send it", type(exc).__name__, exc)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def submit(job: ExportJob) -> None:
    """Hand the (flushed) job to its lane after the transaction that created it commits."""
    job_id = job.id
    on_commit(db.session(), lambda: send(job_id))


def send(job_id: int) -> None:
    """Put a committed job's message on its lane now; raises if the broker is unreachable."""
    from jobs.tasks import run_export

    run_export(job_id)
    mark_enqueued(job_id)


def mark_enqueued(job_id: int) -> None:
    """Record, in a short transaction of its own, that the lane has accepted a message."""
    with db.engine.begin() as conn:
        conn.execute(update(ExportJob).where(ExportJob.id == job_id)
                     .values(enqueued_at=utcnow()))


def reconcile(grace: float) -> list[int]:
    """Send every job that waits for a message its lane never got; returns the ids sent.

    Two cases: a queued or retrying job whose send failed or never happened (broker down, web
    or worker process gone between commit and send) once it is `grace` seconds old, and a
    running job whose lease lapsed (its worker died). A message sent twice is harmless: the
    claim step in jobs.engine runs a job only once at a time.
    """
    now = utcnow()
    lapsed = select(ExportJob.id).where(ExportJob.state == JobState.RUNNING,
                                        ExportJob.lease_expires_at < now)
    db.session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id.in_(lapsed), JobAttempt.finished_at.is_(None))
        .values(outcome="lost", finished_at=now,
                error="the worker stopped responding (its lease lapsed)")
    )
    db.session.execute(
        update(ExportJob)
        .where(ExportJob.state == JobState.RUNNING, ExportJob.lease_expires_at < now)
        .values(state=JobState.RETRYING, enqueued_at=None, claimed_by=None)
    )
    db.session.commit()
    waiting = db.session.scalars(
        select(ExportJob.id).where(
            ExportJob.state.in_((JobState.QUEUED, JobState.RETRYING)),
            ExportJob.enqueued_at.is_(None),
            ExportJob.created_at <= now - timedelta(seconds=grace),
        ).order_by(ExportJob.id)
    ).all()
    db.session.commit()
    sent: list[int] = []
    for job_id in waiting:
        try:
            send(job_id)
        except Exception as exc:
            log.warning("reconciler: lane still unreachable (%s: %s); %d job(s) wait",
                        type(exc).__name__, exc, len(waiting) - len(sent))
            break
        sent.append(job_id)
    if sent:
        log.info("reconciler sent %d job(s) that never reached their lane: %s", len(sent), sent)
    return sent


def send_email_after_commit(email: OutboundEmail) -> None:
    """Hand the (flushed) email to the critical lane once the transaction recording it commits."""
    from jobs.tasks import send_email

    email_id = email.id
    on_commit(db.session(), lambda: send_email(email_id))


def _move(row: ExportJob | OutboundEmail, allowed: tuple[str, ...], **values) -> bool:
    """Change a job's or an email's row only if it is still in an allowed state: a worker may
    have moved it since we read it, and a plain read-then-write would overwrite what the
    worker wrote."""
    model = type(row)
    moved = db.session.execute(
        update(model)
        .where(model.id == row.id, model.state.in_(allowed))
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    db.session.refresh(row)
    return bool(moved)


def cancel(job: ExportJob) -> None:
    """Cancel a queued, retrying or running job; the caller commits.

    A waiting job is finished at once: its queue message stays behind, and the engine skips it
    because it only claims queued or retrying jobs (Huey cannot revoke a message by job id).
    A running job stops cooperatively at its next checkpoint, removing its part file.
    """
    if not _move(job, CANCELLABLE, state=JobState.CANCELLED, finished_at=utcnow()):
        raise WrongState(f"Export #{job.id} is {job.state}: only queued or running exports "
                         "can be cancelled.")
    log.info("job %s cancelled", job.id)


def retry(job: ExportJob, from_scratch: bool = False) -> None:
    """Put a failed or cancelled job back on its lane (after the caller commits).

    It resumes from its checkpoint when the part file is still there, else starts over;
    `from_scratch` starts over anyway (the part file is removed).
    A cancelled job whose worker has not yet reached a checkpoint is still writing: refuse
    until it has stopped, so two workers never write the same part file.
    """
    from jobs.engine import Checkpoint, storage

    if job.state not in RETRYABLE:
        raise WrongState(f"Export #{job.id} is {job.state}: only failed or cancelled exports "
                         "can be retried.")
    if any(attempt.finished_at is None for attempt in job.attempts):
        raise WrongState(f"Export #{job.id} is still stopping; try again in a moment.")
    # started_at marks the restart: the engine counts attempts from here (a fresh allowance).
    values: dict = dict(state=JobState.QUEUED, error=None, started_at=utcnow(), finished_at=None,
                        claimed_by=None, lease_expires_at=None, enqueued_at=None)
    part = storage().part_size(job.id, job.format)
    if from_scratch or part is None or part < Checkpoint.from_json(job.checkpoint).bytes:
        values.update(checkpoint=None, rows_done=0, bytes=0)
    if not _move(job, RETRYABLE, **values):
        raise WrongState(f"Export #{job.id} is {job.state}: only failed or cancelled exports "
                         "can be retried.")
    if from_scratch:  # no worker holds it (checked above), so the part file is ours to remove
        storage().discard_part(job.id, job.format)
    submit(job)
    log.info("job %s retried from row %s", job.id, job.rows_done)


def cancel_email(email: OutboundEmail) -> None:
    """Cancel an email task of the critical lane; the caller commits.

    A waiting one is cancelled at once and its queue message does nothing (the worker claims
    only queued or retrying emails). One being sent cannot be interrupted: that attempt ends
    by itself, at the latest at the lane's hard timeout, and is not retried. Should it still
    reach the server, the row says sent, which is then the truth.
    """
    if not _move(email, EmailState.CANCELLABLE, state=EmailState.CANCELLED):
        raise WrongState(f"Email {email.id} is {email.state}: only queued, retrying or sending "
                         "emails can be cancelled.")
    log.info("email %s cancelled", email.id)


def retry_email(email: OutboundEmail) -> None:
    """Send a failed or cancelled email again, with a fresh allowance of attempts, once the
    caller commits."""
    if not _move(email, EmailState.RETRYABLE, state=EmailState.QUEUED, attempts=0, error=None):
        raise WrongState(f"Email {email.id} is {email.state}: only failed or cancelled emails "
                         "can be retried.")
    send_email_after_commit(email)
    log.info("email %s retried", email.id)


def _lane(name: str):
    from jobs.lanes import LANES

    if name not in LANES:
        raise KeyError(name)
    return LANES[name]


def pause(lane: str) -> None:
    """Its consumers take nothing new (running tasks finish); queued work waits."""
    _lane(lane).pause()
    log.info("lane %s paused", lane)


def resume(lane: str) -> None:
    _lane(lane).resume()
    log.info("lane %s resumed", lane)


def paused(lane: str) -> bool:
    return _lane(lane).paused


def lane_health() -> list[dict]:
    """Every lane's health: the one read the admin pages, /api/lanes and /metrics share.

    Each is Lane.health() (depth, oldest_wait, running, consumers, workers, completed_5m,
    failed_5m) plus `paused` and `minutes`: [minute, completed, failed] for the last hour.
    """
    from jobs.lanes import LANES

    report = []
    for lane in LANES.values():
        health = lane.health()
        health["paused"] = lane.paused
        health["minutes"] = [list(m) for m in lane.minutes(60)]
        report.append(health)
    return report
