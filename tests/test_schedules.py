"""Schedules: recurrence in a time zone across both daylight-saving changes, relative date
ranges, each due run made exactly once (two schedulers racing, an outage), the auto-pause and
its email, skip when empty."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import date, datetime, timedelta

import pytest
from mailserver import text_of
from sqlalchemy import func, select, update

from jobs import datasets, engine, schedules
from jobs.models import ExportJob, JobState, Schedule, db, utcnow
from webapp.auth import find_user


@pytest.fixture
def app(fresh):
    return fresh.app


def runs(cron: str, tz: str, start: datetime, count: int) -> list[datetime]:
    """The next `count` runs after `start` (naive UTC), each as the wall-clock time in `tz`."""
    from zoneinfo import ZoneInfo

    out, after = [], start
    for _ in range(count):
        after = schedules.next_run(cron, tz, after)
        out.append(after.replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(tz)))
    return out


def utc(*parts: int) -> datetime:
    return datetime(*parts)


# Europe/Berlin, 2026: clocks go 02:00 -> 03:00 on 29 March and 03:00 -> 02:00 on 25 October.

def test_daily_at_a_time_across_the_spring_change_runs_once_each_day():
    times = runs("30 2 * * *", "Europe/Berlin", utc(2026, 3, 27, 12), 4)
    assert [t.date() for t in times] == [date(2026, 3, d) for d in (28, 29, 30, 31)]
    # 02:30 does not exist on the 29th: that day's run is at 03:30, neither skipped nor doubled.
    assert [(t.hour, t.minute) for t in times] == [(2, 30), (3, 30), (2, 30), (2, 30)]
    assert [t.utcoffset() for t in times] == [timedelta(hours=h) for h in (1, 2, 2, 2)]


def test_daily_at_a_time_across_the_autumn_change_runs_once_each_day():
    times = runs("30 2 * * *", "Europe/Berlin", utc(2026, 10, 23, 12), 4)
    assert [t.date() for t in times] == [date(2026, 10, d) for d in (24, 25, 26, 27)]
    # 02:30 happens twice on the 25th: the run is at the first one only.
    assert [(t.hour, t.minute, t.fold) for t in times] == [(2, 30, 0)] * 4
    assert [t.utcoffset() for t in times] == [timedelta(hours=h) for h in (2, 2, 1, 1)]


def test_a_scheduler_ticking_inside_the_repeated_hour_does_not_run_again():
    first = schedules.next_run("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12))
    assert first == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    # 01:10 UTC is 02:10 the second time (CET): 02:30 is not due again that day.
    assert schedules.next_run("30 2 * * *", "Europe/Berlin", utc(2026, 10, 25, 1, 10)) == \
        utc(2026, 10, 26, 1, 30)


def test_hourly_cron_across_both_changes_has_no_two_runs_at_one_instant():
    spring = [schedules.next_run("0 * * * *", "Europe/Berlin", utc(2026, 3, 28, 23, 30))]
    for _ in range(5):
        spring.append(schedules.next_run("0 * * * *", "Europe/Berlin", spring[-1]))
    assert spring == [utc(2026, 3, 29, h) for h in range(6)]  # every UTC hour, once
    autumn = [schedules.next_run("0 * * * *", "Europe/Berlin", utc(2026, 10, 24, 22, 30))]
    for _ in range(4):
        autumn.append(schedules.next_run("0 * * * *", "Europe/Berlin", autumn[-1]))
    assert autumn == sorted(set(autumn))


def test_weekly_and_monthly_presets_and_a_cron_expression():
    weekly = schedules.preset_cron("weekly", "08:00", weekday=0)
    assert weekly == "0 8 * * 1"
    times = runs(weekly, "America/New_York", utc(2026, 3, 1, 12), 3)  # DST starts 8 March
    assert [t.strftime("%a %Y-%m-%d %H:%M %Z") for t in times] == [
        "Mon 2026-03-02 08:00 EST", "Mon 2026-03-09 08:00 EDT", "Mon 2026-03-16 08:00 EDT"]
    monthly = schedules.preset_cron("monthly", "06:15", day=1)
    times = runs(monthly, "Europe/Berlin", utc(2026, 2, 10), 3)
    assert [t.strftime("%Y-%m-%d %H:%M") for t in times] == [
        "2026-03-01 06:15", "2026-04-01 06:15", "2026-05-01 06:15"]
    assert [t.strftime("%a %H:%M") for t in runs("0 9 * * 1-5", "UTC", utc(2026, 12, 4), 2)] \
        == ["Fri 09:00", "Mon 09:00"]
    assert schedules.preset_of(weekly) == {"repeat": "weekly", "at": "08:00", "weekday": 0}
    assert schedules.preset_of(monthly) == {"repeat": "monthly", "at": "06:15", "day": 1}
    assert schedules.preset_of("0 9 * * 1-5") == {"repeat": "cron", "cron": "0 9 * * 1-5"}


@pytest.mark.parametrize(("kind", "days", "expected"), [
    ("yesterday", None, (date(2026, 3, 3), date(2026, 3, 3))),
    ("previous_week", None, (date(2026, 2, 23), date(2026, 3, 1))),
    ("previous_month", None, (date(2026, 2, 1), date(2026, 2, 28))),
    ("last_n_days", 7, (date(2026, 2, 25), date(2026, 3, 3))),
])
def test_relative_ranges_on_the_calendar_of_the_schedules_zone(kind, days, expected):
    at = utc(2026, 3, 4, 6, 30)  # Wednesday 4 March in UTC and Berlin
    assert schedules.resolve_range(kind, days, "Europe/Berlin", at) == expected


def test_the_day_a_range_counts_from_is_the_runs_day_in_its_zone():
    at = utc(2026, 3, 2, 6, 30)  # Monday in Berlin, still Sunday 22:30 in Los Angeles
    assert schedules.resolve_range("yesterday", None, "Europe/Berlin", at)[0] == date(2026, 3, 1)
    assert schedules.resolve_range("yesterday", None, "America/Los_Angeles", at)[0] == \
        date(2026, 2, 28)
    assert schedules.resolve_range("previous_week", None, "Europe/Berlin", at) == \
        (date(2026, 2, 23), date(2026, 3, 1))
    assert schedules.resolve_range("previous_week", None, "America/Los_Angeles", at) == \
        (date(2026, 2, 16), date(2026, 2, 22))
    assert schedules.resolve_range("previous_month", None, "Pacific/Auckland",
                                   utc(2026, 2, 28, 12)) == (date(2026, 2, 1), date(2026, 2, 28))


def make(app, email: str = "alice@acme.test", **data) -> int:
    """A schedule defined as the form or the API would, committed; returns its id."""
    fields = {"name": "Weekly settled", "dataset": "transactions", "format": "csv",
              "repeat": "weekly", "at": "08:00", "weekday": 0, "timezone": "Europe/Berlin",
              "date_range": "previous_week", "params": {"status": "settled"}, **data}
    with app.app_context():
        schedule = schedules.define(Schedule(), find_user(email), fields)
        db.session.add(schedule)
        db.session.commit()
        return schedule.id


def set_next_run(app, schedule_id: int, when: datetime) -> None:
    with app.app_context():
        db.session.execute(update(Schedule).where(Schedule.id == schedule_id)
                           .values(next_run_at=when))
        db.session.commit()


def jobs_of(app, schedule_id: int) -> list[ExportJob]:
    with app.app_context():
        jobs = db.session.scalars(select(ExportJob).where(ExportJob.schedule_id == schedule_id)
                                  .order_by(ExportJob.id)).all()
        for job in jobs:
            db.session.expunge(job)
        return jobs


def test_a_due_run_is_an_ordinary_export_job_with_the_range_filled_in(app):
    schedule_id = make(app)
    with app.app_context():
        schedule = db.session.get(Schedule, schedule_id)
        assert schedule.next_run_at > utcnow()
        assert schedule.params == {"status": "settled"}
        assert schedules.describe(schedule) == "Every Monday at 08:00 (Europe/Berlin)"
    set_next_run(app, schedule_id, utc(2026, 11, 30, 7))  # Monday 08:00 in Berlin
    with app.app_context():
        [job_id] = schedules.tick(now=utc(2026, 11, 30, 7, 0, 20))
    [job] = jobs_of(app, schedule_id)
    assert job.id == job_id and job.state == JobState.QUEUED and job.lane == "exports"
    assert job.params == {"status": "settled", "date_from": "2026-11-23", "date_to": "2026-11-29"}
    with app.app_context():
        engine.run(job_id, max_attempts=1)
        done = db.session.get(ExportJob, job_id)
        assert done.state == JobState.SUCCEEDED and done.file_name
        assert db.session.get(Schedule, schedule_id).last_run_at == utc(2026, 11, 30, 7)


def test_a_datetime_range_gets_midnights_of_the_schedules_zone_in_the_fields_zone(app):
    with app.app_context():
        dataset = datasets.get("transactions")
        low = next(f for f in dataset.params if f.name == "date_from")
        shifted = replace(dataset, params=(
            replace(low, name="at_from", kind="datetime", test="ge"),
            replace(low, name="at_to", kind="datetime", test="lt", after="at_from")))
        schedule = Schedule(date_range="yesterday", range_param="at", timezone="Europe/Berlin",
                            params={})
        assert schedules.range_params(shifted) == ["at"]
        assert schedules.run_params(schedule, shifted, utc(2026, 7, 2, 6)) == {
            "at_from": "2026-06-30T22:00:00", "at_to": "2026-07-01T22:00:00"}


def test_two_schedulers_racing_make_each_run_exactly_once(app):
    ids = [make(app, name=f"race {n}", repeat="daily") for n in range(12)]
    now = utcnow()
    for schedule_id in ids:
        set_next_run(app, schedule_id, now - timedelta(minutes=1))
    start = threading.Barrier(2)
    made: list[list[int]] = []
    errors: list[BaseException] = []

    def scheduler() -> None:
        try:
            with app.app_context():
                start.wait(30)
                made.append(schedules.tick(now=now))
                made.append(schedules.tick(now=now))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=scheduler) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    created = sorted(job for batch in made for job in batch)
    assert len(created) == len(set(created)) == len(ids)
    for schedule_id in ids:
        assert len(jobs_of(app, schedule_id)) == 1


def test_after_an_outage_the_missed_runs_are_made_up_once(app):
    schedule_id = make(app, repeat="daily", at="06:00")
    now = utcnow()
    set_next_run(app, schedule_id, now - timedelta(days=5))  # five daily slots missed
    with app.app_context():
        assert len(schedules.tick(now=now)) == 1
        assert schedules.tick(now=now) == []
        assert schedules.tick(now=now + timedelta(minutes=5)) == []
        schedule = db.session.get(Schedule, schedule_id)
        assert now < schedule.next_run_at <= now + timedelta(days=1)
        assert schedule.last_run_at == now - timedelta(days=5)
    [job] = jobs_of(app, schedule_id)
    # The range is the missed slot's: the week before it, as the run would have exported.
    slot_day = (now - timedelta(days=5)).date()
    assert job.params["date_to"] < slot_day.isoformat()


def fail_run(app, job_id: int) -> None:
    """Run the job to a permanent failure, as a worker would: its dataset is gone meanwhile."""
    with app.app_context():
        db.session.execute(update(ExportJob).where(ExportJob.id == job_id)
                           .values(dataset="payroll"))
        db.session.commit()
        with pytest.raises(engine.AttemptFailed):
            engine.run(job_id, max_attempts=1)


def test_consecutive_failures_pause_the_schedule_and_email_its_owner(app, sending):
    schedule_id = make(app, repeat="daily")
    for n in range(3):
        with app.app_context():
            assert db.session.get(Schedule, schedule_id).paused_at is None
            job = schedules.run_now(db.session.get(Schedule, schedule_id))
            db.session.commit()
            job_id = job.id
        if n == 1:  # a success in between starts the count again
            with app.app_context():
                engine.run(job_id, max_attempts=1)
            continue
        fail_run(app, job_id)
    with app.app_context():
        assert db.session.get(Schedule, schedule_id).failures == 1
    for _ in range(2):
        with app.app_context():
            job = schedules.run_now(db.session.get(Schedule, schedule_id))
            db.session.commit()
            job_id = job.id
        fail_run(app, job_id)
    with app.app_context():
        schedule = db.session.get(Schedule, schedule_id)
        assert schedule.paused_at is not None and schedule.failures == 3
        assert "its last 3 runs failed" in schedule.pause_reason
        set_next_run(app, schedule_id, utcnow() - timedelta(minutes=1))
        assert schedules.tick() == [], "a paused schedule makes no run"
    message = sending.wait_for(lambda m: "is paused" in m["Subject"])
    assert message["To"] == "alice@acme.test"
    assert message["Subject"] == "Your schedule “Weekly settled” is paused"
    body = text_of(message)
    assert f"export #{job_id}" in body and "no longer exists" in body
    assert f"/schedules/{schedule_id}" in body and "Resume" in body
    with app.app_context():
        schedule = db.session.get(Schedule, schedule_id)
        schedules.resume(schedule)
        db.session.commit()
        assert schedule.failures == 0 and schedule.next_run_at > utcnow()


def test_a_schedule_its_owner_can_no_longer_run_pauses_with_the_reason(app, sending):
    schedule_id = make(app, repeat="daily")
    with app.app_context():
        user = find_user("alice@acme.test")
        user.disabled_at = utcnow()
        db.session.commit()
    set_next_run(app, schedule_id, utcnow() - timedelta(minutes=1))
    with app.app_context():
        assert schedules.tick() == []
        schedule = db.session.get(Schedule, schedule_id)
        assert schedule.pause_reason == "its owner's account is disabled"
    assert "account is disabled" in text_of(sending.wait_for(lambda m: "paused" in m["Subject"]))


def test_skip_when_empty_makes_no_job_for_an_empty_range(app):
    empty = make(app, name="empty", repeat="daily", skip_when_empty="on",
                 params={"status": "settled"}, date_range="last_n_days", range_days=1)
    full = make(app, name="full", repeat="daily", skip_when_empty="on", date_range=None,
                params={})
    late = utc(2031, 1, 1, 12)  # the demo rows are all before this: yesterday has none
    for schedule_id in (empty, full):
        set_next_run(app, schedule_id, late - timedelta(minutes=1))
    with app.app_context():
        made = schedules.tick(now=late)
        assert len(made) == 1 and jobs_of(app, full)[0].id == made[0]
        assert jobs_of(app, empty) == []
        assert db.session.get(Schedule, empty).last_skipped_at == late - timedelta(minutes=1)
        # By hand it runs all the same: the user asked for it.
        assert schedules.run_now(db.session.get(Schedule, empty)).schedule_id == empty


@pytest.mark.parametrize(("data", "field"), [
    ({"name": ""}, "name"),
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"repeat": "cron", "cron": "every monday"}, "cron"),
    ({"repeat": "cron", "cron": "0 0 30 2 *"}, "cron"),
    ({"repeat": "monthly", "day": 31}, "day"),
    ({"at": "25:00"}, "at"),
    ({"date_range": "last_n_days", "range_days": "0"}, "range_days"),
    ({"date_range": "fortnight"}, "date_range"),
    ({"params": {"status": "lost"}}, "status"),
    ({"format": "pdf"}, "format"),
])
def test_a_bad_definition_names_the_field(app, data, field):
    with app.app_context(), pytest.raises(datasets.InvalidParams) as refused:
        schedules.define(Schedule(), find_user("alice@acme.test"),
                         {"name": "x", "dataset": "transactions", "repeat": "daily",
                          "at": "08:00", **data})
    assert field in refused.value.errors


def test_deleting_a_schedule_keeps_its_runs_as_plain_jobs(app):
    schedule_id = make(app)
    with app.app_context():
        job_id = schedules.run_now(db.session.get(Schedule, schedule_id)).id
        db.session.commit()
        schedules.delete(db.session.get(Schedule, schedule_id))
        db.session.commit()
        assert db.session.get(ExportJob, job_id).schedule_id is None
        assert db.session.scalar(select(func.count()).select_from(Schedule)) == 0
