"""Recurring exports: when a schedule is due (cron in its time zone), the date range each run
exports, and making each due run an ordinary export job exactly once (docs/schedules.md)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from jobs import datasets, dispatch, signals, source
from jobs.datasets import Dataset, InvalidParams
from jobs.models import ExportJob, JobState, Schedule, User, db, locked, utcnow

log = logging.getLogger(__name__)

RANGES = {"yesterday": "Yesterday", "previous_week": "The previous calendar week (Mon–Sun)",
          "previous_month": "The previous calendar month", "last_n_days": "The last N days"}
REPEATS = ("daily", "weekly", "monthly", "cron")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TICK_BATCH = 200  # due schedules one tick takes on; the next tick takes the rest
AT = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
PRESET = re.compile(r"^(\d+) (\d+) (\*|\d+) \* (\*|\d)$")


class CannotRun(Exception):
    """The schedule cannot make a run now; the message says why, for its owner."""


def next_run(cron: str, tz: str, after: datetime) -> datetime:
    """The first time (naive UTC) after `after` (naive UTC) that `cron` matches on the wall
    clock of `tz`.

    The cron walks wall-clock times, each once, so across daylight-saving changes no run is
    doubled or skipped: a time the clocks jump over (02:30 when 02:00 becomes 03:00) runs
    when it would have been (03:30), and a time that happens twice (when 03:00 goes back to
    02:00) runs at its first occurrence only."""
    zone = ZoneInfo(tz)
    wall = after.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)
    times = croniter(cron, wall - timedelta(hours=3))  # from before a repeated hour
    for _ in range(10_000):
        moment = times.get_next(datetime).replace(tzinfo=zone).astimezone(UTC)
        moment = moment.replace(tzinfo=None)
        if moment > after:
            return moment
    raise CroniterBadDateError(f"{cron!r} has no time after {after}")


def preset_cron(repeat: str, at: str, weekday: int = 0, day: int = 1) -> str:
    """A preset (daily, weekly on a weekday, monthly on a day, at HH:MM) as a cron expression."""
    hour, minute = (int(part) for part in at.split(":"))
    if repeat == "daily":
        return f"{minute} {hour} * * *"
    if repeat == "weekly":
        return f"{minute} {hour} * * {(weekday + 1) % 7}"  # cron counts from Sunday = 0
    return f"{minute} {hour} {day} * *"


def preset_of(cron: str) -> dict:
    """The preset a cron expression was made from (for the edit form), else {"repeat": "cron"}."""
    match = PRESET.match(cron)
    if not match or int(match[1]) > 59 or int(match[2]) > 23:
        return {"repeat": "cron", "cron": cron}
    minute, hour, day, weekday = match.groups()
    at = f"{int(hour):02}:{int(minute):02}"
    if day == "*" and weekday == "*":
        return {"repeat": "daily", "at": at}
    if day == "*":
        return {"repeat": "weekly", "at": at, "weekday": (int(weekday) - 1) % 7}
    if weekday == "*" and 1 <= int(day) <= 28:
        return {"repeat": "monthly", "at": at, "day": int(day)}
    return {"repeat": "cron", "cron": cron}


def describe(schedule: Schedule) -> str:
    """The recurrence in words: "Every Monday at 08:00 (Europe/Paris)"."""
    preset = preset_of(schedule.cron)
    when = {"daily": lambda: f"Every day at {preset['at']}",
            "weekly": lambda: f"Every {WEEKDAYS[preset['weekday']]} at {preset['at']}",
            "monthly": lambda: f"Every month on day {preset['day']} at {preset['at']}",
            "cron": lambda: f"Cron {schedule.cron}"}[preset["repeat"]]()
    return f"{when} ({schedule.timezone})"


def local(moment: datetime | None, tz: str) -> datetime | None:
    """A stored (naive UTC) time on the wall clock of `tz`, with its offset."""
    return moment.replace(tzinfo=UTC).astimezone(ZoneInfo(tz)) if moment else None


def definition(schedule: Schedule) -> dict:
    """The schedule as `define` takes it (the edit form's values, a PATCH's starting point)."""
    return {"name": schedule.name, "dataset": schedule.dataset, "format": schedule.format,
            "params": dict(schedule.params or {}), "date_range": schedule.date_range,
            "range_param": schedule.range_param, "range_days": schedule.range_days,
            "timezone": schedule.timezone, "skip_when_empty": schedule.skip_when_empty,
            "cron": schedule.cron, **preset_of(schedule.cron)}


def resolve_range(kind: str, days: int | None, tz: str, at: datetime) -> tuple[date, date]:
    """The first and last day (both included) of a relative range, for a run at `at` (naive
    UTC), counted on the calendar of `tz`: "yesterday" is the day before the run's own day
    there. "last_n_days" is the N whole days before that day."""
    today = at.replace(tzinfo=UTC).astimezone(ZoneInfo(tz)).date()
    if kind == "yesterday":
        return today - timedelta(days=1), today - timedelta(days=1)
    if kind == "previous_week":
        monday = today - timedelta(days=today.weekday() + 7)
        return monday, monday + timedelta(days=6)
    if kind == "previous_month":
        last = today.replace(day=1) - timedelta(days=1)
        return last.replace(day=1), last
    if kind == "last_n_days":
        return today - timedelta(days=days or 1), today - timedelta(days=1)
    raise ValueError(f"unknown date range {kind!r}")


def range_params(dataset: Dataset) -> list[str]:
    """The dataset's date and datetime range parameters (`<name>_from`, `<name>_to`) by name."""
    fields = {f.name: f for f in dataset.params}
    return [f.name.removesuffix("_from") for f in dataset.params
            if f.name.endswith("_from") and f.kind in ("date", "datetime")
            and f.name.removesuffix("_from") + "_to" in fields]


