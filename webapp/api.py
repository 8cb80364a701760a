"""JSON API for scripts: the same operations as the pages, by session or bearer token."""

from __future__ import annotations

from flask import Blueprint, abort, jsonify, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from jobs import dispatch, listing, schedules, webhooks
from jobs.datasets import InvalidParams, visible
from jobs.listing import JobFilter
from jobs.models import ExportJob, Schedule, WebhookEndpoint, db
from webapp.exports import (
    IdempotencyConflict,
    TooManyExports,
    job_for,
    request_export,
    waiting,
)
from webapp.exports import (
    choices as _choices,
)
from webapp.schedules import schedule_for
from webapp.views import job_action
from webapp.webhooks import delivery_for, endpoint_for

PAGE = 50

bp = Blueprint("api", __name__, url_prefix="/api")
MAX_KEY = 200


def _time(value) -> str | None:
    return value.isoformat() + "Z" if value else None


def job_json(job: ExportJob) -> dict:
    """A job as DESIGN.md defines it for API clients; while it is queued, why it waits
    (`lane_paused`, `ahead`: queued jobs of its lane before it), else both null."""
    wait = waiting(job)
    return {
        "id": job.id,
        "state": job.state,
        "lane": job.lane,
        "dataset": job.dataset,
        "format": job.format,
        "params": job.params,
        "rows_done": job.rows_done,
        "rows_total": job.rows_total,
        "progress": round(job.progress, 4),
        "bytes": job.bytes,
        "sha256": job.sha256,
        "created_at": _time(job.created_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "error": job.error,
        "lane_paused": wait.lane_paused if wait else None,
        "ahead": wait.ahead if wait else None,
        "utf8_replaced": job.utf8_replaced,
        "xlsx_truncated": job.xlsx_truncated,
        "schedule_id": job.schedule_id,  # the schedule it is a run of (docs/schedules.md)
        "download_url": url_for("exports.download", job_id=job.id, _external=True)
        if job.state == "succeeded"
        else None,
    }


@bp.get("/datasets")
@login_required
def list_datasets():
    """What the caller may export: columns, formats and each parameter field with its type,
    whether it is required, its default, its bounds (a range's other end) and its choices."""
    return jsonify(datasets=[{
        "name": d.name,
        "title": d.title,
        "description": d.description,
        "formats": list(d.formats),
        "max_rows": d.max_rows,
        "columns": [{"name": c.name, "label": c.header, "kind": c.kind} for c in d.columns],
        "params": [{
            "name": f.name,
            "kind": f.kind,
            "label": f.label,
            "help": f.help or None,
            "required": f.required,
            "default": f.default,
            "not_before": f.after,
            "choices": _choices(d, f) if f.kind == "choice" else None,
            "match": "prefix" if f.test == "prefix" else None,
            "timezone": f.tz if f.kind in ("date", "datetime") else None,
        } for f in d.params],
    } for d in visible(current_user).values()])


@bp.post("/exports")
@login_required
def create_export_job():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="send a JSON object: {dataset, format, params}"), 400
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= MAX_KEY and key.isprintable()):
        return jsonify(error=f"Idempotency-Key must be 1 to {MAX_KEY} printable characters"), 400
    try:
        job, _new = request_export(current_user, body.get("dataset"), body.get("format", "csv"),
                                   body.get("params"), key)
    except InvalidParams as exc:
        db.session.rollback()
        return jsonify(error="invalid request", fields=exc.errors), 400
    except TooManyExports as exc:
        db.session.rollback()
        return jsonify(error=str(exc)), 429
    except IdempotencyConflict:
        db.session.rollback()
        return jsonify(error="this Idempotency-Key was already used for a different export"), 422
    db.session.commit()
    return jsonify(job_json(job)), 202, {"Location": url_for("api.get_job", job_id=job.id)}


@bp.get("/jobs")
@login_required
def list_jobs():
    """My jobs (made in my organisation), newest first (admins and viewers: everyone's, with
    the admin list's filters);
    `?before=<id>` pages on, as the `next` link says."""
    where = JobFilter.from_args(request.args) if current_user.is_staff else JobFilter()
    before = request.args.get("before", "")
    mine = None if current_user.is_staff else (current_user.id, current_user.org_id)
    jobs, last = listing.page_of_jobs(where, int(before) if before.isdigit() else None, PAGE,
                                      mine)
    following = None if last is None else url_for("api.list_jobs", **where.args(), before=last)
    return jsonify(jobs=[job_json(job) for job in jobs], next=following)


