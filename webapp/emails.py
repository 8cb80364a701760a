"""The emails we send, composed as rows in the caller's transaction; the critical lane sends."""

from __future__ import annotations

import logging
from email.utils import make_msgid, parseaddr
from hashlib import sha256

from flask import Flask, current_app, render_template
from sqlalchemy import select

from jobs import datasets, dispatch, signals
from jobs.models import ExportJob, JobState, OutboundEmail, Schedule, User, db, utcnow
from webapp.tokens import DownloadGrant, download_token, invitation_token, reset_token

log = logging.getLogger(__name__)


def external_url(path: str) -> str:
    """An absolute link from BASE_URL, never from a request's Host header (which a caller
    controls: a reset link pointing at their host would hand them the token)."""
    return current_app.config["BASE_URL"] + path


def queue_email(key: str, kind: str, to: str, subject: str, template: str,
                job_id: int | None = None, **context) -> OutboundEmail | None:
    """Record an email once per `key` and send it through the critical lane after commit.

    Returns None when an email with this key exists already: retries, double clicks and
    duplicated tasks all end up as the one row, so the one message.
    """
    if db.session.scalar(select(OutboundEmail.id).where(OutboundEmail.key == key)) is not None:
        return None
    domain = parseaddr(current_app.config["MAIL_FROM"])[1].rpartition("@")[2] or "exportdesk"
    email = OutboundEmail(
        key=key,
        kind=kind,
        to_address=to,
        subject=subject,
        text_body=render_template(f"mail/{template}.txt", subject=subject, **context),
        html_body=render_template(f"mail/{template}.html", subject=subject, **context),
        message_id=make_msgid("exportdesk", domain=domain),
        job_id=job_id,
    )
    db.session.add(email)
    db.session.flush()
    dispatch.send_email_after_commit(email)
    return email


def _title(job: ExportJob) -> str:
    dataset = datasets.get(job.dataset)
    return dataset.title if dataset else job.dataset


def download_email(job: ExportJob, key: str, fresh: bool = False) -> OutboundEmail | None:
    """The owner's signed, expiring link to a finished export's file."""
    ttl = current_app.config["DOWNLOAD_LINK_TTL"]
    subject = (f"Your {_title(job)} export is ready ({job.rows_done:,} rows)" if not fresh else
               f"A fresh link to your {_title(job)} export ({job.rows_done:,} rows)")
    return queue_email(
        key, "download-link", job.user.email, subject, "export_ready", job_id=job.id,
        job=job, title=_title(job), fresh=fresh, expires=utcnow() + ttl,
        link=external_url(f"/d/{download_token(job)}"),
        page=external_url(f"/exports/{job.id}"),
    )


def init_app(app: Flask) -> None:
    """Answer the core's signals for this app: an export that ended, or a schedule that
    paused itself, emails its owner."""
    signals.export_finished.connect(_on_export_finished, app, weak=False)
    signals.schedule_paused.connect(_on_schedule_paused, app, weak=False)


def _on_schedule_paused(_app: Flask, schedule: Schedule) -> None:
    schedule_paused(schedule)


def schedule_paused(schedule: Schedule) -> OutboundEmail | None:
    """Tell the owner their schedule paused itself, why, and how to resume it; once per pause."""
    dataset = datasets.get(schedule.dataset)
    return queue_email(
        f"schedule-paused:{schedule.id}:{schedule.paused_at:%Y%m%d%H%M%S}", "schedule-paused",
        schedule.user.email, f"Your schedule “{schedule.name}” is paused", "schedule_paused",
        schedule=schedule, title=dataset.title if dataset else schedule.dataset,
        page=external_url(f"/schedules/{schedule.id}"),
    )


def _on_export_finished(_app: Flask, job: ExportJob) -> None:
    export_finished(job)


def export_finished(job: ExportJob) -> None:
    """Tell the owner how their export ended. Called (through jobs.signals.export_finished) by
    the engine before the commit that records the end, so the job's final state and its email
    are saved together or not at all."""
    if job.org_id != job.user.org_id:  # moved since: the file is the old organisation's
        log.info("job %s ended after its owner moved organisation: no email", job.id)
        return
    try:
        if job.state == JobState.SUCCEEDED and job.rows_done == 0:
            # Nothing to fetch: no "ready" email for an empty file (the job page offers it).
            log.info("job %s succeeded with no rows: no email", job.id)
        elif job.state == JobState.SUCCEEDED:
            download_email(job, f"export-ready:{job.id}")
        elif job.state == JobState.FAILED and current_app.config["EXPORT_FAILURE_EMAIL"]:
            queue_email(
                f"export-failed:{job.id}:{len(job.attempts)}", "export-failed", job.user.email,
                f"Your {_title(job)} export failed", "export_failed", job_id=job.id,
                job=job, title=_title(job), page=external_url(f"/exports/{job.id}"),
                new=external_url("/"),
            )
    except Exception:  # an email must never cost the user their export
        log.exception("could not compose the email for job %s", job.id)


def fresh_download_link(job: ExportJob, grant: DownloadGrant) -> OutboundEmail | None:
    """A new link for an expired one; one per expired link, so the button cannot spam anyone."""
    return download_email(job, f"download-link:{job.id}:{grant.signed_at:%Y%m%d%H%M%S}",
                          fresh=True)


def password_reset(user: User) -> OutboundEmail | None:
    """A single-use reset link; at most one email per user per minute."""
    ttl = current_app.config["PASSWORD_RESET_TTL"]
    return queue_email(
        f"password-reset:{user.id}:{utcnow():%Y%m%d%H%M}", "password-reset", user.email,
        "Reset your exportdesk password", "password_reset",
        link=external_url(f"/password-reset/{reset_token(user)}"),
        minutes=int(ttl.total_seconds() // 60),
    )


def invitation(user: User, inviter: User) -> OutboundEmail | None:
    """The newcomer's single-use link to choose a password (it carries the unusable password's
    fingerprint, so it stops once one is set or the invitation is sent again), through the
    critical lane like a reset; one email per unusable password."""
    ttl = current_app.config["INVITATION_TTL"]
    return queue_email(
        f"invitation:{user.id}:{sha256(user.password_hash.encode()).hexdigest()[:16]}",
        "invitation", user.email,
        f"You are invited to exportdesk ({user.organisation.name})", "invitation",
        link=external_url(f"/invitation/{invitation_token(user)}"), user=user,
        inviter=inviter, expires=utcnow() + ttl,
    )
