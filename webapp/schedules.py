"""Schedule pages: my recurring exports (create, edit, pause, resume, run now, delete, their
last runs), "Repeat this export…" from an export, and every schedule for admins."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select
from werkzeug.datastructures import MultiDict

from jobs import datasets, schedules
from jobs.datasets import InvalidParams, visible
from jobs.formats import FORMATS
from jobs.models import Schedule, User, db
from webapp.admin import staff_required
from webapp.exports import job_for, owns

bp = Blueprint("schedules", __name__)


def owns_schedule(user: User, schedule: Schedule) -> bool:
    """The user's own schedule, made in the organisation they are in (as with jobs)."""
    return schedule.user_id == user.id and schedule.org_id == user.org_id


def schedule_for(user: User, schedule_id: int, change: bool = False) -> Schedule:
    """The schedule if this user may see it (owner, admin or viewer); 404 otherwise. With
    `change`, only the owner or an admin (403 for a viewer)."""
    schedule = db.session.get(Schedule, schedule_id)
    if schedule is None or not (owns_schedule(user, schedule) or user.is_staff):
        abort(404)
    if change and not (owns_schedule(user, schedule) or user.is_admin):
        abort(403, "Only the owner or an admin can change this schedule; your role can only "
                   "look.")
    return schedule


@bp.app_template_global("may_change_schedule")
def _may_change(schedule: Schedule) -> bool:
    return owns_schedule(current_user, schedule) or current_user.is_admin


@bp.app_template_global("schedule_text")
def _describe(schedule: Schedule) -> str:
    return schedules.describe(schedule)


@bp.app_template_global("schedule_time")
def _local(moment, tz: str) -> str:
    """A time as the schedule's owner reads it: on their schedule's wall clock."""
    shown = schedules.local(moment, tz)
    return shown.strftime("%a %d %b %Y %H:%M %Z") if shown else "–"


def form_data(form: MultiDict) -> dict:
    """The form's fields as `schedules.define` takes them."""
    dataset = datasets.get(form.get("dataset"))
    params = {f.name: value for f in (dataset.params if dataset else ())
              if (value := form.get(f.name, "").strip())}
    keys = ("name", "dataset", "format", "date_range", "range_param", "range_days", "repeat",
            "at", "weekday", "day", "cron", "timezone", "skip_when_empty")
    return {**{key: form.get(key) for key in keys}, "params": params}


def _form(schedule: Schedule | None, values: dict, errors: dict, status: int = 200):
    dataset = datasets.get(values.get("dataset"))
    if dataset is None or not dataset.allows(current_user.role):
        abort(404)
    return render_template("schedules/form.html", schedule=schedule, dataset=dataset,
                           values=values, errors=errors, formats=FORMATS,
                           ranges=schedules.RANGES, weekdays=schedules.WEEKDAYS,
                           range_params=schedules.range_params(dataset),
                           runs=schedules.runs(schedule) if schedule else []), status


def _mine() -> list[Schedule]:
    return list(db.session.scalars(
        select(Schedule).where(Schedule.user_id == current_user.id,
                               Schedule.org_id == current_user.org_id)
        .order_by(Schedule.id.desc())))


@bp.get("/schedules")
@login_required
def index():
    return render_template("schedules/index.html", schedules=_mine(),
                           datasets=visible(current_user).values(), everyone=False)


@bp.get("/schedules/new")
@login_required
def new():
    """The form for a new schedule: of `?dataset=`, or repeating the export `?job=`."""
    values: dict = {"repeat": "weekly", "at": "08:00", "weekday": 0, "day": 1,
                    "timezone": "UTC", "format": "csv", "params": {}}
    job_id = request.args.get("job", "")
    if job_id.isdigit() and len(job_id) < 10:
        job = job_for(current_user, int(job_id))
        if not owns(current_user, job):
            abort(404)
        values.update(dataset=job.dataset, format=job.format, params=dict(job.params))
    else:
        values["dataset"] = request.args.get("dataset")
    dataset = datasets.get(values["dataset"])
    if dataset is not None:
        ranges = schedules.range_params(dataset)
        if ranges:  # a repeat exports the week before each run, not the job's fixed dates
            values.update(date_range="previous_week", range_param=ranges[0])
            values["params"] = {k: v for k, v in values["params"].items()
                                if k not in (f"{ranges[0]}_from", f"{ranges[0]}_to")}
        values["name"] = f"{dataset.title} every week"
    return _form(None, values, {})


@bp.post("/schedules")
@login_required
def create():
    data = form_data(request.form)
    try:
        schedule = schedules.define(Schedule(), current_user, data)
    except InvalidParams as exc:
        db.session.rollback()
        return _form(None, data, exc.errors, 400)
    db.session.add(schedule)
    db.session.commit()
    flash(f"Schedule created: next run {_local(schedule.next_run_at, schedule.timezone)}.",
          "info")
    return redirect(url_for("schedules.show", schedule_id=schedule.id), code=303)


@bp.get("/schedules/<int:schedule_id>")
@login_required
def show(schedule_id: int):
    schedule = schedule_for(current_user, schedule_id)
    return _form(schedule, schedules.definition(schedule), {})


@bp.post("/schedules/<int:schedule_id>")
@login_required
def update(schedule_id: int):
    schedule = schedule_for(current_user, schedule_id, change=True)
    data = {**form_data(request.form), "dataset": schedule.dataset}
    try:
        schedules.define(schedule, schedule.user, data)
    except InvalidParams as exc:
        db.session.rollback()
        return _form(db.session.get(Schedule, schedule_id), data, exc.errors, 400)
    db.session.commit()
    flash("Schedule saved.", "info")
    return redirect(url_for("schedules.show", schedule_id=schedule.id), code=303)


@bp.post("/schedules/<int:schedule_id>/<any(pause, resume, run, delete):action>")
@login_required
def act(schedule_id: int, action: str):
    """Pause, resume, run now (to the new export's page) or delete."""
    schedule = schedule_for(current_user, schedule_id, change=True)
    if action == "run":
        try:
            job = schedules.run_now(schedule)
        except schedules.CannotRun as exc:
            db.session.rollback()
            return render_template("error.html", status=409,
                                   message=f"This schedule cannot run: {exc}."), 409
        db.session.commit()
        return redirect(url_for("exports.show", job_id=job.id), code=303)
    if action == "delete":
        schedules.delete(schedule)
        db.session.commit()
        flash(f"Schedule “{schedule.name}” deleted; its exports are kept.", "info")
        return redirect(url_for("schedules.index"), code=303)
    if action == "pause" and not schedule.paused:
        schedules.pause(schedule)
    elif action == "resume" and schedule.paused:
        schedules.resume(schedule)
    db.session.commit()
    flash("Schedule paused." if action == "pause" else "Schedule resumed.", "info")
    return redirect(url_for("schedules.show", schedule_id=schedule.id), code=303)


@bp.get("/admin/schedules")
@staff_required
def everyone():
    """Every schedule of every organisation, for admins and viewers."""
    rows = list(db.session.scalars(select(Schedule).order_by(Schedule.id.desc()).limit(500)))
    return render_template("schedules/index.html", schedules=rows, datasets=[], everyone=True)
