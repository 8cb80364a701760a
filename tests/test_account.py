"""/account and the server-side sessions behind it: a password change ends every other session,
personal API tokens are shown once and revoked at once, logout and login end and rotate the
session on the server, and no other cookie stands in for a login."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from conftest import csrf_from, login
from flask_login.utils import encode_cookie
from sqlalchemy import func, select

from jobs import tasks
from jobs.models import ApiToken, UserSession, db, prune_sessions, utcnow
from webapp.auth import SESSION_ID, create_token, find_user


@pytest.fixture
def app(fresh):
    return fresh.app


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def logged_in(client) -> bool:
    """Whether the client's session is a login: a page behind login answers, no redirect."""
    response = client.get("/exports")
    assert response.status_code in (200, 302), response.status_code
    return response.status_code == 200


def post_form(client, path: str, data: dict, page: str = "/account", **kwargs):
    """POST `data` with the CSRF token of `page`, as the browser would."""
    token = csrf_from(client.get(page).get_data(as_text=True))
    return client.post(path, data={**data, "csrf_token": token}, **kwargs)


def cookie(client) -> str:
    return client.get_cookie("session").value


def with_cookie(app, value: str):
    """A new client holding a copy of a session cookie, as a thief would."""
    client = app.test_client()
    client.set_cookie("session", value)
    return client


def session_id(app, value: str) -> str | None:
    return app.session_interface.get_signing_serializer(app).loads(value).get(SESSION_ID)


def open_sessions(app, email: str) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(UserSession).where(
            UserSession.user_id == find_user(email).id, UserSession.ended_at.is_(None)))


# The page


def test_the_page_shows_who_you_are_and_needs_a_login(app):
    anonymous = app.test_client().get("/account")
    assert anonymous.status_code == 302 and "/login?next=/account" in anonymous.location
    alice = login(app.test_client(), "alice@acme.test")
    page = alice.get("/account")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and page.headers["Cache-Control"] == "private, no-store"
    assert re.search(r'id="account-email">alice@acme.test<', html)
    assert re.search(r'id="account-org">Acme<', html)
    assert re.search(r'id="account-role">user\b', html)
    assert 'href="/account" aria-current="page">Account</a>' in html
    assert "No tokens yet." in html
    assert 'href="/account"' in alice.get("/exports").get_data(as_text=True), "in the nav"


def test_an_api_token_cannot_use_the_account_page(app):
    with app.app_context():
        token = create_token(find_user("alice@acme.test"), "script")
    client = app.test_client()
    assert client.get("/account", headers=bearer(token)).status_code == 403
    made = client.post("/account/tokens", data={"name": "more"}, headers=bearer(token))
    assert made.status_code == 403


# Password change


def change_password(client, current: str, new: str, confirm: str | None = None):
    return post_form(client, "/account/password", {
        "current_password": current, "password": new,
        "confirm": new if confirm is None else confirm})


def test_a_wrong_current_password_is_refused(app):
    alice = login(app.test_client(), "alice@acme.test")
    response = change_password(alice, "not my password", "a new secret")
    assert response.status_code == 400
    assert "Current password is not your password." in response.get_data(as_text=True)
    assert 'aria-invalid="true"' in response.get_data(as_text=True)
    login(app.test_client(), "alice@acme.test", "exportdesk")  # unchanged
    assert logged_in(alice)


@pytest.mark.parametrize("new, confirm, says", [
    ("short", None, "New password must be 8 to 200 characters"),
    ("long enough", "different", "Repeat it must match the new password"),
    ("x" * 201, None, "New password must be 8 to 200 characters"),
])
def test_the_new_password_follows_the_reset_forms_rules(app, new, confirm, says):
    alice = login(app.test_client(), "alice@acme.test")
    response = change_password(alice, "exportdesk", new, confirm)
    assert response.status_code == 400 and says in response.get_data(as_text=True)
    login(app.test_client(), "alice@acme.test", "exportdesk")


def test_a_password_change_ends_every_other_session_and_keeps_this_one(app):
    here = login(app.test_client(), "alice@acme.test")
    elsewhere = login(app.test_client(), "alice@acme.test")
    bob = login(app.test_client(), "bob@globex.test")
    assert open_sessions(app, "alice@acme.test") == 2

    done = change_password(here, "exportdesk", "a new secret")
    assert done.status_code == 303 and done.location == "/account"
    assert "Everywhere else you were logged in, you are now logged out." in \
        here.get("/account").get_data(as_text=True)
    assert logged_in(here), "the session that changed it stays"
    assert not logged_in(elsewhere), "the other one ends on its next request"
    assert logged_in(bob), "other people's sessions are not touched"
    assert open_sessions(app, "alice@acme.test") == 1
    login(app.test_client(), "alice@acme.test", "a new secret")
    refused = post_form(app.test_client(), "/login", {
        "email": "alice@acme.test", "password": "exportdesk"}, page="/login")
    assert refused.status_code == 400