@bp.get("/lanes")
@login_required
def lanes():
    """Each lane's health, as the admin lanes page shows it (admins and viewers)."""
    if not current_user.is_staff:
        abort(403, "Lane health is for admins and viewers.")
    return jsonify(lanes=dispatch.lane_health())


@bp.get("/jobs/<int:job_id>")
@login_required
def get_job(job_id: int):
    return jsonify(job_json(job_for(current_user, job_id)))


@bp.post("/jobs/<int:job_id>/cancel")
@login_required
def cancel_job(job_id: int):
    return _change(job_id, dispatch.cancel)


@bp.post("/jobs/<int:job_id>/retry")
@login_required
def retry_job(job_id: int):
    return _change(job_id, dispatch.retry)


def _change(job_id: int, change):
    """Cancel or retry, as the buttons do: 202 with the job, 409 when its state does not allow."""
    job = job_for(current_user, job_id, change=True)
    reason = job_action(job, change)
    if reason is not None:
        return jsonify(error=reason, state=job.state), 409
    return jsonify(job_json(job)), 202


def schedule_json(schedule: Schedule) -> dict:
    """A schedule for API clients: its definition (as POST takes it), where it stands, and
    its last runs; `next_run_local` is the next run on the schedule's own clock."""
    return {
        "id": schedule.id,
        "owner": schedule.user.email,
        **schedules.definition(schedule),
        "description": schedules.describe(schedule),
        "paused": schedule.paused,
        "pause_reason": schedule.pause_reason,
        "failures": schedule.failures,
        "next_run_at": None if schedule.paused else _time(schedule.next_run_at),
        "next_run_local": None if schedule.paused else
        schedules.local(schedule.next_run_at, schedule.timezone).isoformat(),
        "last_run_at": _time(schedule.last_run_at),
        "last_skipped_at": _time(schedule.last_skipped_at),
        "created_at": _time(schedule.created_at),
        "runs": [{"id": job.id, "state": job.state, "url": url_for("api.get_job", job_id=job.id,
                                                                    _external=True)}
                 for job in schedules.runs(schedule)],
    }


@bp.get("/schedules")
@login_required
def list_schedules():
    """My schedules (admins and viewers: everyone's), newest first."""
    query = select(Schedule).order_by(Schedule.id.desc()).limit(500)
    if not current_user.is_staff:
        query = query.where(Schedule.user_id == current_user.id,
                            Schedule.org_id == current_user.org_id)
    return jsonify(schedules=[schedule_json(s) for s in db.session.scalars(query)])


@bp.post("/schedules")
@login_required
def create_schedule():
    """Body as `jobs.schedules.define` takes it; 201 with the schedule."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="send a JSON object: {name, dataset, format, params, repeat, "
                             "at, weekday, day, cron, timezone, date_range, ...}"), 400
    try:
        schedule = schedules.define(Schedule(), current_user, body)
    except InvalidParams as exc:
        db.session.rollback()
        return jsonify(error="invalid schedule", fields=exc.errors), 400
    db.session.add(schedule)
    db.session.commit()
    return jsonify(schedule_json(schedule)), 201, {
        "Location": url_for("api.get_schedule", schedule_id=schedule.id)}


@bp.get("/schedules/<int:schedule_id>")
@login_required
def get_schedule(schedule_id: int):
    return jsonify(schedule_json(schedule_for(current_user, schedule_id)))


@bp.patch("/schedules/<int:schedule_id>")
@login_required
def change_schedule(schedule_id: int):
    """Change any fields of the definition, and/or `paused` (true pauses, false resumes)."""
    schedule = schedule_for(current_user, schedule_id, change=True)
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "paused" in body and not isinstance(body["paused"], bool):
        return jsonify(error="send a JSON object of the fields to change; paused is true or "
                             "false"), 400
    if body.get("dataset", schedule.dataset) != schedule.dataset:
        return jsonify(error="invalid schedule", fields={
            "dataset": "cannot change: make a new schedule for another dataset"}), 400
    paused = body.pop("paused", None)
    if body:
        if "cron" in body and "repeat" not in body:
            body["repeat"] = "cron"
        try:
            schedules.define(schedule, schedule.user, {**schedules.definition(schedule), **body,
                                                       "dataset": schedule.dataset})
        except InvalidParams as exc:
            db.session.rollback()
            return jsonify(error="invalid schedule", fields=exc.errors), 400
    if paused is True and not schedule.paused:
        schedules.pause(schedule)
    elif paused is False and schedule.paused:
        schedules.resume(schedule)
    db.session.commit()
    return jsonify(schedule_json(schedule))


@bp.delete("/schedules/<int:schedule_id>")
@login_required
def delete_schedule(schedule_id: int):
    """Delete the schedule; its runs stay as ordinary jobs."""
    schedules.delete(schedule_for(current_user, schedule_id, change=True))
    db.session.commit()
    return "", 204


@bp.post("/schedules/<int:schedule_id>/run")
@login_required
def run_schedule(schedule_id: int):
    """Run now: 202 with the new job, 409 when the schedule cannot run (and why)."""
    schedule = schedule_for(current_user, schedule_id, change=True)
    try:
        job = schedules.run_now(schedule)
    except schedules.CannotRun as exc:
        db.session.rollback()
        return jsonify(error=f"this schedule cannot run: {exc}"), 409
    db.session.commit()
    return jsonify(job_json(job)), 202, {"Location": url_for("api.get_job", job_id=job.id)}


def endpoint_json(endpoint: WebhookEndpoint, secret: str | None = None,
                  log: bool = False) -> dict:
    """An endpoint; its secret only when just made or rotated (shown once); with `log`, its
    latest deliveries and each one's attempts."""
    body = {"id": endpoint.id, "url": endpoint.url, "events": endpoint.events,
            "organisation_wide": endpoint.organisation_wide,
            "created_at": _time(endpoint.created_at),
            "previous_secret_valid_until": _time(endpoint.previous_until)}
    if secret:
        body["secret"] = secret
    if log:
        body["deliveries"] = [{
            "id": d.id, "event_id": d.event_id, "type": d.event_type, "state": d.state,
            "created_at": _time(d.created_at), "delivered_at": _time(d.delivered_at),
            "attempts": [{"at": _time(a.at), "status_code": a.status_code, "error": a.error}
                         for a in d.log],
        } for d in webhooks.deliveries(endpoint)]
    return body


