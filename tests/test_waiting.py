"""Why a queued job waits: its lane paused by an admin, or its place in line (page, list, API)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from jobs import dispatch, lanes
from jobs.models import ExportJob, JobState, db
from webapp.auth import find_user
from webapp.exports import Waiting

HX = {"HX-Request": "true"}


@pytest.fixture(autouse=True)
def lane_running(app):
    yield
    with app.app_context():
        dispatch.resume("exports")


def queued_job(app, email: str = "alice@acme.test") -> tuple[int, int]:
    """A new queued job and how many queued jobs of its lane were made before it."""
    with app.app_context():
        user = find_user(email)
        job = ExportJob(user=user, org_id=user.org_id, dataset="transactions", params={},
                        lane="exports", state=JobState.QUEUED)
        db.session.add(job)
        db.session.commit()
        ahead = db.session.scalar(select(func.count()).select_from(ExportJob).where(
            ExportJob.state == JobState.QUEUED, ExportJob.lane == "exports",
            ExportJob.id < job.id))
        return job.id, ahead


def test_a_queued_job_says_its_place_in_line(app, alice):
    first, ahead = queued_job(app, "bob@globex.test")
    mine, mine_ahead = queued_job(app)
    assert mine_ahead == ahead + 1, "other people's jobs count too (one lane for all)"
    page = alice.get(f"/exports/{mine}").get_data(as_text=True)
    words = f"{mine_ahead:,} exports ahead of yours" if mine_ahead != 1 else "1 export ahead"
    assert f"Waiting for a worker · {words}" in page
    assert f'aria-valuetext="Waiting for a worker · {words}' in page
    assert words in alice.get("/exports", headers=HX).get_data(as_text=True)
    body = alice.get(f"/api/jobs/{mine}").json
    assert body["ahead"] == mine_ahead and body["lane_paused"] is False
    assert Waiting("exports", False, False, 0).text() == "Waiting for a worker · next in line"
    assert Waiting("exports", True, True, 4).text() == "Waiting for the cancelled attempt to stop"


def test_a_paused_lane_is_named_as_the_reason(app, alice):
    job_id, _ = queued_job(app)
    with app.app_context():
        dispatch.pause("exports")
    page = alice.get(f"/exports/{job_id}", headers=HX).get_data(as_text=True)
    assert "Waiting: the exports lane is paused by an admin" in page
    assert "Waiting: the exports lane is paused by an admin" in alice.get("/exports").text
    body = alice.get(f"/api/jobs/{job_id}").json
    assert body["lane_paused"] is True and body["state"] == "queued"
    with app.app_context():
        dispatch.resume("exports")
        lanes.exports.flush()
    assert "paused" not in alice.get(f"/exports/{job_id}").text
    assert alice.get(f"/api/jobs/{job_id}").json["lane_paused"] is False


def test_a_job_that_does_not_wait_says_nothing_of_it(app, alice):
    job_id, _ = queued_job(app)
    with app.app_context():
        db.session.execute(ExportJob.__table__.update().where(ExportJob.id == job_id)
                           .values(state=JobState.FAILED, error="boom"))
        db.session.commit()
    body = alice.get(f"/api/jobs/{job_id}").json
    assert body["ahead"] is None and body["lane_paused"] is None
    assert "Waiting" not in alice.get(f"/exports/{job_id}").text
