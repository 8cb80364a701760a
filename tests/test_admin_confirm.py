"""Destructive admin actions ask first (an htmx dialog, or a confirmation page without
JavaScript) and look dangerous; empty selections and reversed dates are told, not guessed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import csrf_from, login
from test_admin import empty_lanes, make_email, make_job, post, state  # noqa: F401 (autouse)

from jobs import dispatch
from jobs.models import EmailState, JobState, OutboundEmail, db, utcnow

CSS = (Path(__file__).resolve().parent.parent / "static" / "exportdesk.css").read_text()


def tag(html: str, element_id: str) -> str:
    return re.search(rf'<[a-z]+ [^>]*id="{element_id}"[^>]*>', html, re.S).group(0)


def htmx_post(client, path: str, **data):
    token = csrf_from(client.get("/").text)
    return client.post(path, data=data, headers={"HX-Request": "true", "X-CSRFToken": token})


@pytest.mark.parametrize("kind", ["jobs", "emails"])
def test_cancel_on_a_job_or_email_page_asks_first(app, admin, kind):
    row_id = make_job(app) if kind == "jobs" else make_email(app, "alice@acme.test", utcnow())
    page = admin.get(f"/admin/{kind}/{row_id}").text
    cancel = tag(page, "admin-cancel")
    assert 'class="button danger"' in cancel and "hx-confirm=" in cancel
    assert f'href="/admin/{kind}/{row_id}/cancel"' in cancel  # without JavaScript: a page
    assert f'hx-post="/admin/{kind}/{row_id}/cancel"' in cancel  # with it: the dialog, then this
    confirm = admin.get(f"/admin/{kind}/{row_id}/cancel")
    assert confirm.status_code == 200
    assert re.search(rf'<form method="post" action="/admin/{kind}/{row_id}/cancel"', confirm.text)
    assert 'class="danger" id="confirm-yes"' in confirm.text
    viewer = login(app.test_client(), "viewer@exportdesk.test")
    assert viewer.get(f"/admin/{kind}/{row_id}/cancel").status_code == 403
    answer = htmx_post(admin, f"/admin/{kind}/{row_id}/cancel")  # the dialog was accepted
    assert answer.status_code == 200 and answer.headers["HX-Redirect"] == f"/admin/{kind}/{row_id}"
    with app.app_context():
        if kind == "jobs":
            assert state(app, row_id) == JobState.CANCELLED
        else:
            assert db.session.get(OutboundEmail, row_id).state == EmailState.CANCELLED
    again = htmx_post(admin, f"/admin/{kind}/{row_id}/cancel")  # refused: told on the page
    assert again.headers["HX-Redirect"] == f"/admin/{kind}/{row_id}"
    assert "only queued" in admin.get(f"/admin/{kind}/{row_id}").text


def test_pausing_a_lane_asks_first_and_resuming_does_not(app, admin):
    page = admin.get("/admin/lanes").text
    pause = tag(page, "pause-exports")
    assert 'class="button secondary danger"' in pause and "hx-confirm=" in pause
    assert 'href="/admin/lanes/exports/pause"' in pause
    confirm = admin.get("/admin/lanes/exports/pause").text
    assert 'action="/admin/lanes/exports/pause"' in confirm and 'id="confirm-yes"' in confirm
    with app.app_context():
        assert not dispatch.paused("exports"), "asking pauses nothing"
    assert admin.get("/admin/lanes/nope/pause").status_code == 404
    answer = htmx_post(admin, "/admin/lanes/exports/pause")
    assert answer.headers["HX-Redirect"] == "/admin/lanes"
    with app.app_context():
        assert dispatch.paused("exports")
    assert 'class="secondary" id="resume-exports"' in admin.get("/admin/lanes").text


def test_cancel_selected_asks_first_with_or_without_javascript(app, admin):
    job_id = make_job(app)
    listing = admin.get("/admin/jobs").text
    button = tag(listing, "cancel-selected")
    assert 'class="secondary danger"' in button and "hx-confirm=" in button
    assert '"confirmed": "1"' in button.replace("&#34;", '"')
    assert 'class="secondary" id="retry-selected"' in listing
    asked = post(admin, "/admin/jobs/bulk", action="cancel", ids=str(job_id))
    assert asked.status_code == 200 and f"Export #{job_id}" in asked.text
    assert re.search(rf'name="ids" value="{job_id}"', asked.text)
    assert 'name="confirmed" value="1"' in asked.text
    assert state(app, job_id) == JobState.QUEUED
    answer = htmx_post(admin, "/admin/jobs/bulk", action="cancel", confirmed="1",
                       ids=str(job_id))
    assert answer.headers["HX-Redirect"] == "/admin/jobs"
    assert state(app, job_id) == JobState.CANCELLED


def test_secondary_and_danger_buttons_are_not_primary_blue():
    assert re.search(r"button\.secondary, \.button\.secondary \{[^}]*background: #fff", CSS)
    assert re.search(r"button\.secondary\.danger, \.button\.secondary\.danger \{[^}]*"
                     r"color: var\(--bad\)", CSS)


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_a_bulk_action_with_nothing_selected_says_so(app, admin, action):
    response = post(admin, "/admin/jobs/bulk", action=action)
    assert response.status_code == 400
    assert "Select at least one export" in response.text
    assert "0 export(s)" not in response.text
    answer = htmx_post(admin, "/admin/jobs/bulk", action=action, confirmed="1", state="failed")
    assert answer.headers["HX-Redirect"] == "/admin/jobs?state=failed"  # htmx shows no 400
    assert "Select at least one export" in admin.get("/admin/jobs?state=failed").text


def test_a_reversed_date_range_is_a_form_error(app, admin):
    response = admin.get("/admin/jobs?date_from=2026-12-02&date_to=2026-11-01")
    assert response.status_code == 400
    page = response.text
    assert "The end date is before the start date" in page
    assert tag(page, "f-to").count('aria-invalid="true"') == 1
    assert "No job matches." not in page


def test_lanes_page_cards_waits_and_charts(app, admin):
    page = admin.get("/admin/lanes").text
    assert '<div class="lane-cards">' in page and ".lane-cards { display: grid; gap: 1rem" in CSS
    with app.app_context():
        waiting = {h["lane"]: h["depth"] for h in dispatch.lane_health()}
    for lane, depth in waiting.items():
        oldest = re.search(rf'id="oldest-{lane}">(.*?)</dd>', page, re.S).group(1)
        if not depth:
            assert "nothing waiting" in oldest and "0.0 s" not in oldest
    for lane in ("critical", "exports"):
        svg = re.search(rf'<svg[^>]*aria-labelledby="chart-{lane}-title".*?</svg>', page,
                        re.S).group(0)
        assert "Time (UTC), per minute" in svg and "Tasks per minute" in svg
        assert re.search(r'class="tick x-tick"[^>]*>\d\d:\d\d<', svg)
