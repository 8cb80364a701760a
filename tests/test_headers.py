"""The headers every answer carries (webapp.headers): the security headers, `private,
no-store` on everything but the public static files, no-referrer where a URL or page holds a
token, HSTS in production only; and one `Date` header under `flask dev`."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from conftest import ROOT, csrf_from, wait_for
from test_digests import download_url, published

from jobs.models import db
from webapp.auth import find_user
from webapp.tokens import reset_token

SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
CSP_DIRECTIVES = {"default-src 'self'", "object-src 'none'", "base-uri 'none'",
                  "form-action 'self'", "frame-ancestors 'none'"}


def assert_secure(response, referrer: str = "strict-origin-when-cross-origin") -> None:
    headers = response.headers
    for name, value in SECURITY.items():
        assert headers[name] == value, name
    csp = {part.strip() for part in headers["Content-Security-Policy"].split(";")}
    assert csp == CSP_DIRECTIVES
    assert headers["Referrer-Policy"] == referrer
    assert "Strict-Transport-Security" not in headers, "development: no HSTS"


def assert_private(response) -> None:
    assert_secure(response)
    assert response.headers["Cache-Control"] == "private, no-store"


def test_a_page_a_fragment_and_the_api_are_private(app, alice):
    page = alice.get("/exports")
    assert page.status_code == 200 and "<html" in page.get_data(as_text=True)
    assert_private(page)
    fragment = alice.get("/exports", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.get_data(as_text=True)
    assert_private(fragment)
    assert_private(alice.get("/api/jobs"))
    assert_private(alice.get("/"))


@pytest.mark.parametrize("route", ["page", "link"])
def test_a_file_download_is_private(app, alice, route):
    job = published(app)
    response = alice.get(download_url(app, job, route))
    assert response.status_code == 200
    assert_secure(response, "no-referrer" if route == "link" else
                  "strict-origin-when-cross-origin")
    assert response.headers["Cache-Control"] == "private, no-store"


def test_an_error_page_and_the_login_page_carry_them_too(client, alice):
    for response in (client.get("/no/such/page"), alice.get("/exports/987654321"),
                     alice.get("/api/jobs/987654321"), client.get("/login")):
        assert response.status_code in (200, 404), response.request.path
        assert_private(response)


def test_a_static_file_keeps_its_normal_caching(client):
    response = client.get("/static/exportdesk.css")
    assert response.status_code == 200
    assert_secure(response)
    assert "no-store" not in response.headers.get("Cache-Control", "")
    assert "private" not in response.headers.get("Cache-Control", "")
    assert response.headers["ETag"] and response.headers["Last-Modified"]
    again = client.get("/static/exportdesk.css",
                       headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


def test_hsts_only_in_production(app, client, monkeypatch):
    assert "Strict-Transport-Security" not in client.get("/login").headers
    monkeypatch.setitem(app.config, "PRODUCTION", True)
    for path in ("/login", "/static/exportdesk.css", "/no/such/page"):
        hsts = client.get(path).headers["Strict-Transport-Security"]
        assert hsts == "max-age=31536000; includeSubDomains"


def test_pages_holding_a_token_send_no_referrer(app, client, alice):
    with app.app_context():
        reset = reset_token(find_user("alice@acme.test"))
        db.session.rollback()
    form = client.get(f"/password-reset/{reset}")
    assert form.status_code == 200
    assert_secure(form, "no-referrer")
    invalid = client.get("/invitation/not-a-real-token")  # still a token in the URL
    assert invalid.status_code == 400
    assert_secure(invalid, "no-referrer")

    job = published(app)
    link = client.get(download_url(app, job, "link"))
    assert link.status_code == 200
    assert_secure(link, "no-referrer")

    account = alice.get("/account")
    token = alice.post("/account/tokens", data={
        "name": "headers test", "csrf_token": csrf_from(account.get_data(as_text=True))})
    assert token.status_code == 200 and "xd_" in token.get_data(as_text=True)
    assert_secure(token, "no-referrer")
    assert token.headers["Cache-Control"] == "private, no-store"


# One Date header under `flask dev`: the development server sends its own, so the app must not
# add one (werkzeug's make_conditional does, for downloads and static files).


def _request(url: str, method: str, path: str, headers: dict | None = None,
             body: str | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a connection of its own: the raw headers as the server sent them."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


@pytest.mark.integration
def test_one_date_header_under_flask_dev(stack_factory):
    stack = stack_factory(rows=200)
    made = subprocess.run([sys.executable, "-m", "flask", "token", "create", "alice@acme.test"],
                          cwd=ROOT, env=stack.env, capture_output=True, text=True, check=True)
    auth = {"Authorization": f"Bearer {made.stdout.strip().splitlines()[-1]}"}
    answer, body = _request(stack.url, "POST", "/api/exports",
                            {**auth, "Content-Type": "application/json"},
                            json.dumps({"dataset": "orders", "format": "csv"}))
    assert answer.status in (200, 201, 202), body
    job = json.loads(body)

    def finished():
        state = json.loads(_request(stack.url, "GET", f"/api/jobs/{job['id']}", auth)[1])
        return state if state["state"] == "succeeded" else None

    done = wait_for(finished, timeout=60, what="the export", every=0.2)
    path = urlsplit(done["download_url"]).path
    for response, _ in (_request(stack.url, "GET", path, auth),
                        _request(stack.url, "GET", path, {**auth, "Range": "bytes=0-9"}),
                        _request(stack.url, "HEAD", path, auth),
                        _request(stack.url, "GET", "/static/exportdesk.css"),
                        _request(stack.url, "GET", "/login")):
        assert response.status in (200, 206)
        assert len(response.msg.get_all("Date")) == 1, response.msg.get_all("Date")
        assert response.getheader("Content-Security-Policy")
