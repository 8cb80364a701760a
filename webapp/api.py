"""JSON API for scripts: the same operations as the pages, by session or bearer token."""

from __future__ import annotations

from flask import Blueprint, abort, jsonify, request, url_for
from flask_login import current_user, login_required

from jobs import dispatch, listing
from jobs.datasets import InvalidParams, visible
from jobs.listing import JobFilter
from jobs.models import ExportJob, db
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
from webapp.views import job_action

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
