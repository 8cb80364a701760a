"""Tasks, each declared on exactly one lane; they carry ids only, the database holds the rest."""

from __future__ import annotations

import logging
import os

from flask import current_app
from huey import crontab

from jobs import dispatch, engine, lanes, mail, retention, schedules, webhooks
from jobs.models import prune_sessions, utcnow

log = logging.getLogger(__name__)
FAIR_SHARE_RETRY_SECONDS = 1.0

EXPORT_ATTEMPTS = lanes.exports.settings.retries + 1
MAX_RETRY_DELAY = 600.0


def backoff(base: float, attempt: int) -> float:
    """Seconds before retrying after failed attempt number `attempt`: base, then growing by
    the lane's retry_backoff factor (2: 5, 10, 20 s...), capped."""
    factor = lanes.exports.settings.retry_backoff
    return min(base * factor ** (attempt - 1), MAX_RETRY_DELAY)


# Retries are the engine's, counted in the job's attempts, not Huey's: the row is the truth.
@lanes.exports.task(name="export", retries=0)
def run_export(job_id: int) -> None:
    """Run or resume an export; a failed attempt goes back on the lane after a backoff delay."""
    try:
        engine.run(job_id, EXPORT_ATTEMPTS)
    except engine.Deferred:
        run_export.schedule((job_id,), delay=FAIR_SHARE_RETRY_SECONDS)
    except engine.Interrupted:
        log.info("export %s checkpointed for shutdown; back on its lane", job_id)
        run_export(job_id)
        dispatch.mark_enqueued(job_id)
    except engine.AttemptFailed as failure:
        log.warning("export %s attempt %s failed: %s", job_id, failure.attempt, failure)
        if failure.retry:  # if this fails (broker down) the reconciler sends the job later
            delay = backoff(lanes.exports.settings.retry_delay, failure.attempt)
            run_export.schedule((job_id,), delay=delay)
            dispatch.mark_enqueued(job_id)


@lanes.exports.on_check
def resume_jobs_of_dead_workers() -> None:
    """In the exports consumer, at start and every few seconds: a job whose worker process on
    this host is gone goes back on the lane at once, instead of after its lease."""
    for job_id in engine.release_dead_claims():
        dispatch.send(job_id)


RECONCILE_LANE = lanes.LANES[os.environ.get("RECONCILE_LANE", "critical")]
RECONCILE_INTERVAL = float(os.environ.get("RECONCILE_INTERVAL", 30))


@RECONCILE_LANE.every(RECONCILE_INTERVAL, name="reconcile")
def reconcile() -> None:
    """Send the jobs, emails and webhook deliveries whose message never reached its lane or
    that the broker lost, and put back jobs (and deliveries) whose worker died (see
    jobs.dispatch.reconcile, jobs.webhooks)."""
    dispatch.reconcile(current_app.config["RECONCILE_GRACE"])
    webhooks.release_stalled()
    webhooks.send_lost(current_app.config["RECONCILE_GRACE"])


SCHEDULER_INTERVAL = float(os.environ.get("SCHEDULER_INTERVAL", 30))


@lanes.critical.every(SCHEDULER_INTERVAL, name="schedules")
def run_schedules() -> None:
    """Make the runs of the schedules that are due (jobs.schedules.tick): every critical
    consumer enqueues it, and the schedule's row lock makes each run exactly once."""
    schedules.tick()


@lanes.critical.task(name="send_email", timeout=lanes.critical.settings.timeout,
                     retries=lanes.critical.settings.retries,
                     retry_delay=lanes.critical.settings.retry_delay)
def send_email(email_id: int) -> None:
    """Send one recorded email once; a failed attempt raises, so the lane retries it later."""
    mail.deliver(email_id, mail.EMAIL_ATTEMPTS)


# Retries are the delivery's own (jobs.webhooks.RETRY_DELAYS, over hours), counted in its row.
@lanes.critical.task(name="send_webhook", retries=0)
def send_webhook(delivery_id: int) -> None:
    """One attempt of a webhook delivery; a failed one is scheduled again by jobs.webhooks."""
    webhooks.deliver(delivery_id)


@lanes.critical.periodic_task(crontab(minute="*/10"), name="housekeeping",
                              timeout=lanes.critical.settings.timeout)
def housekeeping() -> None:
    """Every 10 minutes: retention, then ended and outlived sessions are deleted (emails whose
    message was lost are the reconciler's). On the critical lane because the disk fills
    fastest exactly when exports are busy."""
    now = utcnow()
    retention.sweep(now)
    prune_sessions(now)

