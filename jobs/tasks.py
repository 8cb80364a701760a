"""Tasks, each declared on exactly one lane; they carry ids only, the database holds the rest."""

from __future__ import annotations

import logging
from datetime import timedelta

from flask import Flask, current_app, has_app_context
from huey import crontab

from jobs import engine, lanes, mail, retention

log = logging.getLogger(__name__)
_app: Flask | None = None


def bind_app(app: Flask) -> None:
    """The app whose database and settings tasks use in this process (set by `flask worker`)."""
    global _app
    _app = app


def _task_app() -> Flask:
    global _app
    if has_app_context():
        return current_app._get_current_object()
    if _app is None:
        from webapp import create_app

        _app = create_app()
    return _app


EXPORT_ATTEMPTS = lanes.exports.settings.retries + 1


@lanes.exports.task(name="export", timeout=lanes.exports.settings.timeout)
def run_export(job_id: int) -> None:
    """Run or resume an export; a failed attempt goes back on the lane after the retry delay."""
    with _task_app().app_context():
        try:
            engine.run(job_id, EXPORT_ATTEMPTS)
        except engine.AttemptFailed as failure:
            log.warning("export %s attempt failed: %s", job_id, failure)
            if failure.retry:
                run_export.schedule((job_id,), delay=lanes.exports.settings.retry_delay)


EMAIL_ATTEMPTS = lanes.critical.settings.retries + 1


@lanes.critical.task(name="send_email", timeout=lanes.critical.settings.timeout,
                     retries=lanes.critical.settings.retries,
                     retry_delay=lanes.critical.settings.retry_delay)
def send_email(email_id: int) -> None:
    """Send one recorded email once; a failed attempt raises, so the lane retries it later."""
    with _task_app().app_context():
        mail.deliver(email_id, EMAIL_ATTEMPTS)


@lanes.critical.periodic_task(crontab(minute="*/10"), name="housekeeping",
                              timeout=lanes.critical.settings.timeout)
def housekeeping() -> None:
    """Every 10 minutes: retention, and emails whose hand-over to this lane was lost.
    On the critical lane because the disk fills fastest exactly when exports are busy."""
    with _task_app().app_context():
        retention.sweep()
        for email_id in mail.stalled(older_than=timedelta(minutes=5)):
            send_email(email_id)


TASKS = {
    "export": (run_export, lanes.exports),
    "send_email": (send_email, lanes.critical),
    "housekeeping": (housekeeping, lanes.critical),
}
