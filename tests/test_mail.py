"""Emails against a real SMTP server: the export link, the token cases, sending once, failures."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from conftest import csrf_from, login, run_inline
from mailserver import MailServer, html_of, links_in, self_signed_cert, text_of
from sqlalchemy import select

from jobs import lanes, mail
from jobs.models import EmailState, ExportJob, JobState, OutboundEmail, db, utcnow
from jobs.storage import storage
from webapp.auth import find_user

# the plain-SMTP authentication case is deliberate: it tests our client, not a deployment
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


def finished_job(app, email: str, dataset: str = "orders", params: dict | None = None) -> int:
    """Run an export inline to its end, as a worker would; the email is queued on its commit."""
    return run_inline(app, email, dataset, params).id


def emails_of(app, job_id: int) -> list[OutboundEmail]:
    with app.app_context():
        rows = db.session.scalars(select(OutboundEmail).where(OutboundEmail.job_id == job_id)
                                  .order_by(OutboundEmail.id)).all()
        for row in rows:
            db.session.expunge(row)
        return rows


def for_job(job_id: int):
    return lambda m: f"/exports/{job_id}" in text_of(m)


def download_path(message) -> str:
    [link] = [link for link in links_in(message) if "/d/" in link]
    return urlsplit(link).path


def test_success_email_arrives_with_a_working_link(app, client, instance, sending):
    job_id = finished_job(app, "bob@globex.test", "orders", {"status": "open"})
    message = sending.wait_for(for_job(job_id))
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        rows, file_name = job.rows_done, job.file_name
    assert message["To"] == "bob@globex.test"
    assert message["Subject"] == f"Your Orders export is ready ({rows:,} rows)"
    assert message.get_content_type() == "multipart/alternative"
    path = download_path(message)
    assert path in html_of(message)
    assert links_in(message)[0].startswith(app.config["BASE_URL"] + "/d/")

    response = client.get(path)  # no login needed by default, like a signed storage URL
    assert response.status_code == 200
    assert response.data == (instance / "exports" / file_name).read_bytes()
    assert "orders-globex-" in response.headers["Content-Disposition"]
    assert response.headers["Referrer-Policy"] == "no-referrer"

    [row] = emails_of(app, job_id)
    assert row.state == EmailState.SENT and row.attempts == 1 and row.sent_at
    assert row.message_id == message["Message-ID"]


def test_a_duplicated_or_retried_send_task_sends_once(app, sending):
    job_id = finished_job(app, "alice@acme.test", "orders")
    sending.wait_for(for_job(job_id))
    [row] = emails_of(app, job_id)
    from jobs.tasks import send_email

    with app.app_context():
        send_email(row.id)  # a duplicate message on the lane
        mail.deliver(row.id, max_attempts=10)  # a retry after success
        from webapp import emails

        job = db.session.get(ExportJob, job_id)
        assert emails.download_email(job, f"export-ready:{job_id}") is None, "same key"
        db.session.commit()
    assert len([m for m in sending.messages if for_job(job_id)(m)]) == 1
    [again] = emails_of(app, job_id)
    assert again.attempts == 1 and again.state == EmailState.SENT


def test_tampered_token_is_403(app, client, sending):
    job_id = finished_job(app, "alice@acme.test", "orders")
    path = download_path(sending.wait_for(for_job(job_id)))
    token = path.rsplit("/", 1)[1]
    flipped = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    for bad in (flipped, token[:-10], "nonsense", "a.b.c"):
        response = client.get(f"/d/{bad}")
        assert response.status_code == 403, bad
        assert "not valid" in response.get_data(as_text=True)
    assert client.post(f"/d/{flipped}/renew").status_code == 400  # no CSRF token
    assert client.get(path).status_code == 200


def test_token_is_bound_to_the_jobs_owner(app, client, sending):
    job_id = finished_job(app, "alice@acme.test", "orders")
    path = download_path(sending.wait_for(for_job(job_id)))
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        alice_id, job.user_id = job.user_id, find_user("bob@globex.test").id
        db.session.commit()
    assert client.get(path).status_code == 403
    with app.app_context():
        db.session.get(ExportJob, job_id).user_id = alice_id
        db.session.commit()
    assert client.get(path).status_code == 200


def test_a_reset_token_is_not_a_download_token(app, client):
    from webapp.tokens import reset_token

    with app.app_context():
        token = reset_token(find_user("alice@acme.test"))
    assert client.get(f"/d/{token}").status_code == 403


def test_expired_link_is_410_and_the_owner_gets_a_fresh_one(app, client, sending, monkeypatch):
    job_id = finished_job(app, "alice@acme.test", "orders")
    path = download_path(sending.wait_for(for_job(job_id)))
    monkeypatch.setitem(app.config, "DOWNLOAD_LINK_TTL", timedelta(seconds=-1))
    response = client.get(path)
    assert response.status_code == 410
    page = response.get_data(as_text=True)
    assert "expired" in page and f"{path}/renew" in page
    for _ in range(2):  # a second click sends nothing more
        response = client.post(f"{path}/renew", data={"csrf_token": csrf_from(page)})
        assert response.status_code == 200
    monkeypatch.setitem(app.config, "DOWNLOAD_LINK_TTL", timedelta(days=7))
    fresh = sending.wait_for(lambda m: m["Subject"].startswith("A fresh link")
                             and for_job(job_id)(m))
    assert fresh["To"] == "alice@acme.test"
    assert client.get(download_path(fresh)).status_code == 200
    assert [r.kind for r in emails_of(app, job_id)] == ["download-link", "download-link"]
    assert client.post(f"{path}/renew", data={"csrf_token": csrf_from(page)}).status_code == 303


def test_file_removed_by_retention_is_410_with_a_way_to_run_it_again(app, client, sending):
    params = {"status": "shipped", "date_from": "2026-02-01"}
    job_id = finished_job(app, "alice@acme.test", "orders", params)
    path = download_path(sending.wait_for(for_job(job_id)))
    with app.app_context():
        job = db.session.get(ExportJob, job_id)
        storage().delete(job.file_name)
        job.state, job.file_name = JobState.EXPIRED, None
        db.session.commit()
    response = client.get(path)
    assert response.status_code == 410
    assert "removed" in response.get_data(as_text=True)
    assert "Log in to run it again" in response.get_data(as_text=True)
    assert f'/login?next={path}"' in response.get_data(as_text=True)

    login(client, "alice@acme.test")
    page = client.get(path).get_data(as_text=True)
    assert "Run this export again" in page
    fields = dict(__import__("re").findall(r'type="hidden" name="(\w+)" value="([^"]*)"', page))
    assert fields.pop("csrf_token") and fields == {"dataset": "orders", "format": "csv", **params}
    response = client.post("/exports", data={**fields, "csrf_token": csrf_from(page)})
    assert response.status_code == 303
    with app.app_context():
        again = db.session.scalars(select(ExportJob).order_by(ExportJob.id.desc())).first()
        assert again.id != job_id and again.params == params and again.state == "queued"


def test_link_can_require_a_login_as_its_owner(app, sending, monkeypatch):
    job_id = finished_job(app, "alice@acme.test", "orders")
    path = download_path(sending.wait_for(for_job(job_id)))
    monkeypatch.setitem(app.config, "DOWNLOAD_LINK_LOGIN", True)
    response = app.test_client().get(path)
    assert response.status_code == 302 and "/login?next=" in response.headers["Location"]
    assert login(app.test_client(), "bob@globex.test").get(path).status_code == 403
    assert login(app.test_client(), "alice@acme.test").get(path).status_code == 200


def test_failure_email_when_an_export_fails_for_good(app, sending, monkeypatch):
    job_id = finished_job(app, "bob@globex.test", "payroll")
    message = sending.wait_for(for_job(job_id))
    assert message["Subject"] == "Your payroll export failed"
    assert "no longer exists" in text_of(message)
    monkeypatch.setitem(app.config, "EXPORT_FAILURE_EMAIL", False)
    quiet = finished_job(app, "bob@globex.test", "payroll")
    assert emails_of(app, quiet) == []


def test_smtp_down_retries_then_fails_with_the_reason_the_export_stays(app, monkeypatch):
    job_id = finished_job(app, "alice@acme.test", "orders")  # critical lane not consumed here
    [row] = emails_of(app, job_id)
    assert row.state == EmailState.QUEUED
    pending = [t.args for t in lanes.critical.pending() if t.name == "send_email"]
    assert (row.id,) in pending, "handed to the critical lane after commit"

    down = MailServer()  # a port nobody listens on
    monkeypatch.setitem(app.config, "SMTP_URL", down.url)
    with app.app_context():
        for _attempt in range(2):
            with pytest.raises(mail.DeliveryFailed):
                mail.deliver(row.id, max_attempts=3)
        mail.deliver(row.id, max_attempts=3)  # the last attempt records the failure
        mail.deliver(row.id, max_attempts=3)  # and nothing happens after that
    [row] = emails_of(app, job_id)
    assert row.state == EmailState.FAILED and row.attempts == 3
    assert "ConnectionRefusedError" in row.error
    alice = login(app.test_client(), "alice@acme.test")
    page = alice.get(f"/exports/{job_id}").get_data(as_text=True)
    assert "state-succeeded" in page and f"/exports/{job_id}/download" in page
    assert alice.get(f"/exports/{job_id}/download").status_code == 200


def test_development_outbox_without_smtp(app, client, instance, monkeypatch):
    monkeypatch.setitem(app.config, "SMTP_URL", "")
    job_id = finished_job(app, "alice@acme.test", "orders")
    [row] = emails_of(app, job_id)
    with app.app_context():
        mail.deliver(row.id, max_attempts=1)
    eml = [p for p in (instance / "outbox").glob("*.eml") if f"-{row.id}.eml" in p.name]
    assert len(eml) == 1 and b"/d/" in eml[0].read_bytes()
    listing = client.get("/dev/outbox").get_data(as_text=True)
    assert row.subject in listing and eml[0].name in listing
    message = client.get(f"/dev/outbox/{eml[0].name}").get_data(as_text=True)
    assert "/d/" in message and 'href="http' in message
    assert client.get("/dev/outbox/..%2Fsecret_key").status_code == 404
    assert client.get("/dev/outbox/x", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code \
        == 404
    monkeypatch.setitem(app.config, "PRODUCTION", True)
    assert client.get("/dev/outbox").status_code == 404


def test_production_without_smtp_url_fails_with_the_reason(app, monkeypatch):
    monkeypatch.setitem(app.config, "SMTP_URL", "")
    monkeypatch.setitem(app.config, "PRODUCTION", True)
    job_id = finished_job(app, "alice@acme.test", "orders")
    [row] = emails_of(app, job_id)
    with app.app_context():
        mail.deliver(row.id, max_attempts=1)
    [row] = emails_of(app, job_id)
    assert row.state == EmailState.FAILED and "SMTP_URL is not set" in row.error


@pytest.mark.parametrize("url, expected", [
    ("smtp://mail.test", ("mail.test", 25, "plain", None, None, 10.0)),
    ("smtp+starttls://u%40x:p%2Fw@mail.test?timeout=3",
     ("mail.test", 587, "starttls", "u@x", "p/w", 3.0)),
    ("smtps://mail.test:2465", ("mail.test", 2465, "ssl", None, None, 10.0)),
])
def test_smtp_url_forms(url, expected):
    s = mail.SmtpSettings.from_url(url)
    assert (s.host, s.port, s.security, s.username, s.password, s.timeout) == expected


@pytest.mark.parametrize("url", ["http://mail.test", "smtp://", "mail.test:25"])
def test_bad_smtp_url_is_refused(url):
    with pytest.raises(ValueError):
        mail.SmtpSettings.from_url(url)


@pytest.mark.parametrize("scheme", ["smtp", "smtp+starttls", "smtps"])
def test_tls_and_authentication(app, tmp_path, monkeypatch, scheme):
    cert = self_signed_cert(tmp_path) if scheme != "smtp" else None
    if scheme != "smtp" and cert is None:
        pytest.skip("openssl is needed to make a test certificate")
    server = MailServer(scheme, user="mailer", password="s3cret pass", cert=cert).start()
    try:
        monkeypatch.setitem(app.config, "SMTP_URL", server.url)
        job_id = finished_job(app, "alice@acme.test", "orders")
        [row] = emails_of(app, job_id)
        with app.app_context():
            mail.deliver(row.id, max_attempts=1)
        assert server.mailbox.wait_for(for_job(job_id))["Message-ID"] == row.message_id

        wrong = MailServer(scheme, user="mailer", password="other", cert=cert).start()
        try:
            monkeypatch.setitem(app.config, "SMTP_URL", wrong.url.replace("other", "nope"))
            job_id = finished_job(app, "alice@acme.test", "orders")
            [row] = emails_of(app, job_id)
            with app.app_context():
                mail.deliver(row.id, max_attempts=1)
            [row] = emails_of(app, job_id)
            assert row.state == EmailState.FAILED and "Authentication" in row.error
            assert wrong.mailbox.messages == []
        finally:
            wrong.stop()
    finally:
        server.stop()


def test_reconciler_resends_emails_whose_hand_over_was_lost(app, sending, tmp_path,
                                                              monkeypatch):
    from jobs import tasks

    monkeypatch.setitem(app.config, "EXPORT_DIR", str(tmp_path))
    with app.app_context():
        lost = OutboundEmail(key="test:lost", kind="test", to_address="alice@acme.test",
                             subject="Lost in hand-over", text_body="hello", html_body="<p>hi",
                             message_id="<lost@exportdesk.test>")
        db.session.add(lost)
        db.session.flush()
        lost.created_at -= timedelta(minutes=10)
        db.session.commit()  # no after-commit hand-over: as if the broker had been down
        lost_id = lost.id
    with app.app_context():  # the task runs with the test's settings
        tasks.reconcile.call_local()
    assert sending.wait_for(lambda m: m["Subject"] == "Lost in hand-over")
    with app.app_context():
        assert db.session.get(OutboundEmail, lost_id).state == EmailState.SENT


def test_an_email_whose_worker_died_while_sending_is_sent_again(app, sending, tmp_path,
                                                                  monkeypatch):
    """Stuck in `sending` (its worker killed, or its commit cut by the database) for longer
    than the critical lane's hard timeout: retried, so it is sent at least once."""
    from jobs import tasks

    monkeypatch.setitem(app.config, "EXPORT_DIR", str(tmp_path))
    with app.app_context():
        stuck = OutboundEmail(key="test:stuck", kind="test", to_address="alice@acme.test",
                              subject="Stuck while sending", text_body="hello",
                              html_body="<p>hi", message_id="<stuck@exportdesk.test>",
                              state=EmailState.SENDING, attempts=1,
                              claimed_at=utcnow() - timedelta(seconds=5),
                              created_at=utcnow() - timedelta(minutes=10))
        db.session.add(stuck)
        db.session.commit()
        stuck_id = stuck.id
        tasks.reconcile.call_local()
        assert db.session.get(OutboundEmail, stuck_id).state == EmailState.SENDING, \
            "not before the hard timeout: it may still be sending"
        db.session.get(OutboundEmail, stuck_id).claimed_at -= timedelta(minutes=5)
        db.session.commit()
    with app.app_context():
        tasks.reconcile.call_local()
    assert sending.wait_for(lambda m: m["Subject"] == "Stuck while sending")
    with app.app_context():
        email = db.session.get(OutboundEmail, stuck_id)
        assert (email.state, email.attempts) == (EmailState.SENT, 2)