def _range_values(dataset: Dataset, param: str, first: date, last: date, tz: str) -> dict:
    """A day range as the dataset's two fields: days as they are for a date range; for a
    datetime range, midnight in the schedule's zone written in the field's zone, end excluded."""
    low = next(f for f in dataset.params if f.name == f"{param}_from")
    if low.kind == "date":
        return {f"{param}_from": first.isoformat(), f"{param}_to": last.isoformat()}

    def midnight(day: date) -> str:
        moment = datetime.combine(day, time.min).replace(tzinfo=ZoneInfo(tz))
        return moment.astimezone(ZoneInfo(low.tz)).replace(tzinfo=None).isoformat()

    return {f"{param}_from": midnight(first), f"{param}_to": midnight(last + timedelta(days=1))}


def run_params(schedule: Schedule, dataset: Dataset, at: datetime) -> dict[str, str]:
    """The parameters of the run due at `at`: the fixed ones and the range resolved then."""
    params = dict(schedule.params or {})
    if schedule.date_range and schedule.range_param:
        first, last = resolve_range(schedule.date_range, schedule.range_days, schedule.timezone,
                                    at)
        params.update(_range_values(dataset, schedule.range_param, first, last,
                                    schedule.timezone))
    return dataset.clean_params(params)


def define(schedule: Schedule, user: User, data: dict) -> Schedule:
    """Check a schedule's definition (from the form or the API) and write it on `schedule`
    (new or edited) for `user`; InvalidParams with every field's error otherwise.

    `data`: name, dataset, format, params (fixed), date_range, range_param, range_days,
    repeat (daily, weekly, monthly or cron), at ("08:00"), weekday (0 = Monday), day (1-28),
    cron, timezone, skip_when_empty."""
    errors: dict[str, str] = {}
    name = str(data.get("name") or "").strip()
    if not name or len(name) > 120:
        errors["name"] = "is required (120 characters at most)"
    dataset = datasets.get(data.get("dataset"))
    if dataset is None or not dataset.allows(user.role):
        raise InvalidParams({"dataset": "Unknown dataset; choose one of "
                                        f"{', '.join(sorted(datasets.visible(user)))}"})
    fmt = data.get("format") or "csv"
    if fmt not in dataset.formats:
        errors["format"] = f"must be one of {', '.join(dataset.formats)}"
    tz = str(data.get("timezone") or "UTC").strip()
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        errors["timezone"] = "must be a time zone such as Europe/Paris or America/New_York"
        tz = "UTC"
    cron = _recurrence(data, errors)
    if cron is not None:
        try:
            next_run(cron, tz, utcnow())
        except (CroniterBadDateError, ValueError, KeyError):
            errors["cron"] = "never matches a date"
    date_range = data.get("date_range") or None
    range_param, days = data.get("range_param") or None, None
    if date_range is not None:
        candidates = range_params(dataset)
        if not isinstance(date_range, str) or date_range not in RANGES:
            errors["date_range"] = f"must be one of {', '.join(RANGES)}"
        elif not candidates:
            errors["date_range"] = f"{dataset.title} has no date range to fill in"
        range_param = range_param or (candidates[0] if candidates else None)
        if candidates and range_param not in candidates:
            errors["range_param"] = f"must be one of {', '.join(candidates)}"
        if date_range == "last_n_days":
            days = _whole(data.get("range_days"), 1, 366)
            if days is None:
                errors["range_days"] = "must be a whole number of days from 1 to 366"
    raw_params = data.get("params")
    if raw_params is not None and not isinstance(raw_params, dict):
        errors["params"] = "must be an object of parameter names to values"
        raw_params = {}
    fixed = {k: v for k, v in (raw_params or {}).items()
             if not (range_param and k in (f"{range_param}_from", f"{range_param}_to")
                     and date_range)}
    if errors:
        raise InvalidParams(errors)
    schedule.user, schedule.org_id = user, user.org_id
    schedule.name, schedule.dataset, schedule.format = name, dataset.name, fmt
    schedule.date_range = date_range
    schedule.range_param = range_param if date_range else None
    schedule.range_days = days
    schedule.cron, schedule.timezone = cron, tz
    schedule.params = fixed
    schedule.params = {k: v for k, v in run_params(schedule, dataset, utcnow()).items()
                       if k in fixed}  # cleaned, checked with the range filled in
    schedule.skip_when_empty = data.get("skip_when_empty") in (True, "true", "on", "1", "yes")
    if not schedule.paused:
        schedule.next_run_at = next_run(cron, tz, utcnow())
    return schedule


