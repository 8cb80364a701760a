"""Cancel and retry by owner or admin: pages with and without htmx, the JSON API, the engine."""

from __future__ import annotations

import csv
import io
import os
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import csrf_from
from expected import expected_rows
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from jobs import dispatch, engine, lanes, pages
from jobs.models import ExportJob, JobAttempt, JobState, db, utcnow
from jobs.storage import storage
from webapp import exports as webapp_exports
from webapp.auth import create_token, find_user
from webapp.exports import timing
from webapp.times import seconds_text

HX = {"HX-Request": "true"}


@pytest.fixture(autouse=True)
def empty_lane(app):
    """Retries put messages on the (SQLite) exports lane; leave it as we found it."""
    yield
    with app.app_context():
        lanes.exports.flush()


def make_job(app, email: str = "alice@acme.test", **values) -> int:
    with app.app_context():
        user = find_user(email)
        job = ExportJob(user=user, org_id=user.org_id, dataset="transactions", params={},
                        **values)
        db.session.add(job)
        db.session.commit()
        return job.id


def stopping_job(app, instance, state: str, lease_left: timedelta) -> tuple[int, Path]:
    """A job cancelled (and maybe retried since) while another host's worker ran it: its
    attempt still open, its lease `lease_left` from now, a part of its on disk."""
    job_id = make_job(app, state=state, claimed_by="other-host:1#1",
                      lease_expires_at=utcnow() + lease_left)
    with app.app_context():
        db.session.add(JobAttempt(job_id=job_id, number=1, worker="other-host:1"))
        db.session.commit()
    stale = instance / "exports" / f"job-{job_id}.a1.csv.part"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half a row")
    return job_id, stale


def load(app, job_id: int) -> ExportJob:
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        db.session.expunge(job)
        return job


def post(client, path: str, headers: dict | None = None, **data):
    token = csrf_from(client.get("/").get_data(as_text=True))
    return client.post(path, data={"csrf_token": token, **data}, headers=headers or {})


