"""Export pages: the form, creating a job, watching its progress, downloading the file."""

from __future__ import annotations

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import func, select

from jobs import dispatch
from jobs.datasets import DATASETS, FORMATS, InvalidParams
from jobs.engine import storage
from webapp.models import ExportJob, JobState, User, db, locked, utcnow

bp = Blueprint("exports", __name__)


class TooManyExports(Exception):
    """The user already has their share of exports waiting (fair share in the exports lane)."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used by this user for a different request."""


def create_export(user: User, dataset_name: object, fmt: object, params: object,
                  idempotency_key: str | None = None) -> ExportJob:
    """Validate a request and record the job; it reaches its lane when the caller commits."""
    return request_export(user, dataset_name, fmt, params, idempotency_key)[0]


def request_export(user: User, dataset_name: object, fmt: object, params: object,
                   idempotency_key: str | None = None) -> tuple[ExportJob, bool]:
    """The job for this request and whether it is new.

    A repeated request returns the existing job instead of a second one: the same
    Idempotency-Key from the same user within IDEMPOTENCY_TTL, or the same dataset, format
    and parameters while such a job of the user's is still queued, running or retrying (a
    double click). Checked under a lock on the user's row, so two concurrent requests cannot
    both create a job.
    """
    dataset = DATASETS.get(dataset_name) if isinstance(dataset_name, str) else None
    if dataset is None:
        raise InvalidParams({"dataset": f"Unknown dataset; choose one of {', '.join(DATASETS)}"})
    errors = {}
    if fmt not in FORMATS:
        errors["format"] = f"unknown format; choose one of {', '.join(FORMATS)}"
    if params is not None and not isinstance(params, dict):
        errors["params"] = "must be an object of parameter names to values"
        params = {}
    try:
        cleaned = dataset.clean_params(params)
    except InvalidParams as exc:
        errors.update(exc.errors)
    if errors:
        raise InvalidParams(errors)

    locked(User, user.id)
    same_request = (ExportJob.user_id == user.id, ExportJob.dataset == dataset.name,
                    ExportJob.format == fmt)
    if idempotency_key is not None:
        since = utcnow() - current_app.config["IDEMPOTENCY_TTL"]
        earlier = db.session.scalars(
            select(ExportJob).where(ExportJob.user_id == user.id,
                                    ExportJob.idempotency_key == idempotency_key,
                                    ExportJob.created_at >= since)
            .order_by(ExportJob.id.desc())
        ).first()
        if earlier is not None:
            if (earlier.dataset, earlier.format, earlier.params) != (dataset.name, fmt, cleaned):
                raise IdempotencyConflict(idempotency_key)
            return earlier, False
    for active in db.session.scalars(
        select(ExportJob).where(*same_request, ExportJob.state.in_(JobState.ACTIVE))
        .order_by(ExportJob.id)
    ):
        if active.params == cleaned:
            return active, False
    limit = current_app.config["EXPORTS_QUEUED_PER_USER"]
    waiting = db.session.scalar(
        select(func.count()).select_from(ExportJob).where(
            ExportJob.user_id == user.id,
            ExportJob.state.in_([JobState.QUEUED, JobState.RETRYING]))
    )
    if waiting >= limit:
        raise TooManyExports(
            f"You already have {waiting} exports waiting to start (the limit is {limit}). "
            "Please wait for one to start or cancel one, then try again."
        )

    job = ExportJob(
        user=user,
        org_id=user.org_id,  # tenancy comes from the server, never from the request
        dataset=dataset.name,
        params=cleaned,
        format=fmt,
        lane="exports",
        state=JobState.QUEUED,
        idempotency_key=idempotency_key,
    )
    db.session.add(job)
    db.session.flush()
    dispatch.submit(job)
    return job, True


def job_for(user: User, job_id: int) -> ExportJob:
    """The job if this user may see it (owner or admin); 404 otherwise, so ids leak nothing."""
    job = db.session.get(ExportJob, job_id)
    if job is None or not (job.user_id == user.id or user.is_admin):
        abort(404)
    return job


@bp.get("/")
@login_required
def new():
    return render_template("exports/new.html", datasets=DATASETS.values(), formats=FORMATS,
                           errors={}, chosen=None, values={})


@bp.post("/exports")
@login_required
def create():
    form = request.form
    name = form.get("dataset")
    params = {k: v for k, v in form.items() if k not in ("dataset", "format", "csrf_token")}
    try:
        job, new = request_export(current_user, name, form.get("format", "csv"), params)
    except InvalidParams as exc:
        db.session.rollback()
        return render_template("exports/new.html", datasets=DATASETS.values(), formats=FORMATS,
                               errors=exc.errors, chosen=name, values=form), 400
    except TooManyExports as exc:
        db.session.rollback()
        return render_template("exports/new.html", datasets=DATASETS.values(), formats=FORMATS,
                               errors={"dataset": str(exc)}, chosen=name, values=form), 429
    db.session.commit()
    if not new:
        flash("You already asked for this export; here it is.", "info")
    return redirect(url_for("exports.show", job_id=job.id), code=303)


@bp.get("/exports")
@login_required
def index():
    jobs = db.session.scalars(
        select(ExportJob).where(ExportJob.user_id == current_user.id)
        .order_by(ExportJob.id.desc()).limit(100)
    ).all()
    return render_template("exports/index.html", jobs=jobs)


@bp.get("/exports/<int:job_id>")
@login_required
def show(job_id: int):
    job = job_for(current_user, job_id)
    if request.headers.get("HX-Request"):
        return render_template("exports/_progress.html", job=job)
    return render_template("exports/show.html", job=job)


@bp.get("/exports/<int:job_id>/download")
@login_required
def download(job_id: int):
    job = job_for(current_user, job_id)
    files = storage()
    if job.state != JobState.SUCCEEDED or not job.file_name or not files.exists(job.file_name):
        abort(404, "This export has no file to download (yet).")
    current_app.logger.info("job %s downloaded by user %s", job.id, current_user.id)
    return send_file(
        files.open(job.file_name),
        mimetype="text/csv; charset=utf-8",
        as_attachment=True,
        download_name=job.download_name(),
        max_age=0,
    )