def _whole(raw: object, low: int, high: int) -> int | None:
    try:
        number = int(str(raw).strip())
    except ValueError:
        return None
    return number if low <= number <= high else None


def _recurrence(data: dict, errors: dict[str, str]) -> str | None:
    """The cron expression of the preset or expression asked for; errors noted in `errors`."""
    repeat = data.get("repeat") or "daily"
    if repeat not in REPEATS:
        errors["repeat"] = f"must be one of {', '.join(REPEATS)}"
        return None
    if repeat == "cron":
        cron = " ".join(str(data.get("cron") or "").split())
        if len(cron) > 120 or len(cron.split()) != 5 or not croniter.is_valid(cron):
            errors["cron"] = "must be a cron expression of five fields, e.g. 0 8 * * 1"
            return None
        return cron
    at = str(data.get("at") or "").strip()
    if not AT.match(at):
        errors["at"] = "must be a time like 08:00"
        return None
    weekday = _whole(data.get("weekday", 0), 0, 6)
    day = _whole(data.get("day", 1), 1, 28)
    if repeat == "weekly" and weekday is None:
        errors["weekday"] = "must be a day of the week (0 = Monday to 6 = Sunday)"
        return None
    if repeat == "monthly" and day is None:
        errors["day"] = "must be a day of the month from 1 to 28 (every month has it)"
        return None
    hour, minute = at.split(":")
    return preset_cron(repeat, f"{int(hour):02}:{minute}", weekday or 0, day or 1)


def tick(now: datetime | None = None) -> list[int]:
    """Make the run of every due schedule (one each, however many slots an outage missed);
    returns the new jobs' ids. Any number of schedulers may tick at once: each schedule is
    claimed under its row lock and advanced in the transaction that records its run."""
    now = now or utcnow()
    due = list(db.session.scalars(
        select(Schedule.id).where(Schedule.paused_at.is_(None), Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at).limit(TICK_BATCH)))
    db.session.commit()
    made = []
    for schedule_id in due:
        try:
            job_id = _run_due(schedule_id, now)
        except Exception:  # one schedule's trouble never stops the others
            db.session.rollback()
            log.exception("schedule %s: could not make its run", schedule_id)
            continue
        if job_id is not None:
            made.append(job_id)
    return made


def _claim(schedule_id: int) -> Schedule | None:
    """The schedule under its row lock, or None when another scheduler holds it (PostgreSQL:
    SKIP LOCKED, no waiting) or it is gone. SQLite serialises writers (BEGIN IMMEDIATE)."""
    if db.session.get_bind().dialect.name == "sqlite":
        return locked(Schedule, schedule_id)
    return db.session.scalars(
        select(Schedule).where(Schedule.id == schedule_id)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)).first()


def _run_due(schedule_id: int, now: datetime) -> int | None:
    schedule = _claim(schedule_id)
    if schedule is None or schedule.paused or schedule.next_run_at > now:
        db.session.rollback()  # another scheduler made this run already
        return None
    slot = schedule.next_run_at
    schedule.last_run_at = slot
    # From now, not from the slot: the slots an outage missed become this one run.
    schedule.next_run_at = next_run(schedule.cron, schedule.timezone, now)
    try:
        job = start_run(schedule, slot)
    except CannotRun as exc:
        auto_pause(schedule, str(exc))
        job = None
    db.session.commit()
    if job is not None:
        log.info("schedule %s: run for %s is job %s", schedule_id, slot, job.id)
    return job.id if job else None


