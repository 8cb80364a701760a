"""Counts for the admin overview and the list's state tabs: grouped COUNTs over the same
conditions the job list uses, so a count and the list it links to always agree."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select

from jobs.listing import JobFilter, email_c, job_c
from jobs.models import EmailState, JobState, db

# The overview's rows: (bucket, export job state, email state). Emails are "sending" where
# exports are "running", and "sent" where exports "succeeded".
BUCKETS = (("queued", JobState.QUEUED, EmailState.QUEUED),
           ("running", JobState.RUNNING, EmailState.SENDING),
           ("retrying", JobState.RETRYING, EmailState.RETRYING),
           ("failed", JobState.FAILED, EmailState.FAILED),
           ("succeeded", JobState.SUCCEEDED, EmailState.SENT))
WINDOWED = {"failed", "succeeded"}  # counted over a recent window, the others as they are now


@dataclass(frozen=True)
class Count:
    """One number of the overview and the list filter that shows exactly those rows."""

    kind: str  # "exports" or "emails"
    bucket: str
    count: int
    where: JobFilter


def state_counts(where: JobFilter) -> dict[str, int]:
    """How many rows the filter matches in each state (exports and emails added up): one
    grouped COUNT per table. The list's tabs pass the filter without its state."""
    totals: dict[str, int] = {}
    for column, conditions in ((job_c.state, where.job_conditions()),
                               (email_c.state, where.email_conditions())):
        if conditions is None:
            continue
        query = select(column, func.count()).where(*conditions).group_by(column)
        for state, number in db.session.execute(query, where.params()):
            totals[state] = totals.get(state, 0) + number
    return totals


def capped_count(where: JobFilter, cap: int) -> int:
    """How many rows the filter matches, counted up to `cap` + 1 only: it reads at most that
    many index entries, so the list's tabs cost the same at a million jobs as at a hundred
    (a result past `cap` reads as "cap+")."""
    total = 0
    for column, conditions in ((job_c.state, where.job_conditions()),
                               (email_c.state, where.email_conditions())):
        if conditions is None or total > cap:
            continue
        first = select(column).where(*conditions).limit(cap + 1 - total).subquery()
        total += db.session.scalar(select(func.count()).select_from(first), where.params())
    return total


def overview(now: datetime) -> list[Count]:
    """Per kind and bucket: queued, running and retrying as they are now; failed in the 24 h
    before `now` and succeeded since midnight (UTC) of `now`'s day, by when they ended
    (the (state, finished_at) and (state, sent_at) indexes bound those scans)."""
    midnight = datetime.combine(now.date(), datetime.min.time())
    windows = {"failed": {"ended_since": now.replace(microsecond=0) - timedelta(hours=24)},
               "succeeded": {"ended_since": midnight}}
    counts = []
    for kind, column in (("exports", 1), ("emails", 2)):
        grouped = _grouped(kind, [b[column] for b in BUCKETS if b[0] not in WINDOWED])
        for bucket in BUCKETS:
            where = JobFilter(kind=kind, state=bucket[column], **windows.get(bucket[0], {}))
            number = (grouped.get(bucket[column], 0) if bucket[0] not in WINDOWED
                      else state_counts(where).get(bucket[column], 0))
            counts.append(Count(kind, bucket[0], number, where))
    return counts


def _grouped(kind: str, states: list[str]) -> dict[str, int]:
    """Rows of one table in each of `states`, in one grouped COUNT over the state index."""
    column = job_c.state if kind == "exports" else email_c.state
    query = select(column, func.count()).where(column.in_(states)).group_by(column)
    return dict(db.session.execute(query).all())
