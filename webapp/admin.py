"""The admin console: every job of every lane, cancel and retry (one or in bulk), lane health."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import Column, DateTime, Table, bindparam, func, select
from werkzeug.datastructures import MultiDict

from jobs import dispatch, retention
from jobs.datasets import DATASETS
from jobs.lanes import LANES
from jobs.models import (
    AdminAction,
    EmailState,
    ExportJob,
    JobParamValue,
    JobState,
    OutboundEmail,
    User,
    db,
    progress,
)
from jobs.storage import storage

bp = Blueprint("admin", __name__, url_prefix="/admin")
PAGE = 25  # rows per page, as in Sidekiq's Web UI: a page renders in a few ms
# Ids of jobs and emails follow creation time except among rows inserted concurrently; this
# slack (far more than concurrent writers) lets dates bound ids exactly (_date_range).
ID_SLACK = 1000
JOB_STATES = (*JobState.ACTIVE, *JobState.FINISHED)
EMAIL_STATES = (EmailState.QUEUED, EmailState.SENDING, EmailState.RETRYING, EmailState.SENT,
                EmailState.FAILED, EmailState.CANCELLED)
STATES = tuple(dict.fromkeys((*JOB_STATES, *EMAIL_STATES)))  # the filter's choices, once each
# action: (export states it applies to, email states it applies to, past tense)
ACTIONS = {"cancel": (dispatch.CANCELLABLE, EmailState.CANCELLABLE, "cancelled"),
           "retry": (dispatch.RETRYABLE, EmailState.RETRYABLE, "retried")}
# The list's statements are built per request from table columns: expressions over the ORM's
# annotated attributes cost about a third more to build and to run from the statement cache.
job_c, user_c, email_c = ExportJob.__table__.c, User.__table__.c, OutboundEmail.__table__.c
param_c = JobParamValue.__table__.c


def _date_range(table: Table) -> tuple[list, list]:
    """WHERE clauses over `table` (export jobs or emails) for the start and the end of a date
    range, given as the bound parameters range_start and range_end (JobFilter.params): built once,
    as they cost more to build than to run. The dates also bound the id, read from the
    created_at index, so a newest-first scan starts at the chosen days.

    A row created before another never has an id more than ID_SLACK above it. So no id in
    the range exceeds the highest id among the ID_SLACK rows created last before its end
    (exact: every page starts its scan there), and none is below the id of the first row
    created at its start minus ID_SLACK (only the last page walks that slack)."""
    c = table.c
    lo, hi = bindparam("range_start", type_=DateTime()), bindparam("range_end", type_=DateTime())
    first = (select(c.id).where(c.created_at >= lo).order_by(c.created_at).limit(1)
             .correlate(None).scalar_subquery())
    last = (select(c.id).where(c.created_at < hi).order_by(c.created_at.desc())
            .limit(ID_SLACK).subquery())
    return ([c.created_at >= lo, c.id >= first - ID_SLACK],
            [c.created_at < hi, c.id <= select(func.max(last.c.id)).scalar_subquery()])


DATE_RANGE = {t: _date_range(t) for t in (ExportJob.__table__, OutboundEmail.__table__)}


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


def _date(raw: str | None) -> date | None:
    try:
        return date.fromisoformat(raw) if raw else None
    except ValueError:
        return None


@dataclass(frozen=True)
class JobFilter:
    """What the admin list shows: unknown or malformed values are dropped, never a 500."""

    state: str = ""
    lane: str = ""
    dataset: str = ""
    user: str = ""
    date_from: date | None = None
    date_to: date | None = None
    q: str = ""

    @classmethod
    def from_args(cls, args: MultiDict) -> JobFilter:
        def pick(name: str, allowed) -> str:
            value = (args.get(name) or "").strip()
            return value if value in allowed else ""

        return cls(
            state=pick("state", STATES),
            lane=pick("lane", LANES),
            dataset=pick("dataset", DATASETS),
            user=(args.get("user") or "").strip()[:254],
            date_from=_date(args.get("date_from")),
            date_to=_date(args.get("date_to")),
            q=(args.get("q") or "").strip()[:200],
        )

    def args(self) -> dict[str, str]:
        """The filter as query arguments (only those set), for links and hidden fields."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {k: (v.isoformat() if isinstance(v, date) else v) for k, v in values if v}

    @property
    def value(self) -> str:
        """The parameter value searched for (lowercase, as job_param_values holds them), or ""
        when the search is empty, a job id or an email address."""
        if not self.q or "@" in self.q or self.q.removeprefix("#").isdigit():
            return ""
        return self.q.lower()

    @property
    def job_key(self) -> Column:
        """The job id to page by, newest first. A value search reads job_param_values' own
        job_id, so the database walks that value's index in order: sorting every match
        (SQLite does not carry the order across the join) would cost as much as a scan."""
        return param_c.job_id if self.value else job_c.id

    def _addresses(self) -> list[str]:
        """The user filter and an address searched for, lowercase as users' emails are stored."""
        return [email.lower() for email in (self.user, self.q if "@" in self.q else "") if email]

    def params(self) -> dict[str, datetime]:
        """Values for the bound parameters of the conditions (the date range, from midnight
        starting its first day to midnight ending its last): pass them to every execution of
        a statement built from job_conditions() or email_conditions()."""
        days = {"range_start": self.date_from,
                "range_end": self.date_to and self.date_to + timedelta(days=1)}
        return {k: datetime.combine(day, datetime.min.time()) for k, day in days.items() if day}

    def _dates(self, table: Table) -> list:
        start, end = DATE_RANGE[table]
        return (start if self.date_from else []) + (end if self.date_to else [])

    def job_conditions(self) -> list | None:
        """WHERE clauses over export_jobs; None when no export job can match."""
        where: list = []
        if self.state:
            if self.state not in JOB_STATES:
                return None
            where.append(job_c.state == self.state)
        if self.lane:
            where.append(job_c.lane == self.lane)
        if self.dataset:
            where.append(job_c.dataset == self.dataset)
        for address in self._addresses():  # an unknown address: NULL, so nothing matches
            owner = select(user_c.id).where(user_c.email == address).scalar_subquery()
            where.append(job_c.user_id == owner)
        where += self._dates(ExportJob.__table__)
        if self.value:
            where += [param_c.value == self.value, param_c.job_id == job_c.id]
        elif self.q and "@" not in self.q:
            where.append(job_c.id == int(self.q.removeprefix("#")))
        return where

    def email_conditions(self) -> list | None:
        """WHERE clauses over outbound_emails (the critical lane's email tasks), or None.

        A parameter-value search matches no email: matching subjects would be a substring scan
        of every email, as slow as the JSON scan job_param_values replaced."""
        if self.dataset or self.value or self.lane not in ("", "critical"):
            return None
        where: list = []
        if self.state:
            if self.state not in EMAIL_STATES:
                return None
            where.append(email_c.state == self.state)
        for address in self._addresses():
            where.append(email_c.to_address == address)
        where += self._dates(OutboundEmail.__table__)
        if self.q and "@" not in self.q:
            where.append(email_c.job_id == int(self.q.removeprefix("#")))
        return where


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the admin list, an export job or an email task of the critical lane, as
    the text it shows: a page renders 25 of them, so the template only places strings."""

    kind: str  # "job" or "email": also the path under /admin/ (jobs/7, emails/3)
    id: int
    created_at: datetime
    title: str
    detail: str
    lane: str
    owner: str
    state: str
    done: str  # rows of an export, attempts of an email
    percent: float | None  # a running export's progress bar
    live: bool  # an active export's row refreshes itself

    @property
    def requested(self) -> str:
        """When it was asked for, ISO 8601 (naive UTC)."""
        return self.created_at.isoformat()

    @property
    def requested_text(self) -> str:
        """The same to the second, as the list shows it."""
        return self.requested[:19].replace("T", " ")


# The list reads plain rows of the columns it shows (no ORM objects, no bodies or
# tracebacks), through the session's connection; statements are built once.
JOBS = (select(job_c.id, job_c.dataset, job_c.params, job_c.format, job_c.lane, job_c.state,
               job_c.rows_done, job_c.rows_total, job_c.created_at, user_c.email)
        .join(User.__table__, user_c.id == job_c.user_id))
EMAILS = (select(email_c.id, email_c.kind, email_c.subject, email_c.job_id, email_c.state,
                 email_c.attempts, email_c.created_at, email_c.to_address)
          .order_by(email_c.id.desc()))


def job_rows(conditions: list, limit: int, key: Column = job_c.id, binds: dict | None = None
             ) -> list[Row]:
    """Export jobs newest first (by `key`, see JobFilter.job_key), as rows of the list."""
    result = db.session.connection().execute(
        JOBS.where(*conditions).order_by(key.desc()).limit(limit), binds)
    rows = []
    for job_id, dataset, params, fmt, lane, state, done, total, created_at, owner in result:
        detail = fmt.upper() + "".join(f" · {k}={v}" for k, v in sorted(params.items()))
        counts = f"{done:,}" if total is None else f"{done:,} of {total:,}"
        running = state == JobState.RUNNING
        percent = round(progress(state, done, total) * 100, 1) if running else None
        rows.append(Row("job", job_id, created_at, f"#{job_id} {dataset}", detail, lane, owner,
                        state, counts, percent, state in JobState.ACTIVE))
    return rows


def email_rows(conditions: list, limit: int, binds: dict | None = None) -> list[Row]:
    """Email tasks of the critical lane newest first, as rows of the list."""
    result = db.session.connection().execute(EMAILS.where(*conditions).limit(limit), binds)
    return [Row("email", email_id, created_at, f"email {email_id} {kind}",
                subject + (f" · export #{job_id}" if job_id else ""), "critical", to, state,
                f"{attempts} attempt(s)", None, False)
            for email_id, kind, subject, job_id, state, attempts, created_at, to in result]


@dataclass(frozen=True)
class Cursor:
    """Keyset position: the last export job id and the last email id shown (None: from the top).

    Both streams are read newest first by id; a page merges them by creation time."""

    job: int | None = None
    email: int | None = None

    @classmethod
    def parse(cls, raw: str | None) -> Cursor:
        job, _, email = (raw or "").partition(".")
        return cls(int(job) if job.isdigit() else None, int(email) if email.isdigit() else None)

    def __str__(self) -> str:
        return f"{self.job or ''}.{self.email or ''}"


def page_of_rows(where: JobFilter, cursor: Cursor, size: int = PAGE
                 ) -> tuple[list[Row], Cursor | None]:
    """One page of the list, newest first, and the cursor of the next page (None: the last)."""
    candidates: list[Row] = []
    job_where = where.job_conditions()
    if job_where is not None:
        if cursor.job is not None:
            job_where.append(where.job_key < cursor.job)
        candidates += job_rows(job_where, size + 1, where.job_key, where.params())
    email_where = where.email_conditions()
    if email_where is not None:
        if cursor.email is not None:
            email_where.append(email_c.id < cursor.email)
        candidates += email_rows(email_where, size + 1, where.params())
    candidates.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    rows = candidates[:size]
    if len(candidates) <= size:
        return rows, None
    jobs = [r.id for r in rows if r.kind == "job"]
    emails = [r.id for r in rows if r.kind == "email"]
    return rows, Cursor(min(jobs) if jobs else cursor.job,
                        min(emails) if emails else cursor.email)


def _render(template: str, status: int = 200, **context):
    context.update(base=url_for("admin.home"), can_act=current_user.is_admin)
    response = make_response(render_template(template, **context), status)
    response.vary.add("HX-Request")
    return response


@bp.get("/")
@staff_required
def home():
    return redirect(url_for("admin.jobs"))


@bp.get("/jobs")
@staff_required
def jobs():
    where = JobFilter.from_args(request.args)
    rows, after = page_of_rows(where, Cursor.parse(request.args.get("after")))
    return _render("admin/jobs.html", rows=rows, where=where, args=where.args(), after=after,
                   paged=bool(request.args.get("after")), states=STATES,
                   lanes=LANES, datasets=DATASETS)


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
    return {action: state in states[column] for action, states in ACTIONS.items()}


def _audit_log(subject: Column, row_id: int) -> list[AdminAction]:
    """The admin actions on one job or email (`subject`: AdminAction.job_id or .email_id)."""
    return list(db.session.scalars(select(AdminAction).where(subject == row_id)
                                   .order_by(AdminAction.id)))


@bp.get("/jobs/<int:job_id>/row")
@staff_required
def job_row(job_id: int):
    """The live row of the list: it polls while the job is active, then stops."""
    rows = job_rows([job_c.id == job_id], 1)
    if not rows:
        abort(404)
    return _render("admin/_rows.html", rows=rows)


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
    try:
        apply(row, action, from_scratch=request.form.get("from_scratch") == "1")
    except dispatch.WrongState as exc:
        db.session.rollback()
        return render_template("error.html", status=409, message=str(exc)), 409
    db.session.commit()
    flash(f"{name.format(row_id)} {ACTIONS[action][2]}.", "info")
    return redirect(url_for(page, **{f"{kind}_id": row_id}), code=303)


@bp.post("/jobs/<int:job_id>/<any(cancel, retry):action>")
@admin_required
def change(job_id: int, action: str):
    return _change("job", job_id, action)


@bp.post("/emails/<int:email_id>/<any(cancel, retry):action>")
@admin_required
def change_email(email_id: int, action: str):
    return _change("email", email_id, action)


def _matching(where: JobFilter, action: str) -> dict[str, tuple[list, Column]]:
    """Per kind ("job", "email"): the WHERE clauses for the rows the filter matches that the
    action applies to, and the id to page them by."""
    jobs_allowed, emails_allowed, _ = ACTIONS[action]
    matching = {}
    if (conditions := where.job_conditions()) is not None:
        matching["job"] = [*conditions, job_c.state.in_(jobs_allowed)], where.job_key
    if (conditions := where.email_conditions()) is not None:
        matching["email"] = [*conditions, email_c.state.in_(emails_allowed)], email_c.id
    return matching


def _matching_ids(where: JobFilter, action: str) -> Iterator[tuple[str, list[int]]]:
    """(kind, ids) of the rows the filter matches that the action applies to, in chunks."""
    for kind, (conditions, key) in _matching(where, action).items():
        last = None
        while True:
            query = select(key).where(*conditions)
            if last is not None:
                query = query.where(key < last)
            chunk = db.session.scalars(query.order_by(key.desc()).limit(500),
                                       where.params()).all()
            if not chunk:
                break
            yield kind, list(chunk)
            last = chunk[-1]


def _count_matching(where: JobFilter, action: str) -> dict[str, int]:
    """How many export jobs and emails the action would apply to."""
    counts = {"job": 0, "email": 0}
    for kind, (conditions, key) in _matching(where, action).items():
        counts[kind] = db.session.scalar(select(func.count(key)).where(*conditions),
                                         where.params())
    return counts


@bp.get("/jobs/bulk")
@staff_required
def confirm_bulk():
    """Before acting on everything a filter matches: say how many jobs that is."""
    action = request.args.get("action")
    if action not in ACTIONS:
        abort(404)
    where = JobFilter.from_args(request.args)
    counts = _count_matching(where, action)
    return _render("admin/confirm_bulk.html", action=action, where=where, counts=counts,
                   count=sum(counts.values()))


@bp.post("/jobs/bulk")
@admin_required
def bulk():
    """Cancel or retry the selected jobs and emails, or (scope=filter) every one the filter
    matches."""
    form = request.form
    action = form.get("action")
    if action not in ACTIONS:
        abort(400, "Choose cancel or retry.")
    where = JobFilter.from_args(form)
    if form.get("scope") == "filter":
        chunks: Iterator[tuple[str, list[int]]] = _matching_ids(where, action)
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
            try:
                apply(row, action, from_scratch=form.get("from_scratch") == "1")
            except dispatch.WrongState:
                db.session.rollback()
                skipped.append(name.format(row_id))
                continue
            db.session.commit()
            done[kind] += 1
    current_app.logger.info("bulk %s by user %s: %s done, %d skipped", action,
                            current_user.id, done, len(skipped))
    message = f"{ACTIONS[action][2].capitalize()} {done['job']} export(s)" + (
        f" and {done['email']} email(s)." if done["email"] else ".")
    if skipped:
        shown = ", ".join(skipped[:10])
        message += f" Skipped {len(skipped)} not in a state for it ({shown})."
    flash(message, "info")
    return redirect(url_for("admin.jobs", **where.args()), code=303)


@bp.get("/lanes")
@staff_required
def lanes():
    template = "admin/_lanes.html" if request.headers.get("HX-Request") == "true" \
        else "admin/lanes.html"
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
