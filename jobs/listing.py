"""The job list as core API: filters, keyset pages and plain rows of export jobs and emails."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta

from sqlalchemy import Column, DateTime, Table, bindparam, func, select

from jobs import datasets, dispatch
from jobs.lanes import LANES
from jobs.models import (
    EmailState,
    ExportJob,
    JobParamValue,
    JobState,
    OutboundEmail,
    User,
    db,
    progress,
)

PAGE = 25  # rows per page, as in Sidekiq's Web UI: a page renders in a few ms
# Ids of jobs and emails follow creation time except among rows inserted concurrently; this
# slack (far more than concurrent writers) lets dates bound ids exactly (_date_range).
ID_SLACK = 1000
JOB_STATES = (*JobState.ACTIVE, *JobState.FINISHED)
EMAIL_STATES = (EmailState.QUEUED, EmailState.SENDING, EmailState.RETRYING, EmailState.SENT,
                EmailState.FAILED, EmailState.CANCELLED)
STATES = tuple(dict.fromkeys((*JOB_STATES, *EMAIL_STATES)))  # the filter's choices, once each
# action: (export job states it applies to, email states it applies to)
ACTIONABLE = {"cancel": (dispatch.CANCELLABLE, EmailState.CANCELLABLE),
              "retry": (dispatch.RETRYABLE, EmailState.RETRYABLE)}
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


def _date(raw: str | None) -> date | None:
    try:
        return date.fromisoformat(raw) if raw else None
    except ValueError:
        return None


def _moment(raw: str | None) -> datetime | None:
    """An ISO 8601 instant (naive UTC, a trailing Z allowed), to the second."""
    try:
        moment = datetime.fromisoformat(raw.removesuffix("Z")) if raw else None
    except ValueError:
        return None
    return moment.replace(tzinfo=None, microsecond=0) if moment else None


KINDS = ("exports", "emails")  # the kind filter: export jobs only, emails only ("": both)


@dataclass(frozen=True)
class JobFilter:
    """What the list shows: unknown or malformed values are dropped, never an error."""

    state: str = ""
    lane: str = ""
    dataset: str = ""
    user: str = ""
    date_from: date | None = None
    date_to: date | None = None
    q: str = ""
    kind: str = ""
    ended_since: datetime | None = None  # finished (sent, failed) at or after this instant

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> JobFilter:
        """The filter from query arguments or form fields (any mapping of names to strings)."""
        def pick(name: str, allowed) -> str:
            value = (args.get(name) or "").strip()
            return value if value in allowed else ""

        return cls(
            state=pick("state", STATES),
            lane=pick("lane", LANES),
            dataset=pick("dataset", datasets.registry()),
            user=(args.get("user") or "").strip()[:254],
            date_from=_date(args.get("date_from")),
            date_to=_date(args.get("date_to")),
            q=(args.get("q") or "").strip()[:200],
            kind=pick("kind", KINDS),
            ended_since=_moment(args.get("ended_since")),
        )

    @property
    def reversed(self) -> bool:
        """A date range that ends before it starts: a mistake to point out, not "no job"."""
        return bool(self.date_from and self.date_to and self.date_from > self.date_to)

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
        if self.kind == "emails":
            return None
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
        if self.ended_since:
            where.append(job_c.finished_at >= self.ended_since)
        if self.value:
            where += [param_c.value == self.value, param_c.job_id == job_c.id]
        elif self.q and "@" not in self.q:
            where.append(job_c.id == int(self.q.removeprefix("#")))
        return where

    def email_conditions(self) -> list | None:
        """WHERE clauses over outbound_emails (the critical lane's email tasks), or None.

        A parameter-value search matches no email: matching subjects would be a substring scan
        of every email, as slow as the JSON scan job_param_values replaced."""
        if (self.dataset or self.value or self.lane not in ("", "critical")
                or self.kind == "exports"):
            return None
        where: list = []
        if self.state:
            if self.state not in EMAIL_STATES:
                return None
            where.append(email_c.state == self.state)
        for address in self._addresses():
            where.append(email_c.to_address == address)
        where += self._dates(OutboundEmail.__table__)
        if self.ended_since:  # sent, or else its last attempt (the one that failed) began
            where.append(func.coalesce(email_c.sent_at, email_c.claimed_at) >= self.ended_since)
        if self.q and "@" not in self.q:
            where.append(email_c.job_id == int(self.q.removeprefix("#")))
        return where


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the list, an export job or an email task of the critical lane, as the
    text it shows: a page renders 25 of them, so a template only places strings."""

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


def job_row(job_id: int) -> Row | None:
    """One export job as a row of the list (a live row polls for it), or None."""
    rows = job_rows([job_c.id == job_id], 1)
    return rows[0] if rows else None


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


def page_of_jobs(where: JobFilter, before: int | None, size: int,
                 owner: tuple[int, int] | None = None) -> tuple[list[ExportJob], int | None]:
    """Export jobs the filter matches (only those a user made in an organisation, if `owner`
    (user id, organisation id) is given) below the id `before`, newest first, as ORM objects;
    and the `before` of the next page (None: the last)."""
    conditions = where.job_conditions()
    if conditions is None:
        return [], None
    if owner is not None:
        conditions += [ExportJob.user_id == owner[0], ExportJob.org_id == owner[1]]
    if before is not None:
        conditions.append(where.job_key < before)
    jobs = db.session.scalars(select(ExportJob).where(*conditions)
                              .order_by(where.job_key.desc()).limit(size + 1),
                              where.params()).all()
    if len(jobs) > size:
        return list(jobs[:size]), jobs[size - 1].id
    return list(jobs), None


def _matching(where: JobFilter, action: str) -> dict[str, tuple[list, Column]]:
    """Per kind ("job", "email"): the WHERE clauses for the rows the filter matches that the
    action applies to, and the id to page them by."""
    jobs_allowed, emails_allowed = ACTIONABLE[action]
    matching = {}
    if (conditions := where.job_conditions()) is not None:
        matching["job"] = [*conditions, job_c.state.in_(jobs_allowed)], where.job_key
    if (conditions := where.email_conditions()) is not None:
        matching["email"] = [*conditions, email_c.state.in_(emails_allowed)], email_c.id
    return matching


def matching_ids(where: JobFilter, action: str, chunk_size: int = 500
                 ) -> Iterator[tuple[str, list[int]]]:
    """(kind, ids) of the rows the filter matches that the action ("cancel", "retry")
    applies to, newest first, in chunks."""
    for kind, (conditions, key) in _matching(where, action).items():
        last = None
        while True:
            query = select(key).where(*conditions)
            if last is not None:
                query = query.where(key < last)
            chunk = db.session.scalars(query.order_by(key.desc()).limit(chunk_size),
                                       where.params()).all()
            if not chunk:
                break
            yield kind, list(chunk)
            last = chunk[-1]


def count_matching(where: JobFilter, action: str) -> dict[str, int]:
    """How many export jobs and emails the action would apply to."""
    counts = {"job": 0, "email": 0}
    for kind, (conditions, key) in _matching(where, action).items():
        counts[kind] = db.session.scalar(select(func.count(key)).where(*conditions),
                                         where.params())
    return counts
