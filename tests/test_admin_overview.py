"""The admin overview (/admin): counts per state against the database, each a link to a
list of exactly that many rows; the lanes at a glance; the last hour as a labelled chart."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta

import pytest
from conftest import login

from jobs.models import EmailState, ExportJob, JobState, OutboundEmail, db, utcnow
from webapp.auth import find_user


@pytest.fixture
def app(fresh):
    return fresh.app  # counts must see only this test's rows


def add_jobs(app, *specs: tuple) -> None:
    """Export jobs (state, created_at[, ended_at]) and emails ("email:state", created_at[,
    ended_at]); a job or email ends when it is made unless told otherwise."""
    with app.app_context():
        user = find_user("alice@acme.test")
        for state, created_at, *ended in specs:
            ended_at = ended[0] if ended else created_at
            if state.startswith("email:"):
                db.session.add(OutboundEmail(
                    key=secrets.token_hex(8), kind="export_ready", to_address=user.email,
                    subject="Your export is ready", text_body="Hello", html_body="",
                    message_id="<x@test>", state=state[6:], created_at=created_at,
                    claimed_at=ended_at,
                    sent_at=ended_at if state[6:] == EmailState.SENT else None))
            else:
                db.session.add(ExportJob(user=user, org_id=user.org_id, dataset="transactions",
                                         params={}, state=state, created_at=created_at,
                                         finished_at=ended_at))
        db.session.commit()


def listed(html: str) -> list[str]:
    return re.findall(r'<tr id="((?:job|email)-row-\d+)"', html)


def test_counts_per_state_each_a_link_to_exactly_those_rows(app):
    """Failed in the last 24 h and succeeded today count by when a job ended, not when it was
    asked for: a long export asked for yesterday and finished today succeeded today."""
    now = utcnow()
    midnight = datetime.combine(now.date(), datetime.min.time())
    today = max(now - timedelta(minutes=1), midnight)  # today, UTC, even just after midnight
    hour_ago = now - timedelta(hours=1)
    add_jobs(app, *[(JobState.QUEUED, today)] * 2, (JobState.RUNNING, today),
             (JobState.RETRYING, today), *[(JobState.FAILED, hour_ago)] * 3,
             (JobState.FAILED, now - timedelta(hours=25)),  # too old to count
             (JobState.FAILED, now - timedelta(hours=30), hour_ago),  # asked long ago
             *[(JobState.SUCCEEDED, today)] * 2,
             (JobState.SUCCEEDED, midnight - timedelta(hours=2), today),  # ended today
             (JobState.SUCCEEDED, midnight - timedelta(hours=1)),  # yesterday: not today
             (JobState.CANCELLED, today),
             ("email:" + EmailState.QUEUED, today), ("email:" + EmailState.SENDING, today),
             *[("email:" + EmailState.FAILED, hour_ago)] * 2,
             ("email:" + EmailState.FAILED, now - timedelta(hours=25)),
             ("email:" + EmailState.FAILED, now - timedelta(hours=26), hour_ago),  # retried
             ("email:" + EmailState.SENT, today),
             ("email:" + EmailState.SENT, midnight - timedelta(hours=3), today),
             ("email:" + EmailState.SENT, midnight - timedelta(minutes=1)))
    admin = login(app.test_client(), "admin@exportdesk.test")
    page = admin.get("/admin/").text
    expected = {"exports": {"queued": 2, "running": 1, "retrying": 1, "failed": 4,
                            "succeeded": 3},
                "emails": {"queued": 1, "running": 1, "retrying": 0, "failed": 3,
                           "succeeded": 2}}
    for kind, buckets in expected.items():
        for bucket, number in buckets.items():
            link = re.search(rf'id="count-{kind}-{bucket}"[^>]*href="([^"]+)"[^>]*>([\d,]+)<',
                             page, re.S)
            assert link, (kind, bucket)
            assert int(link.group(2)) == number, (kind, bucket)
            listing = admin.get(link.group(1).replace("&amp;", "&")).text
            rows = listed(listing)
            assert len(rows) == number, (kind, bucket, link.group(1))
            # The window is said on the list, with a way out of it.
            assert (bucket in ("failed", "succeeded")) == ('id="ended-since"' in listing)
            assert all(r.startswith("job-" if kind == "exports" else "email-") for r in rows)


def test_lanes_at_a_glance_and_a_chart_with_labelled_axes(app):
    viewer = login(app.test_client(), "viewer@exportdesk.test")
    response = viewer.get("/admin/")
    assert response.status_code == 200
    page = response.text
    assert 'id="glance-critical"' in page and 'id="glance-exports"' in page
    assert "within SLA" in page  # nothing waits on the critical lane
    svg = re.search(r"<svg.*?</svg>", page, re.S).group(0)
    assert re.search(r"<title[^>]*>Every lane: \d+ completed and \d+ failed", svg)
    assert "Time (UTC)" in svg and "Tasks per minute" in svg
    assert len(re.findall(r'class="tick x-tick"[^>]*>\d\d:\d\d<', svg)) >= 4
    assert "style=" not in page.split("<main>")[1]  # the coming CSP forbids inline styles
    assert "<form" not in page.split("<main>")[1]  # read-only: nothing to press
    assert 'aria-current="page">Overview<' in page


def test_users_get_403(app):
    alice = login(app.test_client(), "alice@acme.test")
    assert alice.get("/admin/").status_code == 403


def test_the_minute_chart_scales_bars_and_labels_its_ticks():
    from webapp.charts import HEIGHT, minute_chart

    start = 29_000_000  # Unix minutes: 2025-02-19 21:20 UTC
    chart = minute_chart([[start + i, i % 3, 1 if i == 59 else 0] for i in range(60)])
    assert chart.peak == 2 and (chart.total_done, chart.total_failed) == (60, 1)
    assert len(chart.done) == 40 and len(chart.failed) == 1
    assert [v for v, _ in chart.y_ticks] == [0, 1, 2]
    assert max(b.height for b in chart.done) == 148 and HEIGHT == 200  # the peak: full height
    assert [t for t, _ in chart.x_ticks] == ["21:20", "21:35", "21:50", "22:05", "22:19"]
    assert chart.failed[0].label == "22:19 UTC: 1 failed"
    empty = minute_chart([[start + i, 0, 0] for i in range(60)])
    assert empty.peak == 0 and empty.done == [] and [v for v, _ in empty.y_ticks] == [0, 1]
