"""Retry right after cancel, with a real consumer: the retry is accepted at once (not "still
stopping"), and the new attempt starts only after the cancelled one has stopped, so one file
from one attempt, equal to SQL."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import signal
import time

import pytest
from conftest import consumer, csrf_from, wait_for
from expected import expected_rows
from instances import pause_outside_a_write

from jobs import dispatch, lanes
from jobs.models import ExportJob, db

pytestmark = pytest.mark.integration
HX = {"HX-Request": "true"}
# Jobs other tests left "running" under a live lease must not hold the owner's fair share.
SLOW = dict(EXPORT_BATCH_ROWS="5", CHECKPOINT_INTERVAL="0", LANE_EXPORTS_WORKERS="2",
            EXPORTS_RUNNING_PER_USER="1000")


def current(app, job_id: int) -> ExportJob:
    with app.app_context():
        db.session.expire_all()
        job = db.session.get(ExportJob, job_id)
        for attempt in job.attempts:
            db.session.expunge(attempt)
        db.session.expunge(job)
        return job


@pytest.mark.parametrize("via", ["api", "page"])
def test_retry_at_once_after_cancel_starts_after_the_old_attempt_stopped(
        via, app, alice, instance, database_url, tmp_path):
    token = csrf_from(alice.get("/").get_data(as_text=True))
    headers = {"X-CSRFToken": token}
    created = alice.post("/api/exports", json={"dataset": "transactions", "format": "csv",
                                               "params": {"status": "settled"}}, headers=headers)
    assert created.status_code == 202, created.json
    job_id = created.json["id"]
    try:
        with consumer("exports", "", instance, tmp_path / "log", **SLOW):
            job = wait_for(lambda: (j := current(app, job_id)).state == "running"
                           and j.rows_done > 0 and j, what="the export to be under way")
            pid = int(job.claimed_by.partition("#")[0].rpartition(":")[2])
            pause_outside_a_write(pid, database_url, job_id)  # it cannot reach its next checkpoint
            try:
                if via == "api":
                    cancelled = alice.post(f"/api/jobs/{job_id}/cancel", headers=headers)
                    assert cancelled.status_code == 202 and cancelled.json["state"] == "cancelled"
                    retried = alice.post(f"/api/jobs/{job_id}/retry", headers=headers)
                    assert retried.status_code == 202, retried.json
                    assert retried.json["state"] == "queued"
                else:
                    form = {"csrf_token": token, "view": "job"}
                    cancelled = alice.post(f"/exports/{job_id}/cancel", data=form, headers=HX)
                    assert cancelled.status_code == 200
                    assert "This export was cancelled" in cancelled.text
                    assert f'id="retry-{job_id}"' in cancelled.text
                    retried = alice.post(f"/exports/{job_id}/retry", data=form, headers=HX)
                    assert retried.status_code == 200, retried.text
                    assert "badge state-queued" in retried.text
                    assert "Waiting for the cancelled attempt to stop" in retried.text
                time.sleep(2.5)  # the other worker is offered the job meanwhile: it must wait
                waiting = current(app, job_id)
                assert waiting.state == "queued" and len(waiting.attempts) == 1
            finally:
                os.kill(pid, signal.SIGCONT)
            done = wait_for(lambda: (j := current(app, job_id)).state == "succeeded" and j,
                            timeout=120, what="the retried export to finish")
    finally:
        with app.app_context():
            lanes.exports.flush()
            lanes.critical.flush()
    first, second = done.attempts
    assert first.outcome == "cancelled" and second.outcome == "succeeded"
    assert first.finished_at <= second.started_at, "the new attempt started after the old ended"
    data = (instance / "exports" / done.file_name).read_bytes().decode("utf-8")
    rows = list(csv.reader(io.StringIO(data, newline="")))
    assert rows == expected_rows(os.environ["DATABASE_URL"], "transactions", "acme",
                                 "and status = ?", ("settled",))
    assert not list((instance / "exports").glob(f"job-{job_id}.*.part"))


def test_a_worker_killed_as_it_ends_a_silent_cancelled_attempt_leaves_nothing_half_done(
        app, alice, instance, database_url, tmp_path):
    """The instant nobody chose: a retried job's new claim ends the cancelled attempt whose
    worker went silent (paused past its lease) and dies before it commits. Nothing of that
    claim stays; the next worker ends the old attempt and finishes; the silent worker, woken
    at last, touches nothing: one file, equal to SQL, attempts cancelled then succeeded."""
    token = csrf_from(alice.get("/").get_data(as_text=True))
    headers = {"X-CSRFToken": token}
    created = alice.post("/api/exports", json={"dataset": "transactions", "format": "csv",
                                               "params": {"status": "settled"}}, headers=headers)
    job_id = created.json["id"]
    one = {**SLOW, "LANE_EXPORTS_WORKERS": "1", "JOB_LEASE": "2"}
    try:
        with consumer("exports", "", instance, tmp_path / "silent.log", **one):
            job = wait_for(lambda: (j := current(app, job_id)).state == "running"
                           and j.rows_done > 0 and j, what="the export to be under way")
            silent = int(job.claimed_by.partition("#")[0].rpartition(":")[2])
            pause_outside_a_write(silent, database_url, job_id)
            try:
                assert alice.post(f"/api/jobs/{job_id}/cancel", headers=headers).status_code == 202
                assert alice.post(f"/api/jobs/{job_id}/retry", headers=headers).status_code == 202
                with consumer("exports", "", instance, tmp_path / "killed.log",
                              FAULT_INJECT="ended_stopped", **one) as killed:
                    wait_for(lambda: killed.poll() is not None, timeout=60,
                             what="the claiming worker to die as it ends the old attempt")
                half = current(app, job_id)
                assert half.state == "queued" and len(half.attempts) == 1
                assert half.attempts[0].finished_at is None, "its claim was never committed"
                with app.app_context():  # its message died with it: sent again, as the
                    dispatch.send(job_id)  # reconciler does (tests/test_guarantees.py)
                with consumer("exports", "", instance, tmp_path / "next.log", **one):
                    done = wait_for(lambda: (j := current(app, job_id)).state == "succeeded"
                                    and j, timeout=120, what="the next worker to finish")
            finally:
                os.kill(silent, signal.SIGCONT)
            wait_for(lambda: "executed in" in (tmp_path / "silent.log").read_text(),
                     timeout=60, what="the silent worker, woken, to end its task")
    finally:
        with app.app_context():
            lanes.exports.flush()
            lanes.critical.flush()
    after = current(app, job_id)
    first, second = after.attempts
    assert (first.outcome, second.outcome) == ("cancelled", "succeeded")
    assert first.finished_at == done.attempts[0].finished_at, "the woken worker touched nothing"
    assert (after.state, after.file_name, after.sha256) == ("succeeded", done.file_name,
                                                            done.sha256)
    data = (instance / "exports" / done.file_name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == done.sha256
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows == expected_rows(os.environ["DATABASE_URL"], "transactions", "acme",
                                 "and status = ?", ("settled",))
    assert not list((instance / "exports").glob(f"job-{job_id}.*.part"))
