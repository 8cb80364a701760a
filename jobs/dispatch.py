"""The web app's only door into the lanes: submit jobs and send emails after commit."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session

from webapp.models import ExportJob, OutboundEmail, db

log = logging.getLogger(__name__)
_PENDING = "exportdesk.after_commit"


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


def send_email_after_commit(email: OutboundEmail) -> None:
    """Hand the (flushed) email to the critical lane once the transaction recording it commits."""
    from jobs.tasks import send_email

    email_id = email.id
    on_commit(db.session(), lambda: send_email(email_id))
