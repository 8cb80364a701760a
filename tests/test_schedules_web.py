"""Schedule pages and /api/schedules: create from an export ("Repeat this export…"), edit,
pause, resume, run now, delete; who may see and change what; errors are 4xx, never 500."""

from __future__ import annotations

import re

import pytest
from conftest import csrf_from, login
from sqlalchemy import select

from jobs import engine
from jobs.models import ExportJob, Schedule, db
from webapp.auth import create_token, find_user


@pytest.fixture
def app(fresh):
    return fresh.app


def export(client) -> int:
    token = csrf_from(client.get("/").get_data(as_text=True))
    response = client.post("/exports", data={"dataset": "transactions", "format": "csv",
                                             "status": "settled", "date_from": "2026-03-01",
                                             "date_to": "2026-03-07", "csrf_token": token})
    assert response.status_code == 303
    return int(response.headers["Location"].rsplit("/", 1)[1])


def form_of(html: str) -> dict:
    """The values a browser would send from the page's schedule form."""
    form = html[html.index('action="/schedules'):]
    values = dict(re.findall(r'<input type="(?:text|time|number|hidden|date)"[^>]*?'
                             r'name="([a-z_]+)"[^>]*?value="([^"]*)"', form))
    for name, options in re.findall(r'<select id="s-[a-z_]+" name="([a-z_]+)"[^>]*>(.*?)</select>',
                                    form, re.S):
        chosen = re.search(r'<option value="([^"]*)" selected', options)
        values[name] = chosen.group(1) if chosen else ""
    values["csrf_token"] = csrf_from(html)
    return values


def test_repeat_an_export_weekly_run_it_now_and_see_the_run(app):
    alice = login(app.test_client(), "alice@acme.test")
    job_id = export(alice)
    page = alice.get(f"/exports/{job_id}").get_data(as_text=True)
    assert f'href="/schedules/new?job={job_id}"' in page and "Repeat this export…" in page

    form = alice.get(f"/schedules/new?job={job_id}").get_data(as_text=True)
    values = form_of(form)
    assert values["dataset"] == "transactions" and values["status"] == "settled"
    assert values["repeat"] == "weekly" and values["date_range"] == "previous_week"
    assert values.get("date_from", "") == "", "the job's fixed dates give way to the range"
    values.update(timezone="Europe/Berlin", at="08:00", weekday="0", name="Monday settled")
    created = alice.post("/schedules", data=values)
    assert created.status_code == 303
    schedule_path = created.headers["Location"]
    shown = alice.get(schedule_path).get_data(as_text=True)
    assert "Every Monday at 08:00 (Europe/Berlin)" in shown
    assert re.search(r'id="next-run">Mon \d\d \w{3} \d{4} 08:00 CE[S]?T<', shown), shown

    ran = alice.post(f"{schedule_path}/run", data={"csrf_token": csrf_from(shown)})
    assert ran.status_code == 303
    run_id = int(ran.headers["Location"].rsplit("/", 1)[1])
    with app.app_context():
        job = db.session.get(ExportJob, run_id)
        assert job.schedule_id == int(schedule_path.rsplit("/", 1)[1])
        assert job.params["status"] == "settled" and "date_from" in job.params
        engine.run(run_id, max_attempts=1)
    shown = alice.get(schedule_path).get_data(as_text=True)
    assert f'href="/exports/{run_id}/download"' in shown and "Succeeded" in shown
    assert alice.get(f"/exports/{run_id}/download").status_code == 200
    assert "Monday settled" in alice.get("/schedules").get_data(as_text=True)


def new_schedule(client, **changes) -> tuple[str, str]:
    html = client.get("/schedules/new?dataset=orders").get_data(as_text=True)
    response = client.post("/schedules", data={**form_of(html), **changes})
    return response, html