@bp.get("/webhooks")
@login_required
def list_webhooks():
    """My endpoints (and, for an admin, their organisation's organisation-wide ones)."""
    reach = WebhookEndpoint.user_id == current_user.id
    if current_user.is_admin:
        reach = reach | WebhookEndpoint.organisation_wide
    mine = db.session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.org_id == current_user.org_id, reach).order_by(WebhookEndpoint.id))
    return jsonify(webhooks=[endpoint_json(e) for e in mine])


@bp.post("/webhooks")
@login_required
def create_webhook():
    """Body {url, events, organisation_wide}; 201 with the endpoint and its secret (only now)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="send a JSON object: {url, events}"), 400
    try:
        endpoint = webhooks.define(WebhookEndpoint(), current_user, body)
    except InvalidParams as exc:
        db.session.rollback()
        return jsonify(error="invalid webhook", fields=exc.errors), 400
    db.session.add(endpoint)
    db.session.commit()
    return jsonify(endpoint_json(endpoint, endpoint.secret)), 201, {
        "Location": url_for("api.get_webhook", endpoint_id=endpoint.id)}


@bp.get("/webhooks/<int:endpoint_id>")
@login_required
def get_webhook(endpoint_id: int):
    return jsonify(endpoint_json(endpoint_for(current_user, endpoint_id), log=True))


@bp.patch("/webhooks/<int:endpoint_id>")
@login_required
def change_webhook(endpoint_id: int):
    """Change url, events or organisation_wide; `rotate_secret: true` answers with the new
    secret (the old one signs beside it for 24 hours)."""
    endpoint = endpoint_for(current_user, endpoint_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="send a JSON object of the fields to change"), 400
    rotate = body.pop("rotate_secret", False) is True
    try:
        webhooks.define(endpoint, current_user, body)
    except InvalidParams as exc:
        db.session.rollback()
        return jsonify(error="invalid webhook", fields=exc.errors), 400
    secret = webhooks.rotate(endpoint) if rotate else None
    db.session.commit()
    return jsonify(endpoint_json(endpoint, secret))


@bp.delete("/webhooks/<int:endpoint_id>")
@login_required
def delete_webhook(endpoint_id: int):
    db.session.delete(endpoint_for(current_user, endpoint_id))
    db.session.commit()
    return "", 204


@bp.post("/webhooks/<int:endpoint_id>/deliveries/<int:delivery_id>/resend")
@login_required
def resend_webhook(endpoint_id: int, delivery_id: int):
    """Send a delivery again (same id and body); 202, or 409 while an attempt is under way."""
    delivery = delivery_for(current_user, endpoint_id, delivery_id)
    reason = job_action(delivery, webhooks.resend)
    if reason is not None:
        return jsonify(error=reason, state=delivery.state), 409
    return jsonify(state=delivery.state), 202