def test_changing_the_password_needs_the_csrf_token(app):
    alice = login(app.test_client(), "alice@acme.test")
    response = alice.post("/account/password", data={
        "current_password": "exportdesk", "password": "a new secret", "confirm": "a new secret"})
    assert response.status_code == 400
    login(app.test_client(), "alice@acme.test", "exportdesk")


# API tokens


def create(client, name: str):
    return post_form(client, "/account/tokens", {"name": name})


def new_token(response) -> str:
    match = re.search(r'id="new-token" type="text" readonly value="([^"]+)"',
                      response.get_data(as_text=True))
    assert match, response.get_data(as_text=True)
    return match.group(1)


def token_id(app, token: str) -> int:
    with app.app_context():
        return db.session.scalar(select(ApiToken.id).where(
            ApiToken.token_hash == ApiToken.hash(token)))


def test_a_new_token_is_shown_once_stored_hashed_and_works_as_bearer(app):
    alice = login(app.test_client(), "alice@acme.test")
    response = create(alice, "  nightly report  ")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "private, no-store"
    token = new_token(response)
    html = response.get_data(as_text=True)
    assert "Copy it now: it will not be shown again." in html
    assert "Your new token “nightly report”" in html
    with app.app_context():
        [row] = db.session.scalars(select(ApiToken).where(
            ApiToken.user_id == find_user("alice@acme.test").id)).all()
        assert row.name == "nightly report"
        assert row.token_hash == ApiToken.hash(token) and token not in row.token_hash

    page = alice.get("/account").get_data(as_text=True)
    assert token not in page and 'id="new-token"' not in page, "shown once"
    row_html = re.search(rf'<tr id="token-{row.id}">.*?</tr>', page, re.S).group(0)
    assert "nightly report" in row_html
    assert re.search(r'class="last-used">never<', row_html)

    api = app.test_client()
    assert api.get("/api/jobs", headers=bearer(token)).status_code == 200
    page = alice.get("/account").get_data(as_text=True)
    row_html = re.search(rf'<tr id="token-{row.id}">.*?</tr>', page, re.S).group(0)
    assert re.search(r'class="last-used"><time datetime="[\d\-T:]+Z" '
                     r'title="\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC">just now</time><',
                     row_html), row_html


@pytest.mark.parametrize("name, says", [
    ("", "Give the token a name"),
    ("   ", "Give the token a name"),
    ("x" * 101, "A name is at most 100 characters."),
])
def test_a_token_needs_a_short_name(app, name, says):
    alice = login(app.test_client(), "alice@acme.test")
    response = create(alice, name)
    assert response.status_code == 400 and says in response.get_data(as_text=True)
    assert 'id="new-token"' not in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(ApiToken)) == 0
    assert create(alice, "y" * 100).status_code == 200, "100 characters are fine"


def test_creating_a_token_needs_the_csrf_token(app):
    alice = login(app.test_client(), "alice@acme.test")
    assert alice.post("/account/tokens", data={"name": "x"}).status_code == 400
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(ApiToken)) == 0


def test_revoke_stops_the_token_on_its_next_request(app):
    alice = login(app.test_client(), "alice@acme.test")
    token = new_token(create(alice, "old script"))
    ident = token_id(app, token)
    api = app.test_client()
    assert api.get("/api/jobs", headers=bearer(token)).status_code == 200

    confirm = alice.get(f"/account/tokens/{ident}/revoke")  # the page without JavaScript
    assert confirm.status_code == 200
    assert "Revoke the token “old script”?" in confirm.get_data(as_text=True)
    assert alice.post(f"/account/tokens/{ident}/revoke").status_code == 400, "no CSRF token"
    assert api.get("/api/jobs", headers=bearer(token)).status_code == 200

    done = post_form(alice, f"/account/tokens/{ident}/revoke", {},
                     page=f"/account/tokens/{ident}/revoke")
    assert done.status_code == 303 and done.location == "/account#tokens"
    assert api.get("/api/jobs", headers=bearer(token)).status_code == 401
    page = alice.get("/account").get_data(as_text=True)
    assert "Token “old script” revoked: it no longer works." in page
    assert f'id="token-{ident}"' not in page
    assert alice.get(f"/account/tokens/{ident}/revoke").status_code == 404


def test_revoke_with_htmx_answers_the_token_list(app):
    alice = login(app.test_client(), "alice@acme.test")
    keep, drop = (new_token(create(alice, name)) for name in ("keep", "drop"))
    page = alice.get("/account").get_data(as_text=True)
    ident = token_id(app, drop)
    assert f'hx-post="/account/tokens/{ident}/revoke"' in page
    assert 'hx-confirm="Revoke the token “drop”? Scripts using it stop working at once."' in page
    response = alice.post(f"/account/tokens/{ident}/revoke", headers={
        "HX-Request": "true", "X-CSRFToken": csrf_from(page)})
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and "HX-Request" in response.headers["Vary"]
    assert html.lstrip().startswith('<section class="card tokens" id="tokens"')
    assert "Token “drop” revoked" in html and f'id="token-{token_id(app, keep)}"' in html
    assert f'id="token-{ident}"' not in html
    api = app.test_client()
    assert api.get("/api/jobs", headers=bearer(drop)).status_code == 401
    assert api.get("/api/jobs", headers=bearer(keep)).status_code == 200