def test_pause_resume_edit_delete_from_the_page(app):
    alice = login(app.test_client(), "alice@acme.test")
    response, _ = new_schedule(alice, repeat="daily", at="06:30")
    path = response.headers["Location"]
    page = alice.get(path).get_data(as_text=True)
    token = csrf_from(page)
    assert alice.post(f"{path}/pause", data={"csrf_token": token}).status_code == 303
    assert "Paused: paused by hand" in alice.get(path).get_data(as_text=True)
    assert alice.post(f"{path}/resume", data={"csrf_token": token}).status_code == 303
    page = alice.get(path).get_data(as_text=True)
    assert 'id="schedule-state">Active' in page
    edited = alice.post(path, data={**form_of(page), "repeat": "monthly", "day": "15"})
    assert edited.status_code == 303
    assert "Every month on day 15 at 06:30 (UTC)" in alice.get(path).get_data(as_text=True)
    assert alice.post(f"{path}/delete", data={"csrf_token": token}).status_code == 303
    assert alice.get(path).status_code == 404


@pytest.mark.parametrize(("changes", "says"), [
    ({"timezone": "Mars/Olympus"}, "Time zone must be a time zone"),
    ({"repeat": "cron", "cron": "at noon"}, "Cron expression must be a cron expression"),
    ({"repeat": "monthly", "day": "31"}, "Day of the month must be a day of the month"),
    ({"repeat": "weekly", "weekday": "funday"}, "On must be a day of the week"),
    ({"at": "8 o'clock"}, "At must be a time"),
    ({"name": ""}, "Name is required"),
    ({"status": "lost"}, "Status must be one of"),
    ({"repeat": "hourly"}, "Repeat must be one of"),
])
def test_a_bad_form_is_400_with_the_fields_message(app, changes, says):
    alice = login(app.test_client(), "alice@acme.test")
    response, _ = new_schedule(alice, **changes)
    assert response.status_code == 400
    assert says in response.get_data(as_text=True)


def test_csrf_unknown_datasets_and_other_peoples_schedules(app):
    alice = login(app.test_client(), "alice@acme.test")
    response, html = new_schedule(alice)
    path = response.headers["Location"]
    assert alice.post("/schedules", data={**form_of(html), "csrf_token": ""}).status_code == 400
    assert alice.post(f"{path}/pause").status_code == 400
    assert alice.get("/schedules/new?dataset=payroll").status_code == 404
    assert alice.post("/schedules", data={**form_of(html), "dataset": "payroll"}
                      ).status_code == 404

    bob = login(app.test_client(), "bob@globex.test")
    assert bob.get(path).status_code == 404
    bob_token = csrf_from(bob.get("/schedules").get_data(as_text=True))
    assert bob.post(f"{path}/run", data={"csrf_token": bob_token}).status_code == 404
    assert "orders every week" not in bob.get("/schedules").get_data(as_text=True).lower()
    assert bob.get("/admin/schedules").status_code == 403

    viewer = login(app.test_client(), "viewer@exportdesk.test")
    assert viewer.get(path).status_code == 200
    viewer_token = csrf_from(viewer.get("/schedules").get_data(as_text=True))
    assert viewer.post(f"{path}/pause", data={"csrf_token": viewer_token}).status_code == 403
    everyone = viewer.get("/admin/schedules").get_data(as_text=True)
    assert "alice@acme.test" in everyone and "Orders every week" in everyone

    admin = login(app.test_client(), "admin@exportdesk.test")
    admin_token = csrf_from(admin.get("/schedules").get_data(as_text=True))
    assert admin.post(f"{path}/pause", data={"csrf_token": admin_token}).status_code == 303


def bearer(app, email: str) -> dict:
    with app.app_context():
        return {"Authorization": f"Bearer {create_token(find_user(email))}"}


