"""The web app's only door into the lanes: submit and email after commit, cancel, retry (of
exports and of emails), reconcile, pause and resume a lane, and lane health."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from jobs import lanes
from jobs.lanes import LANES
from jobs.mail import EMAIL_ATTEMPTS
from jobs.models import (
    EmailState,
    ExportJob,
    JobAttempt,
    JobState,
    OutboundEmail,
    db,
    locked,
    utcnow,
)
from jobs.storage import storage

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
    lanes.exports.send("export", job_id)
    mark_enqueued(job_id)


def mark_enqueued(job_id: int) -> None:
    """Record, in a short transaction of its own, that the lane has accepted a message."""
    with db.engine.begin() as conn:
        conn.execute(update(ExportJob).where(ExportJob.id == job_id)
                     .values(enqueued_at=utcnow()))


def reconcile(grace: float) -> list[int]:
    """Send every job whose message its lane does not have (emails too); returns the job ids.

    The database knows what should be waiting; the broker may not. Each case waits until the
    row is `grace` seconds old, so a send in progress is not taken for a lost one:

    - never sent: a queued or retrying job whose `enqueued_at` is NULL (the broker was down at
      the send, or the web or worker process died between commit and send);
    - lost by the broker: a queued or retrying job whose message did reach its lane and is no
      longer in the lane's queue or schedule (Redis restarted without persistence, failed
      over, evicted keys under `maxmemory`, FLUSHALL; a deleted SQLite queue file). A job
      whose message is still in the queue, however long the line, or in the schedule (a retry
      due later) is left alone, so the reconciler never floods a busy lane;
    - abandoned: a running job whose lease lapsed (its worker died) goes back to retrying and
      is sent like the first case.

    Emails get the first two cases too (`reconcile_emails`). A message sent twice anyway is
    harmless: the claim in jobs.engine runs a job once at a time, mail.deliver sends once.
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
    # Cancelled while running, its worker died before it could stop: end it as the worker would.
    # Retried meanwhile (queued again), the same: the new attempt waits for this one's end.
    stopped = _ids(select(ExportJob.id).where(
        ExportJob.state != JobState.RUNNING, ExportJob.lease_expires_at < now,
        ExportJob.attempts.any(JobAttempt.finished_at.is_(None))))
    for job_id in stopped:
        job = locked(ExportJob, job_id)
        if job is not None and job.lease_expires_at is not None and job.lease_expires_at < now:
            end_stopped_attempt(job, "the worker stopped responding (its lease lapsed)")
        db.session.commit()
    cutoff = now - timedelta(seconds=grace)
    waiting = ExportJob.state.in_((JobState.QUEUED, JobState.RETRYING))
    unsent = _ids(select(ExportJob.id).where(waiting, ExportJob.enqueued_at.is_(None),
                                             ExportJob.created_at <= cutoff))
    sent = _send_each(unsent, send, "job(s) that never reached their lane")
    lost = _lost(lanes.exports, "export",
                 select(ExportJob.id).where(waiting, ExportJob.enqueued_at <= cutoff))
    sent += _send_each(lost, send, "job(s) their lane lost")
    reconcile_emails(grace)
    return sent


def reconcile_emails(grace: float) -> list[int]:
    """Send again every email the critical lane does not hold although it waits to be sent:
    queued or retrying for `grace` seconds, attempts left, and its message in neither the
    lane's queue nor its schedule (where Huey keeps its retries). That covers a hand-over that
    failed (the broker was down at commit) and a message the broker lost. Returns their ids.

    An email `sending` for longer than the critical lane's hard timeout lost its worker during
    the send (killed, or its database connection cut): it is retried, so it is sent at least
    once; the server may have it already if the worker died in the instant between the
    server's answer and the commit (docs/email.md)."""
    now = utcnow()
    stale = now - timedelta(seconds=lanes.critical.settings.timeout + grace)
    attempts = OutboundEmail.attempts
    for left, state in ((attempts < EMAIL_ATTEMPTS, EmailState.RETRYING),
                        (attempts >= EMAIL_ATTEMPTS, EmailState.FAILED)):
        db.session.execute(
            update(OutboundEmail)
            .where(OutboundEmail.state == EmailState.SENDING, OutboundEmail.claimed_at < stale,
                   left)
            .values(state=state, error="its worker stopped while sending it")
        )
    db.session.commit()
    cutoff = now - timedelta(seconds=grace)
    lost = _lost(lanes.critical, "send_email", select(OutboundEmail.id).where(
        OutboundEmail.state.in_(EmailState.CLAIMABLE), OutboundEmail.attempts < EMAIL_ATTEMPTS,
        OutboundEmail.created_at <= cutoff))
    return _send_each(lost, send_email, "email(s) their lane lost or never got")


