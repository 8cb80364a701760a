"""Pages and API through the test client: authorisation, CSRF and every kind of bad input."""

from __future__ import annotations

import pytest
from conftest import csrf_from, login
from sqlalchemy import select

from jobs import lanes
from jobs.models import ExportJob, db
from webapp.auth import create_token, find_user


# Every test starts from a database and lanes of its own (conftest.fresh): the jobs a test
# finds are the ones it made.
@pytest.fixture
def app(fresh):
    return fresh.app


@pytest.fixture
def instance(fresh):
    return fresh.path


def submit(client, **fields):
    token = csrf_from(client.get("/").get_data(as_text=True))
    data = {"dataset": "transactions", "format": "csv", "date_from": "", "date_to": "",
            "status": "", "csrf_token": token}
    data.update(fields)
    return client.post("/exports", data=data)


def latest_job(app) -> ExportJob:
    with app.app_context():
        return db.session.scalars(select(ExportJob).order_by(ExportJob.id.desc())).first()


@pytest.mark.parametrize("path", ["/", "/exports", "/exports/1", "/exports/1/download"])
def test_pages_send_logged_out_users_to_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


def test_wrong_password_is_refused(client):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"email": "alice@acme.test", "password": "nope",
                                           "csrf_token": token})
    assert response.status_code == 400
    assert "Wrong email or password" in response.get_data(as_text=True)


def test_login_email_is_case_insensitive(client):
    login(client, "  Alice@ACME.test ")
    assert "alice@acme.test" in client.get("/").get_data(as_text=True)


def test_login_ignores_offsite_next(client):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    response = client.post("/login?next=//evil.test/x", data={
        "email": "alice@acme.test", "password": "exportdesk", "csrf_token": token})
    assert response.headers["Location"] == "/"


def test_form_lists_datasets_and_formats(alice):
    html = alice.get("/").get_data(as_text=True)
    assert "Transactions" in html and "Orders" in html
    assert 'type="date"' in html and 'value="csv"' in html


def test_submit_records_job_scoped_to_org_and_redirects(app, alice):
    response = submit(alice, status="settled", date_from="2026-02-01", date_to="2026-03-31")
    assert response.status_code == 303
    job = latest_job(app)
    assert response.headers["Location"] == f"/exports/{job.id}"
    assert job.params == {"status": "settled", "date_from": "2026-02-01",
                          "date_to": "2026-03-31"}
    assert job.state == "queued" and job.lane == "exports"
    with app.app_context():
        assert job.org_id == find_user("alice@acme.test").org_id
    page = alice.get(f"/exports/{job.id}").get_data(as_text=True)
    assert 'hx-trigger="every 1s"' in page and 'role="progressbar"' in page


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dataset": "payroll"}, "Unknown dataset"),
        ({"date_from": "2026-13-45"}, "must be a date"),
        ({"date_from": "yesterday"}, "must be a date"),
        ({"date_from": "2026-05-01", "date_to": "2026-04-01"}, "must not be before"),
        ({"status": "stolen"}, "must be one of"),
        ({"format": "exe"}, "Format must be one of csv, csv.gz, xlsx."),
        ({"org_id": "2"}, "is not a parameter"),
    ],
)
def test_bad_form_input_gets_a_message_not_a_500(app, alice, fields, message):
    response = submit(alice, **fields)
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    assert latest_job(app) is None, "no job recorded"


def test_queued_exports_per_user_are_capped_with_a_clear_message(app, client, monkeypatch):
    login(client, "admin@exportdesk.test")
    monkeypatch.setitem(app.config, "EXPORTS_QUEUED_PER_USER", 2)
    assert submit(client, status="pending").status_code == 303
    assert submit(client, status="settled").status_code == 303
    response = submit(client, status="refunded")
    assert response.status_code == 429
    assert "You already have 2 exports waiting" in response.get_data(as_text=True)
    token = csrf_from(client.get("/").get_data(as_text=True))
    api = client.post("/api/exports", json={"dataset": "orders", "params": {"status": "open"}},
                      headers={"X-CSRFToken": token})
    assert api.status_code == 429 and "limit is" in api.json["error"]


def test_post_without_csrf_token_is_400(alice):
    response = alice.post("/exports", data={"dataset": "transactions", "format": "csv"})
    assert response.status_code == 400
    assert "form expired" in response.get_data(as_text=True)


def test_non_numeric_and_unknown_job_ids_are_404(alice):
    assert alice.get("/exports/abc").status_code == 404
    assert alice.get("/exports/999999").status_code == 404
    assert alice.get("/exports/999999/download").status_code == 404


