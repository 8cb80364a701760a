"""The admin console: every job of every lane, cancel and retry (one or in bulk), lane health."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import replace

from flask import Blueprint, abort, current_app, flash, redirect, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import Column, select

from jobs import datasets, dispatch, listing, overview, retention
from jobs.lanes import LANES
from jobs.listing import STATES, Cursor, JobFilter
from jobs.models import AdminAction, ExportJob, OutboundEmail, db, utcnow
from jobs.storage import storage
from webapp import admin_text, charts, views

bp = Blueprint("admin", __name__, url_prefix="/admin")
bp.record_once(lambda state: admin_text.init_app(state.app))
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
    """The overview: how many exports and emails are in each state (each a link to the list
    showing them), the lanes' health and the last hour per minute."""
    health = dispatch.lane_health()
    counts = overview.overview(utcnow())
    return _render("admin/overview.html", counts=counts, health=health,
                   sla=current_app.config["CRITICAL_SLA_SECONDS"],
                   chart=charts.minute_chart(charts.combined(health)),
                   buckets=[b[0] for b in overview.BUCKETS])


# The list's tabs: by kind, and by state (which states depends on the kind shown).
KIND_TABS = (("", "Both"), ("exports", "Exports"), ("emails", "Emails"))
STATE_TABS = {"exports": ("queued", "running", "retrying", "failed", "succeeded", "cancelled"),
              "emails": ("queued", "sending", "retrying", "failed", "sent", "cancelled"),
              "": ("queued", "running", "sending", "retrying", "failed", "succeeded", "sent",
                   "cancelled")}


TAB_COUNT_CAP = 1000  # a tab counts this far ("1,000+" beyond): its cost stays flat


def _tabs(where: JobFilter, counted: bool = False) -> tuple[list, list]:
    """(label, query arguments, current) per kind tab, and (label, count, query arguments,
    current) per state tab: each keeps the other filters; counts (only when `counted`) stop
    past TAB_COUNT_CAP."""
    kinds = [(label, replace(where, kind=kind).args(), where.kind == kind)
             for kind, label in KIND_TABS]
    states = [("All", "", not where.state)] + [
        (state.capitalize(), state, where.state == state) for state in STATE_TABS[where.kind]]
    return kinds, [(label, _count(replace(where, state=state)) if counted else "",
                    replace(where, state=state).args(), current)
                   for label, state, current in states]


def _count(where: JobFilter) -> str:
    count = overview.capped_count(where, TAB_COUNT_CAP)
    return f"{TAB_COUNT_CAP:,}+" if count > TAB_COUNT_CAP else f"{count:,}"


@bp.get("/jobs")
@staff_required
def jobs():
    where = JobFilter.from_args(request.args)
    date_error = ("The end date is before the start date: swap them, or clear one."
                  if where.reversed else "")
    rows, after = ([], None) if date_error else listing.page_of_rows(
        where, Cursor.parse(request.args.get("after")))
    kind_tabs, state_tabs = _tabs(where)
    return _render("admin/jobs.html", 400 if date_error else 200, rows=rows, where=where,
                   args=where.args(), after=after, paged=bool(request.args.get("after")),
                   states=STATES, lanes=LANES, datasets=datasets.registry(),
                   kind_tabs=kind_tabs, state_tabs=state_tabs, date_error=date_error,
                   any_time=replace(where, ended_since=None).args(), counted=False)


@bp.get("/jobs/tabs")
@staff_required
def job_tabs():
    """The state tabs with their counts, asked for once the list is shown: counting a filter
    over a million jobs costs more than the list's first page, which need not wait for it."""
    where = JobFilter.from_args(request.args)
    return _render("admin/_state_tabs.html", state_tabs=_tabs(where, counted=True)[1],
                   args=where.args(), counted=True)


def _back(url: str):
    """After an action: a 303 to the page, or for htmx (a confirmed dialog's POST) an
    HX-Redirect, so the whole page shows again with its flashed message."""
    if views.is_htmx():
        return "", 200, {"HX-Redirect": url}
    return redirect(url, code=303)


