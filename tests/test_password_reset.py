"""Password reset by email: end to end against a real SMTP server, single use, no address leak."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from conftest import csrf_from, login
from mailserver import links_in
from sqlalchemy import delete, func, select

from jobs.models import OutboundEmail, User, db
from webapp.auth import find_user


@pytest.fixture
def carol(app):
    """A user of our own, so changing the password cannot disturb other tests; the reset
    emails of earlier tests are forgotten, so the once-a-minute limit starts afresh."""
    with app.app_context():
        mine = OutboundEmail.to_address == "carol@acme.test"
        db.session.execute(delete(OutboundEmail).where(mine))
        user = find_user("carol@acme.test")
        if user is None:
            user = User(email="carol@acme.test", org_id=find_user("alice@acme.test").org_id)
            db.session.add(user)
        user.set_password("exportdesk")
        db.session.commit()
    return "carol@acme.test"


def request_reset(client, email: str):
    page = client.get("/password-reset").get_data(as_text=True)
    return client.post("/password-reset", data={"email": email, "csrf_token": csrf_from(page)})


def reset_emails(app, address: str) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(OutboundEmail).where(
            OutboundEmail.kind == "password-reset", OutboundEmail.to_address == address))


def reset_path(message) -> str:
    [link] = [link for link in links_in(message) if "/password-reset/" in link]
    assert link.startswith("http://127.0.0.1:5000/"), "BASE_URL, never the Host header"
    return urlsplit(link).path


def test_reset_end_to_end_and_the_token_works_once(app, client, sending, carol):
    elsewhere = login(app.test_client(), carol)  # e.g. whoever learnt the old password
    assert 'href="/password-reset"' in client.get("/login").get_data(as_text=True)
    response = request_reset(client, "  Carol@Acme.test ")
    assert response.status_code == 200
    message = sending.wait_for(lambda m: m["To"] == carol)
    assert message["Subject"] == "Reset your exportdesk password"
    path = reset_path(message)

    form = client.get(path)
    assert form.status_code == 200 and form.headers["Referrer-Policy"] == "no-referrer"
    token = csrf_from(form.get_data(as_text=True))
    response = client.post(path, data={"password": "a new secret", "confirm": "a new secret",
                                       "csrf_token": token})
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert "Your password was changed" in client.get("/login").get_data(as_text=True)
    assert elsewhere.get("/exports").status_code == 302, "the reset ends every session"
    login(app.test_client(), carol, "a new secret")
    fresh = app.test_client()
    page = fresh.get("/login").get_data(as_text=True)
    refused = fresh.post("/login", data={"email": carol, "password": "exportdesk",
                                         "csrf_token": csrf_from(page)})
    assert refused.status_code == 400

    again = client.get(path)
    assert again.status_code == 400 and "cannot be used" in again.get_data(as_text=True)
    response = client.post(path, data={"password": "hijacked!", "confirm": "hijacked!",
                                       "csrf_token": token})
    assert response.status_code == 400
    login(app.test_client(), carol, "a new secret")


def test_the_answer_never_reveals_whether_an_address_exists(app, client, sending, carol):
    known = request_reset(client, carol)
    unknown = request_reset(client, "nobody@nowhere.test")

    def strip(html: str) -> str:  # form values and the CSRF token (signed with a timestamp)
        return re.sub(r'value="[^"]+"|"X-CSRFToken": "[^"]+"', "", html)

    assert known.status_code == unknown.status_code == 200
    assert strip(known.get_data(as_text=True)) == strip(unknown.get_data(as_text=True))
    assert reset_emails(app, "nobody@nowhere.test") == 0
    assert reset_emails(app, carol) >= 1


def test_repeated_requests_in_a_minute_send_one_email(app, client, sending, carol):
    before = reset_emails(app, carol)
    for _ in range(3):
        assert request_reset(client, carol).status_code == 200
    assert reset_emails(app, carol) - before <= 1  # <= : the minute may roll over once


def test_expired_and_tampered_reset_tokens(app, client, sending, carol, monkeypatch):
    request_reset(client, carol)
    path = reset_path(sending.wait_for(lambda m: m["To"] == carol))
    assert client.get(path[:-4]).status_code == 400
    assert client.get("/password-reset/x").status_code == 400
    monkeypatch.setitem(app.config, "PASSWORD_RESET_TTL", timedelta(seconds=-1))
    response = client.get(path)
    assert response.status_code == 410 and "expired" in response.get_data(as_text=True)


def test_a_download_token_is_not_a_reset_token(app, client):
    from jobs.models import ExportJob
    from webapp.tokens import download_token

    with app.app_context():
        job = db.session.scalars(select(ExportJob)).first() or ExportJob(id=1, user_id=1)
        assert client.get(f"/password-reset/{download_token(job)}").status_code == 400


@pytest.mark.parametrize("fields, message", [
    ({"password": "short", "confirm": "short"}, "8 to 200 characters"),
    ({"password": "long enough", "confirm": "different!"}, "must match"),
    ({"password": "", "confirm": ""}, "This field is required"),
])
def test_bad_new_password_is_400_with_a_message(app, client, sending, carol, fields, message):
    request_reset(client, carol)
    path = reset_path(sending.wait_for(lambda m: m["To"] == carol))
    token = csrf_from(client.get(path).get_data(as_text=True))
    response = client.post(path, data={**fields, "csrf_token": token})
    assert response.status_code == 400 and message in response.get_data(as_text=True)
    login(app.test_client(), carol, "exportdesk")


def test_reset_request_needs_csrf_and_an_address(client):
    assert client.post("/password-reset", data={"email": "a@b.test"}).status_code == 400
    page = client.get("/password-reset").get_data(as_text=True)
    response = client.post("/password-reset", data={"email": "", "csrf_token": csrf_from(page)})
    assert response.status_code == 400 and "Enter the email" in response.get_data(as_text=True)
