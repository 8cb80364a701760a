"""The admin console: roles, filters, search, keyset pages, cancel and retry (one and bulk),
the audit log, lane health through one function, /metrics and /healthz."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta

import pytest
from conftest import csrf_from, login, run_inline
from sqlalchemy import select, update

from jobs import dispatch, lanes, mail
from jobs.models import AdminAction, EmailState, ExportJob, JobState, OutboundEmail, db
from jobs.storage import storage
from webapp.auth import find_user


@pytest.fixture(autouse=True)
def empty_lanes(app):
    """Retries put messages on the (SQLite) exports lane; leave it as we found it."""
    yield
    with app.app_context():
        for lane in lanes.LANES.values():
            lane.resume()
            lane.flush()


@pytest.fixture
def viewer(app):
    return login(app.test_client(), "viewer@exportdesk.test")


def make_job(app, email: str = "alice@acme.test", **values) -> int:
    values.setdefault("params", {})
    with app.app_context():
        user = find_user(email)
        job = ExportJob(user=user, org_id=user.org_id, dataset=values.pop("dataset",
                                                                          "transactions"),
                        **values)
        db.session.add(job)
        db.session.commit()
        return job.id


def make_email(app, to: str, created_at: datetime, job_id: int | None = None) -> int:
    with app.app_context():
        email = OutboundEmail(key=secrets.token_hex(8), kind="export_ready", to_address=to,
                              subject="Your export is ready", text_body="", html_body="",
                              message_id="<x@test>", job_id=job_id, created_at=created_at)
        db.session.add(email)
        db.session.commit()
        return email.id


def state(app, job_id: int) -> str:
    with app.app_context():
        return db.session.get(ExportJob, job_id).state


def post(client, path: str, **data):
    token = csrf_from(client.get("/").get_data(as_text=True))
    return client.post(path, data={"csrf_token": token, **data})


def listed(html: str) -> list[str]:
    """Row ids of the list page in order: job-row-7, email-row-3, ..."""
    return re.findall(r'<tr id="((?:job|email)-row-\d+)"', html)


def test_roles_user_403_viewer_reads_only_admin_acts(app, alice, viewer, admin):
    job_id = make_job(app)
    reads = ["/admin/jobs", f"/admin/jobs/{job_id}", f"/admin/jobs/{job_id}/row",
             "/admin/lanes", "/admin/jobs/bulk?action=cancel", "/api/lanes"]
    for path in reads:
        assert alice.get(path).status_code == 403, path
        assert viewer.get(path).status_code == 200, path
        assert admin.get(path).status_code == 200, path
    actions = [(f"/admin/jobs/{job_id}/cancel", {}), ("/admin/lanes/exports/pause", {}),
               ("/admin/jobs/bulk", {"action": "cancel", "ids": str(job_id)})]
    for path, data in actions:
        assert post(alice, path, **data).status_code == 403, path
        assert post(viewer, path, **data).status_code == 403, path
    assert state(app, job_id) == JobState.QUEUED
    with app.app_context():
        assert not lanes.exports.paused
    page = viewer.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert "admin-cancel" not in page and "read-only" in page
    assert 'id="admin-cancel"' in admin.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert app.test_client().get("/admin/jobs").status_code == 302  # to the login page


def test_a_live_row_refreshes_only_its_state_and_count_until_the_job_ends(app, admin):
    job_id = make_job(app, state=JobState.RUNNING, rows_done=1500, rows_total=3000)
    row = re.search(rf'<tr id="job-row-{job_id}".*?</tr>',
                    admin.get("/admin/jobs").get_data(as_text=True), re.S).group(0)
    assert row.count("hx-get") == 1 and re.search(rf'id="job-state-{job_id}"\s+hx-get=', row), \
        "the state cell polls, not the row (whose link must stay put)"
    live = admin.get(f"/admin/jobs/{job_id}/row").get_data(as_text=True)
    assert "<a " not in live and "<input" not in live, "only the changing cells are sent"
    assert 'hx-trigger="every 1s"' in live and 'aria-valuenow="50.0"' in live
    assert f'id="job-done-{job_id}" hx-swap-oob="true">1,500 of 3,000<' in live
    with app.app_context():
        db.session.execute(update(ExportJob).where(ExportJob.id == job_id)
                           .values(state=JobState.SUCCEEDED, rows_done=3000))
        db.session.commit()
    done = admin.get(f"/admin/jobs/{job_id}/row").get_data(as_text=True)
    assert "hx-trigger" not in done and ">succeeded<" in done and ">3,000 of 3,000<" in done


def test_filters_and_search(app, admin):
    tag = secrets.token_hex(4)
    day = datetime(2003, 4, 5, 12)
    a = make_job(app, params={"status": f"tag-{tag}"}, state=JobState.FAILED, created_at=day)
    b = make_job(app, "bob@globex.test", dataset="orders", state=JobState.SUCCEEDED,
                 created_at=day + timedelta(minutes=1))
    c = make_job(app, state=JobState.QUEUED, created_at=day + timedelta(days=1))
    e = make_email(app, "bob@globex.test", day + timedelta(minutes=2), job_id=b)

    def rows(**args) -> list[str]:
        response = admin.get("/admin/jobs", query_string={"date_from": "2003-04-05",
                                                          "date_to": "2003-04-06", **args})
        assert response.status_code == 200
        return listed(response.get_data(as_text=True))

    assert rows() == [f"job-row-{c}", f"email-row-{e}", f"job-row-{b}", f"job-row-{a}"]
    assert rows(date_to="2003-04-05") == [f"email-row-{e}", f"job-row-{b}", f"job-row-{a}"]
    assert rows(state="failed") == [f"job-row-{a}"]
    assert rows(state="sent") == []  # the email is queued
    assert rows(state="queued") == [f"job-row-{c}", f"email-row-{e}"]
    assert rows(dataset="orders") == [f"job-row-{b}"]
    assert rows(lane="critical") == [f"email-row-{e}"]
    assert rows(lane="exports") == [f"job-row-{c}", f"job-row-{b}", f"job-row-{a}"]
    assert rows(user="bob@globex.test") == [f"email-row-{e}", f"job-row-{b}"]
    assert rows(user="nobody@nowhere.test") == []
    # search: a job id (the job and its emails), an email address, a parameter value
    assert rows(q=f"#{b}") == [f"email-row-{e}", f"job-row-{b}"]
    assert rows(q=str(a)) == [f"job-row-{a}"]
    assert rows(q="BOB@globex.test") == [f"email-row-{e}", f"job-row-{b}"]
    # a parameter value matches whole, in any case (an indexed lookup, not a substring scan)
    def search(q: str) -> list[str]:
        return listed(admin.get("/admin/jobs", query_string={"q": q}).text)

    assert search(f"TAG-{tag}") == [f"job-row-{a}"]
    assert search(tag) == []
    assert search("Your export is ready") == []  # emails are found by id, address, state, date
    assert search("100%_") == []
    # bad input is ignored, never a 500
    for args in ({"state": "nope"}, {"date_from": "yesterday"}, {"after": "x.y"},
                 {"lane": "../../etc"}, {"q": "'; drop table users; --"}):
        assert admin.get("/admin/jobs", query_string=args).status_code == 200


def test_keyset_pages_cover_every_row_once_newest_first(app, admin):
    start = datetime(1999, 1, 1)
    jobs = [make_job(app, created_at=start + timedelta(seconds=2 * i)) for i in range(110)]
    emails = [make_email(app, "alice@acme.test", start + timedelta(seconds=2 * i + 1))
              for i in range(0, 110, 10)]
    seen, url, pages = [], "/admin/jobs?date_from=1999-01-01&date_to=1999-01-01", 0
    while url:
        html = admin.get(url).get_data(as_text=True)
        seen += listed(html)
        pages += 1
        found = re.search(r'rel="next" href="([^"]+)"', html)
        url = found.group(1).replace("&amp;", "&") if found else None
    expected = ([f"job-row-{j}" for j in jobs] + [f"email-row-{e}" for e in emails])
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen)) == 121
    assert pages == 5  # 25 rows a page
    order = {f"job-row-{j}": 2 * i for i, j in enumerate(jobs)}
    order.update({f"email-row-{e}": 20 * i + 1 for i, e in enumerate(emails)})
    assert [order[r] for r in seen] == sorted(order.values(), reverse=True)


def test_admin_cancel_and_retry_one_job_with_audit_and_409(app, admin):
    job_id = make_job(app)
    response = post(admin, f"/admin/jobs/{job_id}/cancel")
    assert response.status_code == 303 and state(app, job_id) == JobState.CANCELLED
    response = post(admin, f"/admin/jobs/{job_id}/cancel")
    assert response.status_code == 409 and "only queued or running" in response.text
    assert post(admin, f"/admin/jobs/{job_id}/retry").status_code == 303
    assert state(app, job_id) == JobState.QUEUED
    with app.app_context():
        assert lanes.exports.pending_count() >= 1
        log = db.session.scalars(select(AdminAction).where(AdminAction.job_id == job_id)
                                 .order_by(AdminAction.id)).all()
        assert [(a.action, a.detail, a.user.email) for a in log] == [
            ("cancel", "queued -> cancelled", "admin@exportdesk.test"),
            ("retry", "cancelled -> queued", "admin@exportdesk.test")]
    page = admin.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert 'id="audit"' in page and "cancelled -&gt; queued" in page
    assert post(admin, "/admin/jobs/999999999/cancel").status_code == 404


def test_retry_from_scratch_clears_checkpoint_and_part_file(app, admin):
    job_id = make_job(app, state=JobState.FAILED, rows_done=500, bytes=10,
                      checkpoint={"rows": 500, "bytes": 10, "key": [1]})
    with app.app_context():
        part, _ = storage().open_part(job_id, 1, "csv")
        with part:
            part.write(b"0123456789")
    assert post(admin, f"/admin/jobs/{job_id}/retry", from_scratch="1").status_code == 303
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        assert (job.state, job.checkpoint, job.rows_done, job.bytes) == ("queued", None, 0, 0)
        assert storage().parts(job_id) == []
        assert db.session.scalar(select(AdminAction.action).where(
            AdminAction.job_id == job_id)) == "retry_from_scratch"


def test_bulk_selected_and_everything_matching_after_confirmation(app, admin):
    day = datetime(2004, 6, 7, 9)
    queued = [make_job(app, created_at=day) for _ in range(3)]
    done = make_job(app, state=JobState.SUCCEEDED, created_at=day)
    picked = [str(queued[0]), str(queued[1]), str(done), "junk"]
    asked = post(admin, "/admin/jobs/bulk", action="cancel", ids=picked)
    assert asked.status_code == 200 and 'id="confirm-yes"' in asked.text  # asks first
    assert [state(app, j) for j in queued] == ["queued"] * 3
    response = post(admin, "/admin/jobs/bulk", action="cancel", confirmed="1", ids=picked)
    assert response.status_code == 303
    assert [state(app, j) for j in queued] == ["cancelled", "cancelled", "queued"]
    assert state(app, done) == "succeeded"
    flashed = admin.get(response.headers["Location"]).get_data(as_text=True)
    assert "Cancelled 2 export(s)" in flashed and f"#{done}" in flashed

    failed = [make_job(app, state=JobState.FAILED, created_at=day) for _ in range(4)]
    other = make_job(app, state=JobState.FAILED, created_at=day + timedelta(days=1))
    where = {"date_from": "2004-06-07", "date_to": "2004-06-07"}
    page = admin.get("/admin/jobs/bulk", query_string={"action": "retry", **where}).text
    assert 'id="bulk-count"' in page and "<strong>6</strong>" in page  # 4 failed, 2 cancelled
    response = post(admin, "/admin/jobs/bulk", action="retry", scope="filter", **where)
    assert response.status_code == 303
    assert {state(app, j) for j in failed + queued} == {"queued"}
    assert state(app, other) == "failed" and state(app, done) == "succeeded"
    assert post(admin, "/admin/jobs/bulk", action="explode").status_code == 400


def test_lane_health_is_one_function_for_page_api_and_metrics(app, admin, monkeypatch):
    calls = []
    real = dispatch.lane_health

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(dispatch, "lane_health", counted)
    lanes_json = admin.get("/api/lanes").json["lanes"]
    assert [h["lane"] for h in lanes_json] == ["critical", "exports"]
    assert all(len(h["minutes"]) == 60 and "paused" in h for h in lanes_json)
    page = admin.get("/admin/lanes").get_data(as_text=True)
    assert 'id="lane-critical"' in page and "<svg" in page and "Export files use" in page
    metrics = app.test_client().get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.content_type
    assert len(calls) == 3


def test_pause_and_resume_from_the_page_is_audited(app, admin):
    assert post(admin, "/admin/lanes/exports/pause").status_code == 303
    with app.app_context():
        assert dispatch.paused("exports") and not dispatch.paused("critical")
        assert lanes.exports.dequeue() is None
    assert "Resume exports" in admin.get("/admin/lanes").get_data(as_text=True)
    assert post(admin, "/admin/lanes/exports/resume").status_code == 303
    assert post(admin, "/admin/lanes/nope/pause").status_code == 404
    with app.app_context():
        assert not dispatch.paused("exports")
        assert db.session.scalars(select(AdminAction.action).where(
            AdminAction.lane == "exports").order_by(AdminAction.id.desc()).limit(2)
        ).all() == ["resume", "pause"]


def test_metrics_and_healthz(app, client):
    job_id = make_job(app, state=JobState.FAILED)
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        from jobs.models import JobAttempt

        db.session.add(JobAttempt(job=job, number=1, worker="w", outcome="failed",
                                  started_at=datetime(2020, 1, 1, 0, 0, 0),
                                  finished_at=datetime(2020, 1, 1, 0, 0, 7)))
        db.session.commit()
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("exportdesk_lane_depth{lane=\"exports\"}",
                 "exportdesk_lane_oldest_wait_seconds{lane=\"critical\"}",
                 "exportdesk_lane_running", "exportdesk_lane_paused",
                 'exportdesk_lane_tasks_last_hour{lane="exports",outcome="failed"}',
                 'exportdesk_job_attempts_total{lane="exports",outcome="failed"}',
                 'exportdesk_job_attempt_duration_seconds_bucket{lane="exports",le="15.0"}',
                 "exportdesk_export_disk_bytes"):
        assert name in text, name
    le5 = re.search(r'duration_seconds_bucket\{lane="exports",le="5.0"\} (\S+)', text)
    le15 = re.search(r'duration_seconds_bucket\{lane="exports",le="15.0"\} (\S+)', text)
    assert float(le15.group(1)) >= float(le5.group(1)) + 1  # our 7 s attempt
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json == {"status": "ok"}


def test_healthz_503_when_the_database_does_not_answer(instance, tmp_path):
    from webapp import create_app

    broken = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI":
                         f"sqlite:///{tmp_path}/missing/dir/db.sqlite"})
    response = broken.test_client().get("/healthz")
    assert response.status_code == 503 and response.json["status"] == "unavailable"


def test_api_jobs_lists_mine_or_everyone_for_staff(app, alice, admin):
    mine = make_job(app, state=JobState.FAILED)
    theirs = make_job(app, "bob@globex.test", state=JobState.FAILED)
    ids = [j["id"] for j in alice.get("/api/jobs").json["jobs"]]
    assert mine in ids and theirs not in ids
    ids = [j["id"] for j in alice.get("/api/jobs?user=bob@globex.test").json["jobs"]]
    assert theirs not in ids  # filters are for staff; a user always sees only their own
    body = admin.get("/api/jobs?state=failed&lane=exports").json
    assert {mine, theirs} <= {j["id"] for j in body["jobs"]}
    assert all(j["state"] == "failed" for j in body["jobs"])
    dated = admin.get("/api/jobs", query_string={"state": "failed", "date_from": "2000-01-01"})
    assert {mine, theirs} <= {j["id"] for j in dated.json["jobs"]}
    assert alice.get("/api/lanes").status_code == 403


def email_row(app, email_id: int) -> OutboundEmail:
    with app.app_context():
        email = db.session.get(OutboundEmail, email_id)
        db.session.expunge(email)
        return email


def test_admin_cancels_a_queued_email_then_sends_it_again(app, admin, viewer, smtp,
                                                           monkeypatch):
    monkeypatch.setitem(app.config, "SMTP_URL", smtp.url)
    smtp.mailbox.clear()
    email_id = make_email(app, "alice@acme.test", datetime.utcnow())
    assert post(viewer, f"/admin/emails/{email_id}/cancel").status_code == 403
    response = post(admin, f"/admin/emails/{email_id}/cancel")
    assert response.status_code == 303 and response.headers["Location"].endswith(
        f"/admin/emails/{email_id}")
    assert email_row(app, email_id).state == EmailState.CANCELLED
    with app.app_context():
        mail.deliver(email_id, max_attempts=3)  # its message still on the lane: does nothing
    assert smtp.mailbox.messages == [] and email_row(app, email_id).attempts == 0
    again = post(admin, f"/admin/emails/{email_id}/cancel")
    assert again.status_code == 409 and "only queued, retrying or sending" in again.text

    assert post(admin, f"/admin/emails/{email_id}/retry").status_code == 303
    assert email_row(app, email_id).state == EmailState.QUEUED
    with app.app_context():
        pending = [t.args for t in lanes.critical.pending() if t.name == "send_email"]
        assert (email_id,) in pending, "back on the critical lane"
        mail.deliver(email_id, max_attempts=3)
    row = email_row(app, email_id)
    assert row.state == EmailState.SENT and row.attempts == 1
    message = smtp.mailbox.wait_for(lambda m: m["X-Exportdesk-Email"] == str(email_id))
    assert message["To"] == "alice@acme.test"
    assert post(admin, f"/admin/emails/{email_id}/retry").status_code == 409  # sent: no

    page = admin.get(f"/admin/emails/{email_id}").text
    assert 'id="audit"' in page and "cancelled -&gt; queued (after 0 attempt(s))" in page
    assert 'id="admin-cancel"' not in page and 'id="admin-retry"' not in page
    assert post(admin, "/admin/emails/999999999/retry").status_code == 404


def test_a_failed_email_retried_by_an_admin_gets_a_fresh_allowance(app, admin):
    email_id = make_email(app, "bob@globex.test", datetime.utcnow())
    with app.app_context():
        db.session.get(OutboundEmail, email_id).state = EmailState.FAILED
        db.session.get(OutboundEmail, email_id).attempts = 4
        db.session.commit()
    page = admin.get(f"/admin/emails/{email_id}").text
    assert 'id="admin-retry"' in page
    assert post(admin, f"/admin/emails/{email_id}/retry").status_code == 303
    row = email_row(app, email_id)
    assert (row.state, row.attempts, row.error) == (EmailState.QUEUED, 0, None)
    with app.app_context():
        assert db.session.scalar(select(AdminAction.detail).where(
            AdminAction.email_id == email_id)) == "failed -> queued (after 4 attempt(s))"


@pytest.mark.parametrize("reaches_the_server", [False, True])
def test_an_email_cancelled_while_being_sent_is_not_retried(app, admin, monkeypatch,
                                                            reaches_the_server):
    """The attempt under way cannot be stopped; it ends by itself and is never retried. If it
    still reached the server, the row says sent: that is what happened."""
    email_id = make_email(app, "alice@acme.test", datetime.utcnow())

    class CancelledMidway:
        def send(self, message):
            assert email_row(app, email_id).state == EmailState.SENDING
            assert post(admin, f"/admin/emails/{email_id}/cancel").status_code == 303
            if not reaches_the_server:
                raise ConnectionRefusedError("the server went away")

    monkeypatch.setattr(mail, "transport", CancelledMidway)
    with app.app_context():
        mail.deliver(email_id, max_attempts=3)  # no DeliveryFailed: the lane does not retry
    row = email_row(app, email_id)
    assert row.state == (EmailState.SENT if reaches_the_server else EmailState.CANCELLED)
    with app.app_context():
        mail.deliver(email_id, max_attempts=3)  # a late retry message does nothing either
    assert email_row(app, email_id).attempts == 1


def test_bulk_acts_on_selected_emails_and_on_emails_matching_the_filter(app, admin):
    day = datetime(2003, 3, 4, 10)
    queued = [make_email(app, "alice@acme.test", day) for _ in range(2)]
    job_id = make_job(app, created_at=day)
    response = post(admin, "/admin/jobs/bulk", action="cancel", confirmed="1",
                    ids=[str(job_id)], email_ids=[str(queued[0])])
    flashed = admin.get(response.headers["Location"]).text
    assert "Cancelled 1 export(s) and 1 email(s)." in flashed
    assert email_row(app, queued[0]).state == EmailState.CANCELLED
    assert email_row(app, queued[1]).state == EmailState.QUEUED

    where = {"date_from": "2003-03-04", "date_to": "2003-03-04"}
    page = admin.get("/admin/jobs/bulk", query_string={"action": "retry", **where}).text
    assert re.search(r"<strong>1</strong> export\(s\)\s+and <strong id=\"bulk-emails\">1</strong>",
                     page)
    exports_only = admin.get("/admin/jobs/bulk", query_string={
        "action": "retry", "lane": "exports", **where}).text
    assert '<strong id="bulk-emails">0</strong>' in exports_only
    post(admin, "/admin/jobs/bulk", action="retry", scope="filter", **where)
    assert email_row(app, queued[0]).state == EmailState.QUEUED
    assert state(app, job_id) == JobState.QUEUED
    listing = admin.get("/admin/jobs", query_string=where).text
    assert f'name="email_ids" value="{queued[0]}"' in listing


def test_a_failed_attempt_shows_its_traceback_to_staff(app, admin):
    job = run_inline(app, "alice@acme.test", "payroll")
    with app.app_context():
        [attempt] = db.session.get(ExportJob, job.id).attempts
        assert "Traceback (most recent call last)" in attempt.traceback
        assert "PermanentFailure" in attempt.traceback
    page = admin.get(f"/admin/jobs/{job.id}").text
    assert "<summary>Traceback</summary>" in page and "PermanentFailure" in page