def send_email(email_id: int) -> None:
    """Put a recorded email's message on the critical lane now."""
    lanes.critical.send("send_email", email_id)


# A message a worker has just taken (not yet claimed, or on its way back to the schedule, as
# a fair-share deferral is every second) is in no queue: what looks lost is looked for again
# this much later, so a lane is never sent a second copy of what it is busy with.
LOOK_AGAIN_SECONDS = 0.5


def _ids(query) -> list[int]:
    ids = list(db.session.scalars(query.order_by(query.selected_columns[0])))
    db.session.commit()  # end the read, so that a second look sees what workers did since
    return ids


def _lost(lane: lanes.Lane, task_name: str, waiting) -> list[int]:
    """Ids the query `waiting` finds that `lane` does not hold for `task_name`, looked at twice.

    The lane is read before the database each time: a message a worker takes in between
    belongs to a row that has stopped waiting (claimed), not to a lost one. An unreachable
    lane loses nothing more: the next run looks again.
    """
    try:
        held = lane.held(task_name)
        lost = [i for i in _ids(waiting) if i not in held]
        if lost:
            time.sleep(LOOK_AGAIN_SECONDS)
            held, first = lane.held(task_name), set(lost)
            lost = [i for i in _ids(waiting) if i in first and i not in held]
    except Exception as exc:
        db.session.rollback()
        log.warning("reconciler: cannot read lane %s (%s: %s); looking again next time",
                    lane.name, type(exc).__name__, exc)
        return []
    return lost


def _send_each(ids: list[int], send_one: Callable[[int], object], what: str) -> list[int]:
    """Send each id in turn; stop at the first failure (the lane is down: the rest wait too)."""
    sent: list[int] = []
    for item in ids:
        try:
            send_one(item)
        except Exception as exc:
            log.warning("reconciler: lane still unreachable (%s: %s); next run sends %s: %s",
                        type(exc).__name__, exc, what, ids[len(sent):])
            break
        sent.append(item)
    if sent:
        log.info("reconciler sent %d %s: %s", len(sent), what, sent)
    return sent


def send_email_after_commit(email: OutboundEmail) -> None:
    """Hand the (flushed) email to the critical lane once the transaction recording it commits."""
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


# How a state reads after "Export #12 " or "Email 7 ", in refusals people read.
STATE_WORDS = {
    "queued": "is waiting to start", "running": "is running",
    "retrying": "is waiting to be tried again", "sending": "is being sent",
    "succeeded": "has already succeeded", "sent": "has already been sent",
    "failed": "has already failed", "cancelled": "has already been cancelled",
    "expired": "has expired",
}


def _is(state: str) -> str:
    """A state as words ("has already succeeded", not "is succeeded")."""
    return STATE_WORDS.get(state, f"is {state}")


def cancel(job: ExportJob) -> None:
    """Cancel a queued, retrying or running job; the caller commits.

    A waiting job is finished at once: its queue message stays behind, and the engine skips it
    because it only claims queued or retrying jobs (Huey cannot revoke a message by job id).
    A running job stops cooperatively at its next checkpoint, removing its part file.
    """
    # A job retried while its cancelled attempt still stops is queued, yet that worker writes.
    job_id, waiting = job.id, job.state != JobState.RUNNING and not stopping(job)
    if not _move(job, CANCELLABLE, state=JobState.CANCELLED, finished_at=utcnow(),
                 checkpoint=None):
        raise WrongState(f"Export #{job.id} {_is(job.state)}: only queued or running exports "
                         "can be cancelled.")
    if waiting:  # no worker holds it: its part (kept for a retry) goes now
        on_commit(db.session(), lambda: _discard_parts(job_id))
    log.info("job %s cancelled", job.id)


