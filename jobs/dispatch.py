"""The web app's only door into the lanes: submit after commit, cancel, retry (later: health)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event, update
from sqlalchemy.orm import Session

from webapp.models import ExportJob, JobState, db, utcnow

log = logging.getLogger(__name__)
_PENDING = "exportdesk.after_commit"

CANCELLABLE = JobState.ACTIVE  # queued, running, retrying
RETRYABLE = (JobState.FAILED, JobState.CANCELLED)


class WrongState(Exception):
    """The job is not in a state that allows this operation; the message says why, for people."""


def on_commit(session: Session, send: Callable[[], None]) -> None:
    """Run `send` once the session's current transaction commits; forget it on rollback."""
    session.info.setdefault(_PENDING, []).append(send)


@event.listens_for(Session, "after_commit")
def _send_pending(session: Session) -> None:
    for send in session.info.pop(_PENDING, []):
        try:
            send()
        except Exception:  # the job row stays queued; the reconciler sends it again
            log.exception("could not hand a committed job to its lane")


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def submit(job: ExportJob) -> None:
    """Hand the (flushed) job to its lane after the transaction that created it commits."""
    from jobs.tasks import run_export

    job_id = job.id
    on_commit(db.session(), lambda: run_export(job_id))


def _move(job: ExportJob, allowed: tuple[str, ...], **values) -> bool:
    """Change the row only if it is still in an allowed state: a worker may have moved it since
    we read it, and a plain read-then-write would overwrite what the worker wrote."""
    moved = db.session.execute(
        update(ExportJob)
        .where(ExportJob.id == job.id, ExportJob.state.in_(allowed))
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    db.session.refresh(job)
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


def retry(job: ExportJob) -> None:
    """Put a failed or cancelled job back on its lane (after the caller commits).

    It resumes from its checkpoint when the part file is still there, else starts over.
    A cancelled job whose worker has not yet reached a checkpoint is still writing: refuse
    until it has stopped, so two workers never write the same part file.
    """
    from jobs.engine import Checkpoint, storage

    if job.state not in RETRYABLE:
        raise WrongState(f"Export #{job.id} is {job.state}: only failed or cancelled exports "
                         "can be retried.")
    if any(attempt.finished_at is None for attempt in job.attempts):
        raise WrongState(f"Export #{job.id} is still stopping; try again in a moment.")
    values: dict = dict(state=JobState.QUEUED, error=None, started_at=None, finished_at=None)
    part = storage().part_size(job.id, job.format)
    if part is None or part < Checkpoint.from_json(job.checkpoint).bytes:
        values.update(checkpoint=None, rows_done=0, bytes=0)
    if not _move(job, RETRYABLE, **values):
        raise WrongState(f"Export #{job.id} is {job.state}: only failed or cancelled exports "
                         "can be retried.")
    submit(job)
    log.info("job %s retried from row %s", job.id, job.rows_done)