def test_the_api_creates_reads_changes_pauses_runs_and_deletes(app):
    client, alice = app.test_client(), bearer(app, "alice@acme.test")
    created = client.post("/api/schedules", headers=alice, json={
        "name": "Support Mondays", "dataset": "transactions", "format": "xlsx",
        "repeat": "weekly", "weekday": 0, "at": "08:00", "timezone": "America/New_York",
        "date_range": "last_n_days", "range_days": 7, "params": {"status": "refunded"}})
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert created.headers["Location"] == f"/api/schedules/{body['id']}"
    assert body["cron"] == "0 8 * * 1" and body["description"] == \
        "Every Monday at 08:00 (America/New_York)"
    assert body["next_run_local"].endswith(("T08:00:00-05:00", "T08:00:00-04:00"))
    assert body["params"] == {"status": "refunded"} and body["runs"] == []
    url = f"/api/schedules/{body['id']}"

    changed = client.patch(url, headers=alice, json={"at": "09:30", "paused": True})
    assert changed.status_code == 200
    assert changed.get_json()["cron"] == "30 9 * * 1" and changed.get_json()["paused"]
    assert changed.get_json()["next_run_at"] is None
    cron = client.patch(url, headers=alice, json={"cron": "0 7 1,15 * *", "paused": False})
    assert cron.get_json()["repeat"] == "cron" and not cron.get_json()["paused"]
    bad = client.patch(url, headers=alice, json={"timezone": "Nowhere/Else", "range_days": 0})
    assert bad.status_code == 400
    assert set(bad.get_json()["fields"]) == {"timezone", "range_days"}
    assert client.patch(url, headers=alice, json={"paused": "yes"}).status_code == 400
    moved = client.patch(url, headers=alice, json={"dataset": "orders"})
    assert moved.status_code == 400 and "dataset" in moved.get_json()["fields"]
    assert client.patch(url, headers=alice, data="nope").status_code == 400

    ran = client.post(f"{url}/run", headers=alice)
    assert ran.status_code == 202 and ran.get_json()["format"] == "xlsx"
    assert ran.get_json()["schedule_id"] == body["id"]
    listed = client.get("/api/schedules", headers=alice).get_json()["schedules"]
    assert [s["id"] for s in listed] == [body["id"]]
    assert listed[0]["runs"][0]["id"] == ran.get_json()["id"]

    bob = bearer(app, "bob@globex.test")
    assert client.get(url, headers=bob).status_code == 404
    assert client.patch(url, headers=bob, json={"paused": True}).status_code == 404
    assert client.delete(url, headers=bob).status_code == 404
    assert client.get("/api/schedules", headers=bob).get_json()["schedules"] == []

    assert client.delete(url, headers=alice).status_code == 204
    assert client.get(url, headers=alice).status_code == 404
    with app.app_context():
        assert db.session.scalar(select(ExportJob.schedule_id).where(
            ExportJob.id == ran.get_json()["id"])) is None


@pytest.mark.parametrize("body", [
    None, [], {"dataset": "payroll", "name": "x"}, {"dataset": "orders"},
    {"dataset": "orders", "name": "x", "params": "status=open"},
    {"dataset": "orders", "name": "x", "repeat": "cron", "cron": 5},
    {"dataset": "orders", "name": "x", "weekday": {"a": 1}, "repeat": "weekly", "at": "8:00"},
    {"dataset": "orders", "name": "x", "date_range": ["yesterday"]},
    {"dataset": "orders", "name": "x", "timezone": "../../etc/passwd"},
])
def test_a_bad_api_body_is_400_with_the_reason(app, body):
    client, alice = app.test_client(), bearer(app, "alice@acme.test")
    response = client.post("/api/schedules", headers=alice, json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]
    with app.app_context():
        assert db.session.scalars(select(Schedule)).all() == []


def test_a_session_api_call_needs_its_csrf_token(app):
    alice = login(app.test_client(), "alice@acme.test")
    response = alice.post("/api/schedules", json={"name": "x", "dataset": "orders"})
    assert response.status_code == 400
    token = csrf_from(alice.get("/schedules").get_data(as_text=True))
    response = alice.post("/api/schedules", headers={"X-CSRFToken": token}, json={
        "name": "x", "dataset": "orders", "repeat": "daily", "at": "07:00"})
    assert response.status_code == 201
