"""Export pages: the form, creating a job, watching its progress, cancel, retry, download."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from jobs import datasets, dispatch, source
from jobs.datasets import Dataset, Field, InvalidParams, visible
from jobs.formats import FORMATS
from jobs.models import ExportJob, JobState, User, db, locked, utcnow
from jobs.storage import storage
from webapp.downloads import send_export
from webapp.views import is_htmx, job_action, refused, render

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
    dataset = datasets.get(dataset_name)
    if dataset is None or not dataset.allows(user.role):
        raise InvalidParams({"dataset": "Unknown dataset; choose one of "
                                        f"{', '.join(sorted(visible(user)))}"})
    errors = {}
    if fmt not in dataset.formats:
        errors["format"] = format_error(dataset)
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
    mine = (ExportJob.user_id == user.id, ExportJob.org_id == user.org_id)
    same_request = (*mine, ExportJob.dataset == dataset.name, ExportJob.format == fmt)
    if idempotency_key is not None:
        since = utcnow() - current_app.config["IDEMPOTENCY_TTL"]
        earlier = db.session.scalars(
            select(ExportJob).where(*mine,
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
        definition=dataset.fingerprint,
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


def owns(user: User, job: ExportJob) -> bool:
    """The user's own job, made in the organisation they are in: moved to another one, they
    no longer reach the jobs and files of the old one (its data, not theirs)."""
    return job.user_id == user.id and job.org_id == user.org_id


def may_change(user: User, job: ExportJob) -> bool:
    """Cancel or retry: the owner or an admin (a viewer sees everything, changes nothing)."""
    return owns(user, job) or user.is_admin


def job_for(user: User, job_id: int, change: bool = False) -> ExportJob:
    """The job if this user may see it (owner, admin or viewer); 404 otherwise, so ids leak
    nothing. With `change`, a viewer who may only look gets 403."""
    job = db.session.get(ExportJob, job_id)
    if job is None or not (owns(user, job) or user.is_staff):
        abort(404)
    if change and not may_change(user, job):
        abort(403, "Only the owner or an admin can change this export; your role can only look.")
    return job


def format_error(dataset: Dataset) -> str:
    """The format field's error; the form shows it after the word "Format", as a sentence."""
    return f"must be one of {', '.join(dataset.formats)}."


@bp.app_template_global("may_change")
def _may_change(job: ExportJob) -> bool:
    return may_change(current_user, job)


@dataclass(frozen=True)
class Timing:
    """How long a job has taken and, while it runs, how long it should still take (seconds)."""

    elapsed: float | None
    eta: float | None


@bp.app_template_global()
def timing(job: ExportJob, now: datetime | None = None) -> Timing:
    """Elapsed since the job started (or was requested, while it waits); ETA from its pace."""
    now = now or utcnow()
    begin = job.started_at or job.created_at
    end = job.finished_at if job.finished else now
    elapsed = max((end - begin).total_seconds(), 0.0) if begin and end else None
    eta = None
    if job.state == JobState.RUNNING and job.started_at and job.rows_total and job.rows_done:
        eta = elapsed * max(job.rows_total - job.rows_done, 0) / job.rows_done
    return Timing(elapsed, eta)


@bp.app_template_global()
def tab_title(job: ExportJob) -> str:
    """The page title, so a background tab shows how far the export is: "42% · Export #7"."""
    if job.state == JobState.RUNNING:
        head = f"{job.progress * 100:.0f}%"
    else:
        head = "Ready" if job.state == JobState.SUCCEEDED else job.state.capitalize()
    return f"{head} · Export #{job.id}"


@dataclass(frozen=True)
class Waiting:
    """Why a queued job has not started: a cancelled attempt still stopping (a retry waits for
    it), its lane paused by an admin, or the jobs ahead of it on its lane."""

    lane: str
    stopping: bool
    lane_paused: bool
    ahead: int

    def text(self) -> str:
        """The words the job page and My exports show."""
        if self.stopping:
            return "Waiting for the cancelled attempt to stop"
        if self.lane_paused:
            return f"Waiting: the {self.lane} lane is paused by an admin"
        if self.ahead == 0:
            return "Waiting for a worker · next in line"
        return (f"Waiting for a worker · {self.ahead:,} export{'s' if self.ahead != 1 else ''} "
                "ahead of yours")


@bp.app_template_global()
def waiting(job: ExportJob) -> Waiting | None:
    """For a queued job (None otherwise), so the user knows whether waiting longer helps.

    "Ahead" counts the queued jobs of the same lane with a lower id (made before it): one
    count on the (state, id) index. A lane whose pause flag cannot be read counts as running.
    """
    if job.state != JobState.QUEUED:
        return None
    try:
        paused = dispatch.paused(job.lane)
    except Exception:  # the broker is away: the job waits anyway, say why we know
        current_app.logger.warning("cannot read whether lane %s is paused", job.lane)
        paused = False
    ahead = db.session.scalar(
        select(func.count()).select_from(ExportJob).where(
            ExportJob.state == JobState.QUEUED, ExportJob.lane == job.lane,
            ExportJob.id < job.id))
    return Waiting(job.lane, dispatch.stopping(job), paused, ahead or 0)


def _my_jobs() -> list[ExportJob]:
    return list(db.session.scalars(
        select(ExportJob).where(ExportJob.user_id == current_user.id,
                                ExportJob.org_id == current_user.org_id)
        .order_by(ExportJob.id.desc()).limit(100)
    ))