def retry(job: ExportJob, from_scratch: bool = False) -> None:
    """Put a failed or cancelled job back on its lane (after the caller commits).

    It resumes from its checkpoint when a part verified against it is still there (the engine
    checks, and starts over otherwise); `from_scratch` starts over anyway.
    A job cancelled while running whose worker has not reached a checkpoint yet is still
    writing: the retry is accepted all the same, but the job keeps that worker's claim and
    lease, so the worker still sees its cancel (and removes its part) at its next checkpoint,
    and the engine claims the job for a new attempt only once that attempt has ended (or its
    lease lapsed): a new attempt never writes while the old one still runs.
    """
    if job.state not in RETRYABLE:
        raise WrongState(f"Export #{job.id} {_is(job.state)}: only failed or cancelled exports "
                         "can be retried.")
    still_stopping = stopping(job)
    # started_at marks the restart: the engine counts attempts from here (a fresh allowance).
    values: dict = dict(state=JobState.QUEUED, error=None, started_at=utcnow(), finished_at=None,
                        enqueued_at=None)
    if not still_stopping:
        values.update(claimed_by=None, lease_expires_at=None)
    part = (job.checkpoint or {}).get("part")
    if from_scratch or part not in _parts(job.id):  # nothing to resume from: start over
        values.update(checkpoint=None, rows_done=0, bytes=0)
    if not _move(job, RETRYABLE, **values):
        raise WrongState(f"Export #{job.id} {_is(job.state)}: only failed or cancelled exports "
                         "can be retried.")
    if from_scratch and not still_stopping:  # no worker holds it: its parts are ours to remove
        job_id = job.id
        on_commit(db.session(), lambda: _discard_parts(job_id))
    submit(job)
    log.info("job %s retried from row %s", job.id, job.rows_done)


def stopping(job: ExportJob) -> bool:
    """Whether an attempt of this (cancelled, or cancelled then retried) job has not ended yet:
    its worker may still write its part until its next checkpoint."""
    return job.state != JobState.RUNNING and any(
        attempt.finished_at is None for attempt in job.attempts)


def end_stopped_attempt(job: ExportJob, error: str) -> None:
    """End, as cancelled, the attempt of a cancelled (maybe since retried) job whose worker is
    gone or past its lease, and remove its parts, as that worker would have. The caller holds
    the job's row lock (`locked`) and commits: a new attempt, which claims under the same
    lock, cannot have opened a part of its own in between."""
    if not stopping(job):
        return
    db.session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == job.id, JobAttempt.finished_at.is_(None))
        .values(outcome="cancelled", finished_at=utcnow(), error=error)
        .execution_options(synchronize_session=False))
    db.session.expire(job, ["attempts"])
    _discard_parts(job.id)


def _parts(job_id: int) -> list[str]:
    return storage().parts(job_id)


def _discard_parts(job_id: int) -> None:
    storage().discard_parts(job_id)


def cancel_email(email: OutboundEmail) -> None:
    """Cancel an email task of the critical lane; the caller commits.

    A waiting one is cancelled at once and its queue message does nothing (the worker claims
    only queued or retrying emails). One being sent cannot be interrupted: that attempt ends
    by itself, at the latest at the lane's hard timeout, and is not retried. Should it still
    reach the server, the row says sent, which is then the truth.
    """
    if not _move(email, EmailState.CANCELLABLE, state=EmailState.CANCELLED):
        raise WrongState(f"Email {email.id} {_is(email.state)}: only queued, retrying or sending "
                         "emails can be cancelled.")
    log.info("email %s cancelled", email.id)


def retry_email(email: OutboundEmail) -> None:
    """Send a failed or cancelled email again, with a fresh allowance of attempts, once the
    caller commits."""
    if not _move(email, EmailState.RETRYABLE, state=EmailState.QUEUED, attempts=0, error=None):
        raise WrongState(f"Email {email.id} {_is(email.state)}: only failed or cancelled emails "
                         "can be retried.")
    send_email_after_commit(email)
    log.info("email %s retried", email.id)


def _lane(name: str):
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
    report = []
    for lane in LANES.values():
        health = lane.health()
        health["paused"] = lane.paused
        health["minutes"] = [list(m) for m in lane.minutes(60)]
        report.append(health)
    return report