def test_other_users_job_is_404_for_page_download_and_api(app, alice, bob, admin):
    submit(alice)
    job = latest_job(app)
    for path in (f"/exports/{job.id}", f"/exports/{job.id}/download", f"/api/jobs/{job.id}"):
        assert bob.get(path).status_code == 404, path
    assert admin.get(f"/exports/{job.id}").status_code == 200
    assert admin.get(f"/api/jobs/{job.id}").json["id"] == job.id


def test_download_of_unfinished_job_is_404(app, alice):
    submit(alice)
    response = alice.get(f"/exports/{latest_job(app).id}/download")
    assert response.status_code == 404
    assert "no file" in response.get_data(as_text=True)


def test_job_is_enqueued_only_after_commit(app):
    from webapp.exports import create_export

    with app.app_context():
        user = find_user("alice@acme.test")
        create_export(user, "orders", "csv", {})
        assert lanes.exports.pending_count() == 0, "sent before the commit"
        db.session.rollback()
        assert lanes.exports.pending_count() == 0, "sent although rolled back"
        job = create_export(user, "orders", "csv", {})
        db.session.commit()
        assert lanes.exports.pending_count() == 1
        message = lanes.exports.dequeue()
        assert message.args == (job.id,)
        create_token(user)  # the session's next transaction commits too
        assert lanes.exports.pending_count() == 0, "a later commit must not send the job again"


# JSON API


@pytest.fixture
def token(app):
    with app.app_context():
        return create_token(find_user("alice@acme.test"))


def test_api_create_with_bearer_token_returns_202_job(app, client, token):
    response = client.post("/api/exports", json={"dataset": "orders", "format": "csv",
                                                 "params": {"status": "open"}},
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 202, response.json
    job = response.json
    assert set(job) == {"id", "state", "lane", "dataset", "format", "params", "rows_done",
                        "rows_total", "progress", "bytes", "sha256", "created_at", "started_at",
                        "finished_at", "error", "utf8_replaced", "xlsx_truncated",
                        "download_url", "lane_paused", "ahead", "schedule_id"}
    assert job["state"] == "queued" and job["lane"] == "exports"
    assert job["lane_paused"] is False and isinstance(job["ahead"], int)
    assert job["params"] == {"status": "open"} and job["download_url"] is None
    again = client.get(f"/api/jobs/{job['id']}", headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 200 and again.json["id"] == job["id"]
    assert response.headers["Location"].endswith(f"/api/jobs/{job['id']}")


def test_api_tokens_are_stored_hashed(app, token):
    from jobs.models import ApiToken

    with app.app_context():
        stored = db.session.scalars(select(ApiToken.token_hash)).all()
    assert token not in stored and ApiToken.hash(token) in stored


@pytest.mark.parametrize(
    "body, field",
    [
        ({"dataset": "nope", "format": "csv"}, "dataset"),
        ({"dataset": "orders", "format": "pdf"}, "format"),
        ({"dataset": "orders", "params": {"date_to": "2026-02-30"}}, "date_to"),
        ({"dataset": "orders", "params": ["status"]}, "params"),
    ],
)
def test_api_bad_input_is_400_with_field_errors(client, token, body, field):
    response = client.post("/api/exports", json=body,
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400
    assert field in response.json["fields"]


def test_api_rejects_non_json_and_unknown_tokens(client, token):
    response = client.post("/api/exports", data="dataset=orders",
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400 and "JSON" in response.json["error"]
    response = client.get("/api/jobs/1", headers={"Authorization": "Bearer xd_forged"})
    assert response.status_code == 401 and response.json["error"]


def test_api_with_session_still_needs_csrf(alice):
    response = alice.post("/api/exports", json={"dataset": "orders"})
    assert response.status_code == 400
    token = csrf_from(alice.get("/").get_data(as_text=True))
    response = alice.post("/api/exports", json={"dataset": "orders"},
                          headers={"X-CSRFToken": token})
    assert response.status_code == 202


def test_secret_key_is_generated_once_into_the_instance(app, instance):
    app.test_client().get("/login")  # made on first use (a session, a form, a link)
    key_file = instance / "secret_key"
    assert key_file.read_text().strip() == app.config["SECRET_KEY"]
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_production_refuses_to_start_without_secret_key(monkeypatch):
    from webapp import config

    monkeypatch.setenv("EXPORTDESK_ENV", "production")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        config.load()


def test_login_helper_works_for_admin(app):
    login(app.test_client(), "admin@exportdesk.test")