def start_run(schedule: Schedule, at: datetime, manual: bool = False) -> ExportJob | None:
    """Record the run due at `at` as a queued export job of the owner, marked with its
    schedule, sent to the exports lane once the caller commits; None when skipped as empty
    (never when `manual`). CannotRun when it cannot run at all."""
    user = schedule.user
    dataset = datasets.get(schedule.dataset)
    if not user.is_active:
        raise CannotRun("its owner's account is disabled")
    if user.org_id != schedule.org_id:
        raise CannotRun("its owner moved to another organisation")
    if dataset is None or not dataset.allows(user.role):
        raise CannotRun(f"the dataset {schedule.dataset!r} is no longer available to its owner")
    try:
        params = run_params(schedule, dataset, at)
    except InvalidParams as exc:
        raise CannotRun(f"its parameters are no longer valid ({exc})") from None
    if schedule.skip_when_empty and not manual and _empty(dataset, user, params):
        schedule.last_skipped_at = at
        log.info("schedule %s: nothing to export for %s, skipped", schedule.id, at)
        return None
    job = ExportJob(user=user, org_id=schedule.org_id, dataset=dataset.name,
                    definition=dataset.fingerprint, params=params, format=schedule.format,
                    lane="exports", state=JobState.QUEUED, schedule_id=schedule.id)
    db.session.add(job)
    db.session.flush()
    dispatch.submit(job)
    return job


def _empty(dataset: Dataset, user: User, params: dict) -> bool:
    """Whether the run would export no row (when the count fails, it is not: the run goes)."""
    try:
        with source.connect() as conn:
            key = user.organisation.data_key_or_id
            return conn.execute(dataset.count(key, params)).scalar_one() == 0
    except SQLAlchemyError as exc:
        log.warning("could not count the rows of %s (%s): running anyway", dataset.name, exc)
        return False


def run_now(schedule: Schedule) -> ExportJob:
    """A run asked for by hand, now, with the range resolved for now; the timetable stays."""
    job = start_run(schedule, utcnow(), manual=True)
    assert job is not None  # a manual run is never skipped
    return job


def pause(schedule: Schedule) -> None:
    """Paused by its owner (or an admin): no run until resumed."""
    schedule.paused_at, schedule.pause_reason = utcnow(), "paused by hand"


def auto_pause(schedule: Schedule, reason: str) -> None:
    """Paused by itself, for `reason`; the owner is told (jobs.signals.schedule_paused)."""
    schedule.paused_at, schedule.pause_reason = utcnow(), reason
    log.warning("schedule %s paused: %s", schedule.id, reason)
    signals.schedule_paused.send(current_app._get_current_object(), schedule=schedule)


def resume(schedule: Schedule) -> None:
    """Runs again from the next time due after now (the ones missed while paused are not
    made up), with its failures forgotten."""
    schedule.paused_at = schedule.pause_reason = None
    schedule.failures = 0
    schedule.next_run_at = next_run(schedule.cron, schedule.timezone, utcnow())


def delete(schedule: Schedule) -> None:
    """Delete the schedule; its runs stay as ordinary jobs (unmarked)."""
    db.session.execute(update(ExportJob).where(ExportJob.schedule_id == schedule.id)
                       .values(schedule_id=None).execution_options(synchronize_session=False))
    db.session.delete(schedule)


def runs(schedule: Schedule, limit: int = 10) -> list[ExportJob]:
    """Its latest runs, newest first."""
    return list(db.session.scalars(
        select(ExportJob).where(ExportJob.schedule_id == schedule.id)
        .order_by(ExportJob.id.desc()).limit(limit)))


def _on_export_finished(_app: object, job: ExportJob) -> None:
    """Count a run's failure (a success resets the count); at SCHEDULE_FAILURE_LIMIT
    consecutive failures the schedule pauses itself. In the transaction recording the end."""
    if job.schedule_id is None or job.state not in (JobState.SUCCEEDED, JobState.FAILED):
        return
    schedule = locked(Schedule, job.schedule_id)
    if schedule is None:
        return
    if job.state == JobState.SUCCEEDED:
        schedule.failures = 0
        return
    schedule.failures += 1
    limit = current_app.config["SCHEDULE_FAILURE_LIMIT"]
    if limit and schedule.failures >= limit and not schedule.paused:
        auto_pause(schedule, f"its last {schedule.failures} runs failed (the last one, export "
                             f"#{job.id}: {job.error or 'no reason recorded'})")


signals.export_finished.connect(_on_export_finished)