def _confirm(question: str, explanation: str, action: str, yes: str, back: str,
             fields: list[tuple[str, str]] | None = None):
    """The confirmation step of a destructive action without JavaScript (with it, htmx asks
    in a dialog and posts at once): a page whose form does the POST."""
    return _render("admin/confirm.html", question=question, explanation=explanation,
                   action=action, yes=yes, back=back, fields=fields or [])


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
        if views.is_htmx():
            flash(reason, "error")
            return _back(url_for(page, **{f"{kind}_id": row_id}))
        return views.refused(reason)
    flash(f"{name.format(row_id)} {PAST[action]}.", "info")
    return _back(url_for(page, **{f"{kind}_id": row_id}))


CANCEL_WHY = {"job": "A waiting export is cancelled at once; a running one stops at its next "
                     "checkpoint and its rows so far are discarded.",
              "email": "A waiting email is not sent; an attempt already under way cannot be "
                       "interrupted."}


def _confirm_cancel(kind: str, row_id: int):
    model, _, name, page = TARGETS[kind]
    _found(model, row_id)
    what = name.format(row_id)
    return _confirm(f"Cancel {what[0].lower() + what[1:]}?", CANCEL_WHY[kind],
                    url_for(f"admin.change{'' if kind == 'job' else '_email'}",
                            action="cancel", **{f"{kind}_id": row_id}),
                    "Yes, cancel it", url_for(page, **{f"{kind}_id": row_id}))


@bp.get("/jobs/<int:job_id>/cancel")
@admin_required
def confirm_cancel(job_id: int):
    return _confirm_cancel("job", job_id)


@bp.get("/emails/<int:email_id>/cancel")
@admin_required
def confirm_cancel_email(email_id: int):
    return _confirm_cancel("email", email_id)


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
        picked = [(kind, [int(i) for i in form.getlist(field) if i.isdigit()][:1000])
                  for kind, field in (("job", "ids"), ("email", "email_ids"))]
        if not any(ids for _, ids in picked):
            message = "Select at least one export or email first: tick its box in the list."
            if views.is_htmx():  # htmx swaps no 400: say it on the list instead
                flash(message, "error")
                return _back(url_for("admin.jobs", **where.args()))
            return views.refused(message, 400)
        if action == "cancel" and form.get("confirmed") != "1":
            return _confirm_selected(where, picked)
        chunks = iter(picked)
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
    return _back(url_for("admin.jobs", **where.args()))


def _confirm_selected(where: JobFilter, picked: list[tuple[str, list[int]]]):
    """Before cancelling the ticked rows without JavaScript: say which, then post again."""
    jobs, emails = (ids for _, ids in picked)
    what = ", ".join([f"export #{i}" for i in jobs] + [f"email {i}" for i in emails])
    fields = [("action", "cancel"), ("confirmed", "1"), *[("ids", str(i)) for i in jobs],
              *[("email_ids", str(i)) for i in emails], *where.args().items()]
    return _confirm(f"Cancel {len(jobs)} export(s) and {len(emails)} email(s)?",
                    f"{what[0].upper()}{what[1:]}: waiting ones are cancelled at once, running "
                    "exports stop at their next checkpoint.", url_for("admin.bulk"),
                    f"Yes, cancel {len(jobs) + len(emails)}",
                    url_for("admin.jobs", **where.args()), fields)


@bp.get("/lanes")
@staff_required
def lanes():
    template = "admin/_lanes.html" if views.is_htmx() else "admin/lanes.html"
    health = dispatch.lane_health()
    return _render(template, health=health, disk=retention.disk(),
                   sla=current_app.config["CRITICAL_SLA_SECONDS"],
                   charts={h["lane"]: charts.minute_chart(h["minutes"]) for h in health})


@bp.get("/lanes/<name>/pause")
@admin_required
def confirm_pause(name: str):
    if name not in LANES:
        abort(404)
    return _confirm(f"Pause the {name} lane?", "Its consumers take nothing new until it is "
                    "resumed: running tasks finish, queued work waits.",
                    url_for("admin.lane_action", name=name, action="pause"),
                    f"Yes, pause {name}", url_for("admin.lanes"))


@bp.post("/lanes/<name>/<any(pause, resume):action>")
@admin_required
def lane_action(name: str, action: str):
    if name not in LANES:
        abort(404)
    (dispatch.pause if action == "pause" else dispatch.resume)(name)
    audit(action, lane=name)
    db.session.commit()
    flash(f"Lane {name} {action}d.", "info")
    return _back(url_for("admin.lanes"))