def test_a_sent_email_is_recorded_sent_also_when_the_database_drops_the_first_commit(
        app, sending, monkeypatch):
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import Connection

    from jobs import mail

    real_execute, calls = Connection.execute, []

    def drop_once(self, statement, *args, **kwargs):
        if not calls and "UPDATE outbound_emails" in str(statement) and "sent_at" in str(
                statement):
            calls.append(1)
            raise sa_exc.OperationalError("UPDATE", {}, Exception("connection reset"))
        return real_execute(self, statement, *args, **kwargs)

    monkeypatch.setattr(Connection, "execute", drop_once)
    with app.app_context():
        email = OutboundEmail(key="test:drop", kind="test", to_address="alice@acme.test",
                              subject="Dropped commit", text_body="hello", html_body="<p>hi",
                              message_id="<drop@exportdesk.test>")
        db.session.add(email)
        db.session.commit()
        mail.deliver(email.id, 4)
        assert calls and db.session.get(OutboundEmail, email.id).state == EmailState.SENT
    assert len([m for m in sending.messages if m["Subject"] == "Dropped commit"]) == 1


def test_no_ready_email_for_an_empty_file_the_page_still_offers_it(app, alice, sending):
    """0 rows: nothing worth an email (the job page still has the file); 1 row or more: one."""
    empty = run_inline(app, "alice@acme.test", "transactions",
                       {"date_from": "2099-01-01"})
    assert empty.state == "succeeded" and empty.rows_done == 0
    assert emails_of(app, empty.id) == []
    page = alice.get(f"/exports/{empty.id}").get_data(as_text=True)
    assert f'href="/exports/{empty.id}/download"' in page and "0 rows" in page
    assert alice.get(f"/exports/{empty.id}/download").status_code == 200
    full = run_inline(app, "alice@acme.test", "transactions", {"date_to": "2099-01-01"})
    assert full.rows_done > 0
    assert [e.kind for e in emails_of(app, full.id)] == ["download-link"]
