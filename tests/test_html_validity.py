"""HTML that validates: `<time datetime>` with at most three fractional digits (HTML's limit;
Python's isoformat() gives six), and a <title> in every email's HTML part."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import ROOT, login, run_inline
from sqlalchemy import select

from jobs import schedules
from jobs.models import ExportJob, JobState, OutboundEmail, Schedule, db
from webapp import emails
from webapp.auth import create_token, find_user
from webapp.times import iso_time

VALID = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?Z")


@pytest.mark.parametrize("moment, expected", [
    (datetime(2026, 12, 2, 13, 4, 5, 123456), "2026-12-02T13:04:05.123Z"),
    (datetime(2026, 12, 2, 13, 4, 5, 999999), "2026-12-02T13:04:05.999Z"),
    (datetime(2026, 12, 2, 13, 4, 5), "2026-12-02T13:04:05Z"),
    (datetime(2026, 12, 2, 14, 4, 5, 500, tzinfo=timezone(timedelta(hours=1))),
     "2026-12-02T13:04:05.000Z"),
    (datetime(2026, 12, 2, 13, 4, 5, tzinfo=UTC), "2026-12-02T13:04:05Z"),
])
def test_iso_time_has_at_most_milliseconds_and_a_z(moment, expected):
    assert iso_time(moment) == expected


def datetimes(html: str) -> list[str]:
    return re.findall(r'datetime="([^"]*)"', html)


def test_no_time_on_the_pages_has_more_than_three_fractional_digits(app):
    job = run_inline(app, "alice@acme.test", "orders")
    with app.app_context():
        create_token(find_user("alice@acme.test"), "validity")
        alice_id = find_user("alice@acme.test").id
        email_id = db.session.scalar(select(OutboundEmail.id).where(
            OutboundEmail.job_id == job.id))
    alice = login(app.test_client(), "alice@acme.test")
    admin = login(app.test_client(), "admin@exportdesk.test")
    seen = []
    for client, path in [(alice, "/exports"), (alice, f"/exports/{job.id}"), (alice, "/account"),
                         (admin, "/admin/"), (admin, "/admin/jobs"),
                         (admin, f"/admin/jobs/{job.id}"), (admin, f"/admin/emails/{email_id}"),
                         (admin, "/admin/people/"), (admin, f"/admin/people/users/{alice_id}"),
                         (admin, "/admin/lanes")]:
        response = client.get(path)
        assert response.status_code == 200, path
        for value in datetimes(response.get_data(as_text=True)):
            assert VALID.fullmatch(value), (path, value)
            seen.append(path)
    assert "/exports" in seen and "/account" in seen, "the pages show times to check"


def test_every_email_html_has_a_title(fresh):
    app = fresh.app
    run_inline(app, "alice@acme.test", "orders")
    with app.app_context():
        alice = find_user("alice@acme.test")
        emails.password_reset(alice)
        emails.invitation(find_user("bob@globex.test"), alice)
        failed = ExportJob(user=alice, org_id=alice.org_id, dataset="orders", params={},
                           state=JobState.FAILED, error="The source database did not answer.")
        db.session.add(failed)
        db.session.flush()
        emails.export_finished(failed)
        schedule = schedules.define(Schedule(), alice, {"name": "Nightly", "dataset": "orders",
                                                        "repeat": "daily", "at": "03:00"})
        db.session.add(schedule)
        db.session.flush()
        schedules.auto_pause(schedule, "its owner's account is disabled")
        db.session.commit()
        sent = db.session.scalars(select(OutboundEmail)).all()
        kinds = {email.kind for email in sent}
        for email in sent:
            title = re.search(r"<head>.*<title>([^<]+)</title>.*</head>", email.html_body, re.S)
            assert title and title.group(1) == email.subject, email.kind
    templates = {path.stem for path in (Path(ROOT) / "templates" / "mail").glob("*.html")}
    assert templates == {"export_ready", "export_failed", "password_reset", "invitation",
                         "schedule_paused"}
    assert kinds == {"download-link", "export-failed", "password-reset", "invitation",
                     "schedule-paused"}