def test_someone_elses_token_is_not_found(app):
    alice = login(app.test_client(), "alice@acme.test")
    bob = login(app.test_client(), "bob@globex.test")
    bobs = new_token(create(bob, "bob's script"))
    ident = token_id(app, bobs)
    assert alice.get(f"/account/tokens/{ident}/revoke").status_code == 404
    response = post_form(alice, f"/account/tokens/{ident}/revoke", {})
    assert response.status_code == 404
    assert "bob&#39;s script" not in response.get_data(as_text=True)
    for nobody in ("99999", str(2**31), str(2**70)):  # ids no database holds: 404, not 500
        assert post_form(alice, f"/account/tokens/{nobody}/revoke", {}).status_code == 404
        assert alice.get(f"/account/tokens/{nobody}/revoke").status_code == 404
    assert post_form(alice, "/account/tokens/x/revoke", {}).status_code == 404
    assert "bob&#39;s script" not in alice.get("/account").get_data(as_text=True)
    assert app.test_client().get("/api/jobs", headers=bearer(bobs)).status_code == 200


# Sessions on the server


def test_logout_ends_the_session_on_the_server(app):
    alice = login(app.test_client(), "alice@acme.test")
    copy = cookie(alice)
    assert logged_in(with_cookie(app, copy)), "a copy works while the session is open"
    assert post_form(alice, "/logout", {}, page="/exports").status_code == 302
    assert not logged_in(alice)
    assert not logged_in(with_cookie(app, copy)), "a copy taken before logout is refused"
    assert open_sessions(app, "alice@acme.test") == 0


def test_login_rotates_the_session(app):
    client = app.test_client()
    client.get("/login")
    before = cookie(client)
    assert session_id(app, before) is None
    login(client, "alice@acme.test")
    first = cookie(client)
    assert first != before and session_id(app, first)
    assert not logged_in(with_cookie(app, before)), "the pre-login cookie never logs in"

    login(client, "bob@globex.test")  # logging in again: a new id, the old one ends
    second = cookie(client)
    assert session_id(app, second) != session_id(app, first)
    assert not logged_in(with_cookie(app, first)), "an old session id does not authenticate"
    assert logged_in(client) and open_sessions(app, "alice@acme.test") == 0


def test_a_session_id_of_no_open_session_is_nobody(app):
    """A cookie signed with our key but naming an id we never issued (or another user's)."""
    alice = login(app.test_client(), "alice@acme.test")
    serializer = app.session_interface.get_signing_serializer(app)
    data = serializer.loads(cookie(alice))
    assert not logged_in(with_cookie(app, serializer.dumps({**data, SESSION_ID: "made-up"})))
    with app.app_context():
        bob_id = str(find_user("bob@globex.test").id)
    assert not logged_in(with_cookie(app, serializer.dumps({**data, "_user_id": bob_id})))
    assert logged_in(with_cookie(app, serializer.dumps(data)))


def test_a_remember_me_cookie_is_not_a_login(app):
    """Flask-Login reads a "remember me" cookie when the session has no user; we never set
    one, and one made with our key still names no open session."""
    with app.test_request_context():
        remember = encode_cookie(str(find_user("alice@acme.test").id))
    client = app.test_client()
    client.set_cookie("remember_token", remember)
    assert not logged_in(client)
    alice = login(app.test_client(), "alice@acme.test")
    assert "remember_token" not in str(alice.get("/exports").headers.getlist("Set-Cookie"))


def test_a_login_ends_after_session_max_age_however_active(app):
    client = login(app.test_client(), "alice@acme.test")
    assert logged_in(client)
    with app.app_context():
        row = db.session.scalar(select(UserSession).where(UserSession.ended_at.is_(None))
                                .order_by(UserSession.id.desc()))
        row.created_at -= app.config["SESSION_MAX_AGE"] + timedelta(seconds=1)
        db.session.commit()
    assert not logged_in(client), "older than SESSION_MAX_AGE: log in again"
    assert logged_in(login(client, "alice@acme.test"))


def test_housekeeping_prunes_ended_and_outlived_sessions(app):
    keep = login(app.test_client(), "alice@acme.test")
    ended = login(app.test_client(), "bob@globex.test")
    ended.post("/logout", data={"csrf_token": csrf_from(ended.get("/exports").text)})
    now = utcnow()

    def outlived_session():
        db.session.add(UserSession(user=find_user("alice@acme.test"), token_hash="0" * 64,
                                   created_at=now - app.config["SESSION_MAX_AGE"]
                                   - timedelta(seconds=1)))
        db.session.commit()

    def sessions() -> int:
        return db.session.scalar(select(func.count()).select_from(UserSession))

    with app.app_context():
        outlived_session()
        assert prune_sessions(now) == 2  # bob's ended one, the outlived one
        assert sessions() == 1
        outlived_session()
        tasks.housekeeping.call_local()
        assert sessions() == 1, "the 10-minute housekeeping prunes them too"
    assert logged_in(keep), "an open session stays"