def choices(dataset: Dataset, param: Field) -> list[str]:
    """A choice's values: listed in the file, or the distinct values of its column among the
    user's organisation's rows (none offered, but any value accepted, when it cannot be read)."""
    if not param.choices_from_column:
        return list(param.choices)
    try:
        with source.connect() as conn:
            key = current_user.organisation.data_key_or_id
            return [str(v) for v in conn.scalars(dataset.choices_query(param, key))]
    except SQLAlchemyError:
        current_app.logger.exception("choices of %s.%s", dataset.name, param.name)
        return []


def _render_form(errors: dict, chosen: str | None, values, status: int = 200):
    return render_template("exports/new.html", datasets=visible(current_user).values(),
                           formats=FORMATS, choices=choices,
                           errors=errors, chosen=chosen, values=values), status


@bp.get("/")
@login_required
def new():
    return _render_form({}, None, {})


def _form_params() -> dict:
    return {k: v for k, v in request.form.items()
            if k not in ("dataset", "format", "csrf_token")}


@bp.post("/exports")
@login_required
def create():
    form = request.form
    name = form.get("dataset")
    try:
        job, new = request_export(current_user, name, form.get("format", "csv"), _form_params())
    except InvalidParams as exc:
        db.session.rollback()
        return _render_form(exc.errors, name, form, 400)
    except TooManyExports as exc:
        db.session.rollback()
        return _render_form({"dataset": str(exc)}, name, form, 429)
    db.session.commit()
    if not new:
        flash("You already asked for this export; here it is.", "info")
    return redirect(url_for("exports.show", job_id=job.id), code=303)


@bp.post("/exports/check")
@login_required
def check():
    """Inline validation while the form is filled in: the dataset's error slots, out of band."""
    dataset = datasets.get(request.form.get("dataset", ""))
    if dataset is None or not dataset.allows(current_user.role):
        abort(404)
    errors: dict[str, str] = {}
    if request.form.get("format", "csv") not in dataset.formats:
        errors["format"] = format_error(dataset)
    estimate: int | None = None
    try:
        cleaned = dataset.clean_params(_form_params())
    except InvalidParams as exc:
        errors.update(exc.errors)
    else:
        estimate = row_estimate(dataset, cleaned)
    return render("exports/_errors.html", dataset=dataset, errors=errors, estimate=estimate,
                  counted=not errors)


def row_estimate(dataset: Dataset, params: dict) -> int | None:
    """How many rows the export would have now, so an empty file is no surprise; None when
    the count takes longer than ROW_ESTIMATE_TIMEOUT or fails (the export may still work)."""
    try:
        with source.connect_briefly() as conn:
            key = current_user.organisation.data_key_or_id
            return conn.execute(dataset.count(key, params)).scalar_one()
    except SQLAlchemyError as exc:
        current_app.logger.info("no row estimate for %s (%s)", dataset.name, exc)
        return None


@bp.get("/exports")
@login_required
def index():
    template = "exports/_list.html" if is_htmx() else "exports/index.html"
    return render(template, jobs=_my_jobs())


@bp.get("/exports/<int:job_id>")
@login_required
def show(job_id: int):
    job = job_for(current_user, job_id)
    if is_htmx():
        return render("exports/_progress.html", job=job, oob=True)
    return render("exports/show.html", job=job)


def _after_action(job: ExportJob, notice: str | None = None, status: int = 200):
    """Answer a cancel or retry: the part of the page that sent it (htmx), else a redirect."""
    view = request.form.get("view")
    if is_htmx():
        if view == "list":
            return render("exports/_list.html", status, jobs=_my_jobs(), notice=notice)
        return render("exports/_progress.html", status, job=job, oob=True, notice=notice)
    if notice:
        return refused(notice, status)
    if view == "list":
        return redirect(url_for("exports.index"), code=303)
    return redirect(url_for("exports.show", job_id=job.id), code=303)


@bp.get("/exports/<int:job_id>/cancel")
@login_required
def confirm_cancel(job_id: int):
    """The confirmation step when JavaScript is off (htmx asks with a dialog instead)."""
    job = job_for(current_user, job_id, change=True)
    view = "list" if request.args.get("view") == "list" else "job"
    return render_template("exports/confirm_cancel.html", job=job, view=view)


@bp.post("/exports/<int:job_id>/cancel")
@login_required
def cancel(job_id: int):
    return _change(job_id, dispatch.cancel)


@bp.post("/exports/<int:job_id>/retry")
@login_required
def retry(job_id: int):
    return _change(job_id, dispatch.retry)


def _change(job_id: int, change: Callable[[ExportJob], None]):
    """Cancel or retry for the owner or an admin; 409 with the reason when the state forbids."""
    job = job_for(current_user, job_id, change=True)
    reason = job_action(job, change)
    if reason is not None:
        return _after_action(job, reason, 409)
    current_app.logger.info("job %s: %s by user %s", job.id, change.__name__, current_user.id)
    return _after_action(job)


@bp.get("/exports/<int:job_id>/download")
@login_required
def download(job_id: int):
    job = job_for(current_user, job_id)
    files = storage()
    if job.state != JobState.SUCCEEDED or not job.file_name or not files.exists(job.file_name):
        abort(404, "This export has no file to download (yet).")
    current_app.logger.info("job %s downloaded by user %s", job.id, current_user.id)
    return send_export(job)
