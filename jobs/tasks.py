"""Tasks, each declared on exactly one lane; they carry ids only, the database holds the rest."""

from __future__ import annotations

import logging

from flask import Flask, current_app, has_app_context

from jobs import engine, lanes

log = logging.getLogger(__name__)
_app: Flask | None = None
FAIR_SHARE_RETRY_SECONDS = 1.0


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


def retry_delay(attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: the lane's delay, growing by its backoff."""
    s = lanes.exports.settings
    return s.retry_delay * s.retry_backoff ** max(attempt - 1, 0)


# Retries are the engine's, counted in the job's attempts, not Huey's: the row is the truth.
@lanes.exports.task(name="export", retries=0)
def run_export(job_id: int) -> None:
    """Run or resume an export; a failed attempt goes back on the lane after the retry delay."""
    with _task_app().app_context():
        try:
            engine.run(job_id, EXPORT_ATTEMPTS)
        except engine.Deferred:
            run_export.schedule((job_id,), delay=FAIR_SHARE_RETRY_SECONDS)
        except engine.Interrupted:
            log.info("export %s checkpointed for shutdown; back on its lane", job_id)
            run_export(job_id)
        except engine.AttemptFailed as failure:
            log.warning("export %s attempt failed: %s", job_id, failure)
            if failure.retry:
                from webapp.models import ExportJob, db

                attempts = len(db.session.get(ExportJob, job_id).attempts)
                run_export.schedule((job_id,), delay=retry_delay(attempts))


def reap() -> None:
    """Put exports whose worker died back on their lane (run by every exports consumer)."""
    with _task_app().app_context():
        for job_id in engine.reap_lapsed_leases(EXPORT_ATTEMPTS):
            log.warning("export %s lost its worker; resuming from its checkpoint", job_id)
            run_export(job_id)
