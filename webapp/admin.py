"""The admin console: every job of every lane, cancel and retry (one or in bulk), lane health."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from flask import Blueprint, abort, current_app, flash, redirect, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import Column, select

from jobs import datasets, dispatch, listing, retention
from jobs.lanes import LANES
from jobs.listing import STATES, Cursor, JobFilter
from jobs.models import AdminAction, ExportJob, OutboundEmail, db
from jobs.storage import storage
from webapp import views

bp = Blueprint("admin", __name__, url_prefix="/admin")
PAST = {"cancel": "cancelled", "retry": "retried"}  # what a flash message says was done


def staff_required(view: Callable) -> Callable:
    """Admins and viewers may look; anyone else gets 403."""

    @functools.wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if not current_user.is_staff:
            abort(403, "The admin console is for admins and viewers.")
        return view(*args, **kwargs)

    return wrapped


def admin_required(view: Callable) -> Callable:
    """Only admins act; a viewer gets 403."""

    @functools.wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if not current_user.is_admin:
            abort(403, "Only admins can do this; your role can only look.")
        return view(*args, **kwargs)

    return wrapped


def _render(template: str, status: int = 200, **context):
    """views.render with what every admin template reads: the console's base URL and
    whether the user may act."""
    return views.render(template, status, base=url_for("admin.home"),
                        can_act=current_user.is_admin, **context)


@bp.get("/")
@staff_required
def home():
    return redirect(url_for("admin.jobs"))


@bp.get("/jobs")
@staff_required
def jobs():
    where = JobFilter.from_args(request.args)
    rows, after = listing.page_of_rows(where, Cursor.parse(request.args.get("after")))
    return _render("admin/jobs.html", rows=rows, where=where, args=where.args(), after=after,
                   paged=bool(request.args.get("after")), states=STATES,
                   lanes=LANES, datasets=datasets.registry())


def _found(model: type, row_id: int):
    """The export job or email with this id, or a 404."""
    row = db.session.get(model, row_id)
    if row is None:
        abort(404)
    return row


def _allowed(kind: str, state: str) -> dict[str, bool]:
    """Which actions a job's or an email's state allows (the buttons on its page), from the
    same states the actions themselves check."""
    column = 0 if kind == "job" else 1
    return {action: state in states[column] for action, states in listing.ACTIONABLE.items()}


def _audit_log(subject: Column, row_id: int) -> list[AdminAction]:
    """The admin actions on one job or email (`subject`: AdminAction.job_id or .email_id)."""
    return list(db.session.scalars(select(AdminAction).where(subject == row_id)
                                   .order_by(AdminAction.id)))


@bp.get("/jobs/<int:job_id>/row")
@staff_required
def job_row(job_id: int):
    """The live cells of a list row (state, progress, count): they poll while the job is
    active, then stop. The rest of the row never changes, so it is not sent."""
    row = listing.job_row(job_id)
    if row is None:
        abort(404)
    return _render("admin/_live_cells.html", row=row, oob=True)


@bp.get("/jobs/<int:job_id>")
@staff_required
def job(job_id: int):
    job = _found(ExportJob, job_id)
    emails = db.session.scalars(select(OutboundEmail).where(OutboundEmail.job_id == job.id)
                                .order_by(OutboundEmail.id)).all()
    actions = _audit_log(AdminAction.job_id, job.id)
    files = storage()
    file_size = files.size(job.file_name) if job.file_name and files.exists(job.file_name) \
        else None
    return _render("admin/job.html", job=job, emails=emails, actions=actions,
                   file_size=file_size, part_size=files.parts_bytes(job.id) or None,
                   allowed=_allowed("job", job.state))


@bp.get("/emails/<int:email_id>")
@staff_required
def email(email_id: int):
    email = _found(OutboundEmail, email_id)
    return _render("admin/email.html", email=email, allowed=_allowed("email", email.state),
                   actions=_audit_log(AdminAction.email_id, email.id))


def audit(action: str, job_id: int | None = None, email_id: int | None = None,
          lane: str | None = None, detail: str = "") -> None:
    """Record an admin action in the audit log (the caller commits)."""
    db.session.add(AdminAction(user_id=current_user.id, action=action, job_id=job_id,
                               email_id=email_id, lane=lane, detail=detail))


def act(job: ExportJob, action: str, from_scratch: bool = False) -> None:
    """Cancel or retry one job and write it to the audit log; raises dispatch.WrongState."""
    before = job.state
    if action == "cancel":
        dispatch.cancel(job)
    else:
        dispatch.retry(job, from_scratch=from_scratch)
    name = "retry_from_scratch" if action == "retry" and from_scratch else action
    audit(name, job_id=job.id, detail=f"{before} -> {job.state}")


def act_on_email(email: OutboundEmail, action: str, from_scratch: bool = False) -> None:
    """Cancel or retry one email task and write it to the audit log; raises
    dispatch.WrongState. (`from_scratch` means nothing for an email: it has no checkpoint.)"""
    before, attempts = email.state, email.attempts
    if action == "cancel":
        dispatch.cancel_email(email)
    else:
        dispatch.retry_email(email)
    audit(action, email_id=email.id,
          detail=f"{before} -> {email.state} (after {attempts} attempt(s))")


# kind: (model, action on one row, what a person calls one, the page of one)
TARGETS = {"job": (ExportJob, act, "Export #{}", "admin.job"),
           "email": (OutboundEmail, act_on_email, "Email {}", "admin.email")}


def _change(kind: str, row_id: int, action: str):
    model, apply, name, page = TARGETS[kind]
    row = _found(model, row_id)
    reason = views.job_action(row, apply, action,
                              from_scratch=request.form.get("from_scratch") == "1")
    if reason is not None:
        return views.refused(reason)
    flash(f"{name.format(row_id)} {PAST[action]}.", "info")
    return redirect(url_for(page, **{f"{kind}_id": row_id}), code=303)


@bp.post("/jobs/<int:job_id>/<any(cancel, retry):action>")
@admin_required
def change(job_id: int, action: str):
    return _change("job", job_id, action)


@bp.post("/emails/<int:email_id>/<any(cancel, retry):action>")
@admin_required
def change_email(email_id: int, action: str):
    return _change("email", email_id, action)


@bp.get("/jobs/bulk")
@staff_required
def confirm_bulk():
    """Before acting on everything a filter matches: say how many jobs that is."""
    action = request.args.get("action")
    if action not in listing.ACTIONABLE:
        abort(404)
    where = JobFilter.from_args(request.args)
    counts = listing.count_matching(where, action)
    return _render("admin/confirm_bulk.html", action=action, where=where, counts=counts,
                   count=sum(counts.values()))


@bp.post("/jobs/bulk")
@admin_required
def bulk():
    """Cancel or retry the selected jobs and emails, or (scope=filter) every one the filter
    matches."""
    form = request.form
    action = form.get("action")
    if action not in listing.ACTIONABLE:
        abort(400, "Choose cancel or retry.")
    where = JobFilter.from_args(form)
    if form.get("scope") == "filter":
        chunks: Iterator[tuple[str, list[int]]] = listing.matching_ids(where, action)
    else:
        chunks = iter([(kind, [int(i) for i in form.getlist(field) if i.isdigit()][:1000])
                       for kind, field in (("job", "ids"), ("email", "email_ids"))])
    done, skipped = {"job": 0, "email": 0}, []
    for kind, chunk in chunks:
        model, apply, name, _ = TARGETS[kind]
        for row_id in chunk:
            row = db.session.get(model, row_id)
            if row is None:
                continue
            if views.job_action(row, apply, action,
                                from_scratch=form.get("from_scratch") == "1") is not None:
                skipped.append(name.format(row_id))
                continue
            done[kind] += 1
    current_app.logger.info("bulk %s by user %s: %s done, %d skipped", action,
                            current_user.id, done, len(skipped))
    message = f"{PAST[action].capitalize()} {done['job']} export(s)" + (
        f" and {done['email']} email(s)." if done["email"] else ".")
    if skipped:
        shown = ", ".join(skipped[:10])
        message += f" Skipped {len(skipped)} not in a state for it ({shown})."
    flash(message, "info")
    return redirect(url_for("admin.jobs", **where.args()), code=303)


@bp.get("/lanes")
@staff_required
def lanes():
    template = "admin/_lanes.html" if views.is_htmx() else "admin/lanes.html"
    return _render(template, health=dispatch.lane_health(), disk=retention.disk(),
                   sla=current_app.config["CRITICAL_SLA_SECONDS"])


@bp.post("/lanes/<name>/<any(pause, resume):action>")
@admin_required
def lane_action(name: str, action: str):
    if name not in LANES:
        abort(404)
    (dispatch.pause if action == "pause" else dispatch.resume)(name)
    audit(action, lane=name)
    db.session.commit()
    flash(f"Lane {name} {action}d.", "info")
    return redirect(url_for("admin.lanes"), code=303)