def test_cancel_queued_job_without_js_redirects_to_its_page(app, alice):
    job_id = make_job(app)
    page = alice.get(f"/exports/{job_id}/cancel").get_data(as_text=True)
    assert "Yes, cancel it" in page and f'action="/exports/{job_id}/cancel"' in page
    response = post(alice, f"/exports/{job_id}/cancel", view="job")
    assert response.status_code == 303 and response.headers["Location"] == f"/exports/{job_id}"
    job = load(app, job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    page = alice.get(f"/exports/{job_id}").get_data(as_text=True)
    assert "This export was cancelled" in page and f'id="retry-{job_id}"' in page
    assert "hx-trigger" not in page.split('id="job-status"')[0].split(f'id="job-{job_id}"')[1]


def test_cancelling_twice_is_a_clear_409_page_fragment_and_json(app, alice):
    job_id = make_job(app, state=JobState.SUCCEEDED)
    response = post(alice, f"/exports/{job_id}/cancel")
    assert response.status_code == 409
    assert "has already succeeded: only queued or running exports can be cancelled" in response.text
    response = post(alice, f"/exports/{job_id}/cancel", headers=HX, view="list")
    assert response.status_code == 409 and 'id="my-exports"' in response.text
    assert 'role="alert"' in response.text and "<html" not in response.text
    token = csrf_from(alice.get("/").get_data(as_text=True))
    response = alice.post(f"/api/jobs/{job_id}/cancel", headers={"X-CSRFToken": token})
    assert response.status_code == 409 and "only queued or running" in response.json["error"]
    assert load(app, job_id).state == "succeeded"


def test_htmx_cancel_answers_with_the_part_that_asked(app, alice):
    job_id = make_job(app, state=JobState.RUNNING, rows_done=10, rows_total=100)
    response = post(alice, f"/exports/{job_id}/cancel", headers=HX, view="job")
    assert response.status_code == 200 and "HX-Request" in response.headers["Vary"]
    assert f'id="job-{job_id}"' in response.text and "cancelled" in response.text
    assert 'id="job-status" hx-swap-oob="innerHTML">Export cancelled' in response.text
    assert load(app, job_id).state == "cancelled"


def test_cancel_and_retry_need_csrf_and_ownership(app, alice, bob, admin):
    job_id = make_job(app)
    assert alice.post(f"/exports/{job_id}/cancel").status_code == 400
    assert alice.post(f"/api/jobs/{job_id}/cancel").status_code == 400
    assert post(bob, f"/exports/{job_id}/cancel").status_code == 404
    assert post(bob, f"/exports/{job_id}/retry").status_code == 404
    assert bob.get(f"/exports/{job_id}/cancel").status_code == 404
    assert load(app, job_id).state == "queued"
    assert post(admin, f"/exports/{job_id}/cancel").status_code == 303
    assert load(app, job_id).state == "cancelled"
    assert post(alice, "/exports/999999/retry").status_code == 404


def test_retry_puts_a_cancelled_job_back_on_its_lane(app, alice):
    job_id = make_job(app, state=JobState.CANCELLED, error="x", rows_done=500,
                      checkpoint={"last_key": 9, "rows": 500, "bytes": 4000},
                      finished_at=utcnow())
    with app.app_context():
        lanes.exports.flush()
    response = post(alice, f"/exports/{job_id}/retry", view="list")
    assert response.status_code == 303 and response.headers["Location"] == "/exports"
    job = load(app, job_id)
    assert job.state == "queued" and job.finished_at is None and job.error is None
    assert job.checkpoint is None and job.rows_done == 0, "no part file: start over"
    with app.app_context():
        assert lanes.exports.pending_count() == 1
        assert lanes.exports.dequeue().args == (job_id,)
    response = post(alice, f"/exports/{job_id}/retry", headers=HX)
    assert response.status_code == 409 and "only failed or cancelled" in response.text
    assert 'hx-trigger="every 1s"' in response.text, "the job is queued again: keep polling"


def test_retry_while_the_cancelled_worker_still_stops_is_accepted_and_waits_for_it(
        app, alice, instance):
    """Accepted at once; the new attempt is claimed only after the old one has ended: here its
    worker never answers, so once its lease lapses the claim ends it and removes its part."""
    job_id, stale = stopping_job(app, instance, JobState.CANCELLED, timedelta(minutes=5))
    response = post(alice, f"/exports/{job_id}/retry")
    assert response.status_code == 303
    job = load(app, job_id)
    assert (job.state, job.claimed_by) == ("queued", "other-host:1#1"), "the claim stays"
    with app.app_context(), pytest.raises(engine.Deferred):
        engine.run(job_id, max_attempts=1)  # the old attempt still runs: not yet
    assert stale.exists() and len(load_attempts(app, job_id)) == 1
    with app.app_context():
        db.session.execute(update(ExportJob).where(ExportJob.id == job_id)
                           .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        engine.run(job_id, max_attempts=1)
    assert not stale.exists()
    assert [a.outcome for a in load_attempts(app, job_id)] == ["cancelled", "succeeded"]
    assert load(app, job_id).state == "succeeded"


def load_attempts(app, job_id: int) -> list[JobAttempt]:
    with app.app_context():
        attempts = db.session.get(ExportJob, job_id).attempts
        for attempt in attempts:
            db.session.expunge(attempt)
        return attempts


def test_api_cancel_and_retry_with_a_token(app, client):
    job_id = make_job(app, "bob@globex.test")
    with app.app_context():
        auth = {"Authorization": f"Bearer {create_token(find_user('bob@globex.test'))}"}
    response = client.post(f"/api/jobs/{job_id}/cancel", headers=auth)
    assert response.status_code == 202 and response.json["state"] == "cancelled"
    response = client.post(f"/api/jobs/{job_id}/retry", headers=auth)
    assert response.status_code == 202 and response.json["state"] == "queued"
    response = client.post(f"/api/jobs/{job_id}/retry", headers=auth)
    assert response.status_code == 409 and response.json["state"] == "queued"
    other = make_job(app, "alice@acme.test")
    assert client.post(f"/api/jobs/{other}/cancel", headers=auth).status_code == 404


def test_engine_skips_the_message_of_a_cancelled_or_already_claimed_job(app):
    cancelled = make_job(app, state=JobState.CANCELLED)
    running = make_job(app, state=JobState.RUNNING)
    with app.app_context():  # claimed by another worker whose lease is live
        db.session.execute(update(ExportJob).where(ExportJob.id == running).values(
            claimed_by="other-host:1#1", lease_expires_at=utcnow() + timedelta(minutes=5)))
        db.session.commit()
        engine.run(cancelled, max_attempts=1)
        engine.run(running, max_attempts=1)
    for job_id, state in ((cancelled, "cancelled"), (running, "running")):
        job = load(app, job_id)
        assert job.state == state and job.rows_done == 0
        with app.app_context():
            assert db.session.get(ExportJob, job_id).attempts == []


def test_failed_attempt_resumes_from_its_checkpoint_a_failed_job_keeps_no_part(
        app, instance, monkeypatch):
    real_batches = pages.pages
    batches: list[int] = []

    def flaky(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            batches.append(batch.rows)
            if len(batches) in (3, 1003):  # the first export's third batch, once
                raise RuntimeError("database went away")
            yield batch

    monkeypatch.setattr(pages, "pages", flaky)
    job_id = make_job(app)
    with app.app_context(), pytest.raises(engine.AttemptFailed):
        engine.run(job_id, max_attempts=2)
    failed = load(app, job_id)
    assert failed.state == "retrying" and "database went away" in failed.error
    assert failed.rows_done == 2 * app.config["EXPORT_BATCH_ROWS"]
    with app.app_context():
        assert storage().parts(job_id), "a part kept for the retry"
        engine.run(job_id, max_attempts=2)
    done = load(app, job_id)
    # An uninterrupted run reads ceil(rows / batch) batches; here only the batch that failed
    # is read on top: the two before it were not read again.
    uninterrupted = -(-done.rows_total // app.config["EXPORT_BATCH_ROWS"])
    assert done.state == "succeeded" and len(batches) == uninterrupted + 1
    data = (instance / "exports" / done.file_name).read_bytes().decode("utf-8")
    rows = list(csv.reader(io.StringIO(data, newline="")))
    assert rows == expected_rows(os.environ["DATABASE_URL"], "transactions", "acme")

    # A job that failed for good leaves no part behind; a retry by hand starts over.
    batches[:] = [0] * 1000
    job_id = make_job(app)
    with app.app_context(), pytest.raises(engine.AttemptFailed):
        engine.run(job_id, max_attempts=1)
    failed = load(app, job_id)
    assert failed.state == "failed" and failed.checkpoint is None
    with app.app_context():
        assert storage().parts(job_id) == []
        job = db.session.get(ExportJob, job_id)
        dispatch.retry(job)
        db.session.commit()
        assert job.state == "queued" and job.rows_done == 0, "nothing to resume from"
        engine.run(job_id, max_attempts=5)
    again = load(app, job_id)
    assert again.state == "succeeded"
    assert (instance / "exports" / again.file_name).read_bytes().decode("utf-8") == data


def test_progress_shows_rows_elapsed_and_eta(app, alice):
    started = utcnow() - timedelta(seconds=30)
    job_id = make_job(app, state=JobState.RUNNING, rows_done=250, rows_total=1000,
                      started_at=started)
    page = alice.get(f"/exports/{job_id}").get_data(as_text=True)
    assert 'aria-valuenow="25.0"' in page and "250 of ~1,000" in page
    assert 'aria-valuetext="25.0%, 250 of 1,000 rows, about 1 min 30 s left"' in page
    assert '<div id="job-status" role="status" aria-live="polite"' in page
    fragment = alice.get(f"/exports/{job_id}", headers=HX).get_data(as_text=True)
    assert "<html" not in fragment and 'hx-swap-oob="innerHTML"></div>' in fragment
    assert f"<title>25% · Export #{job_id} · exportdesk</title>" in fragment
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        t = timing(job, now=started + timedelta(seconds=30))
    assert t.elapsed == 30 and t.eta == 90


@pytest.mark.parametrize("seconds, text", [(None, "–"), (0, "under 1 s"), (0.4, "under 1 s"),
                                           (0.99, "under 1 s"), (1, "1 s"), (59, "59 s"),
                                           (65, "1 min 05 s"), (3720, "1 h 02 min")])
def test_duration_reads_like_a_person_would_say_it(seconds, text):
    assert seconds_text(seconds) == text


def test_my_exports_polls_only_while_something_is_active(app, bob):
    with app.app_context():
        user = find_user("bob@globex.test")
        db.session.execute(update(ExportJob)  # earlier tests may have left jobs running
                           .where(ExportJob.user_id == user.id,
                                  ExportJob.state.in_(JobState.ACTIVE))
                           .values(state=JobState.CANCELLED))
        db.session.commit()
    job_id = make_job(app, "bob@globex.test", state=JobState.FAILED, error="boom")
    page = bob.get("/exports").get_data(as_text=True)
    assert f'id="retry-{job_id}"' in page and "hx-trigger" not in page
    running = make_job(app, "bob@globex.test", state=JobState.RUNNING, rows_total=10)
    fragment = bob.get("/exports", headers=HX).get_data(as_text=True)
    assert fragment.lstrip().startswith('<div id="my-exports"')
    assert 'hx-trigger="every 2s"' in fragment and f'id="cancel-{running}"' in fragment
    assert f'hx-confirm="Cancel export #{running}?' in fragment
    assert f'href="/exports/{running}/cancel?view=list"' in fragment


def test_inline_check_fills_error_slots_out_of_band(alice):
    response = post(alice, "/exports/check", headers=HX, dataset="orders",
                    date_from="2026-05-01", date_to="2026-04-01", status="", format="csv")
    assert response.status_code == 200
    assert ('<p id="orders-date_to-error" hx-swap-oob="innerHTML">To must not be before'
            in response.text)
    assert '<p id="orders-date_from-error" hx-swap-oob="innerHTML"></p>' in response.text
    assert post(alice, "/exports/check", dataset="nope").status_code == 404


def test_htmx_poll_after_logout_redirects_the_whole_page(client):
    response = client.get("/exports/1", headers={**HX, "HX-Current-URL": "http://x/exports/1"})
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/login?next=/exports/1"


def test_inline_check_says_about_how_many_rows_and_warns_when_none(app, alice, monkeypatch):
    response = post(alice, "/exports/check", headers=HX, dataset="transactions",
                    status="settled", format="csv")
    with app.app_context():
        expected = len(expected_rows(os.environ["DATABASE_URL"], "transactions", "acme",
                                     "and status = ?", ("settled",))) - 1
    assert (f'<p id="transactions-estimate" hx-swap-oob="innerHTML">About {expected:,} rows.'
            in response.text)
    response = post(alice, "/exports/check", headers=HX, dataset="transactions",
                    date_from="2099-01-01", format="csv")
    assert "No rows match these parameters: the file would be empty." in response.text
    response = post(alice, "/exports/check", headers=HX, dataset="transactions",
                    date_from="nonsense", format="csv")
    assert 'id="transactions-estimate" hx-swap-oob="innerHTML"></p>' in response.text
    assert 'id="transactions-estimate" aria-live="polite"' in alice.get("/").text

    def too_slow(*_args, **_kwargs):
        raise OperationalError("select count(*)", {}, Exception("interrupted"))

    monkeypatch.setattr(webapp_exports.source, "connect_briefly", too_slow)
    response = post(alice, "/exports/check", headers=HX, dataset="transactions", format="csv")
    assert "About how many rows: unknown (counting took too long)." in response.text


def test_a_sub_second_export_took_under_1_s_not_0_s(app, alice):
    started = utcnow() - timedelta(minutes=1)
    job_id = make_job(app, state=JobState.SUCCEEDED, rows_done=3, bytes=10, file_name=None,
                      started_at=started, finished_at=started + timedelta(seconds=0.3))
    page = alice.get(f"/exports/{job_id}").get_data(as_text=True)
    assert "took under 1 s" in page and "took 0 s" not in page
    running = make_job(app, state=JobState.RUNNING, rows_done=999, rows_total=1000,
                       started_at=utcnow() - timedelta(seconds=10))
    page = alice.get(f"/exports/{running}").get_data(as_text=True)
    assert "999 of 1,000 rows, under 1 s left" in page and "about under" not in page


def test_reconciler_ends_the_attempt_a_retried_job_waits_for_once_its_lease_lapsed(
        app, instance):
    job_id, stale = stopping_job(app, instance, JobState.QUEUED, timedelta(seconds=-1))
    with app.app_context():
        dispatch.reconcile(grace=3600)
    [attempt] = load_attempts(app, job_id)
    assert attempt.outcome == "cancelled" and attempt.finished_at is not None
    assert not stale.exists() and load(app, job_id).state == "queued"
