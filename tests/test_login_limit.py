"""The limit on guessing passwords: failed logins per account (the email as typed) and per
client address, counted in the database, so two web processes share one count."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import requests
from conftest import ROOT, csrf_from, free_port, query, wait_for
from sqlalchemy import func, insert, select

from jobs.models import LoginFailure, db, utcnow

WRONG = "Wrong email or password."
TOO_MANY = "Too many failed logins; try again in"


@pytest.fixture
def app(fresh):
    return fresh.app


def client_from(app, address: str):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def attempt(client, email: str, password: str = "wrong password"):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"email": email, "password": password,
                                       "csrf_token": token})


def says(response) -> str:
    """The message the login page flashed."""
    match = re.search(r'<p class="flash error" role="alert">([^<]*)</p>',
                      response.get_data(as_text=True))
    return match.group(1) if match else ""


def fail_times(app, email: str, times: int, address: str | None = None) -> None:
    """`times` wrong passwords for `email`: from `address`, or each from an address of its own
    (so that only the account's count grows)."""
    for n in range(times):
        client = client_from(app, address or f"192.0.2.{n + 1}")
        response = attempt(client, email)
        assert response.status_code == 400 and says(response) == WRONG, says(response)


def failures(app, **where) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(LoginFailure).filter_by(
            **where))


def test_the_limit_per_account_refuses_even_the_right_password(app):
    fail_times(app, "alice@acme.test", 10)
    assert failures(app, email="alice@acme.test") == 10
    refused = attempt(client_from(app, "198.51.100.1"), "Alice@Acme.test", "exportdesk")
    assert refused.status_code == 429
    assert says(refused) == "Too many failed logins; try again in 15 minutes."
    assert 840 < int(refused.headers["Retry-After"]) <= 900
    assert failures(app, email="alice@acme.test") == 10, "a refused try is not counted"
    assert attempt(client_from(app, "198.51.100.1"), "bob@globex.test",
                   "exportdesk").status_code == 302, "other accounts log in"


def test_an_unknown_email_gets_the_same_answers(app):
    """Nothing says whether an account exists: the same failure, then the same refusal."""
    fail_times(app, "alice@acme.test", 10)
    fail_times(app, "nobody@acme.test", 10)
    known = attempt(client_from(app, "198.51.100.1"), "alice@acme.test", "exportdesk")
    unknown = attempt(client_from(app, "198.51.100.2"), "nobody@acme.test", "exportdesk")

    def page(response) -> str:  # the typed email and the CSRF token differ, nothing else
        html = response.get_data(as_text=True)
        return re.sub(r'value="[^"]*"|"X-CSRFToken": "[^"]+"', "", html)

    assert known.status_code == unknown.status_code == 429
    assert says(known) == says(unknown) and says(known).startswith(TOO_MANY)
    assert page(known) == page(unknown)
    waits = [int(r.headers["Retry-After"]) for r in (known, unknown)]
    assert abs(waits[0] - waits[1]) <= 5, waits  # the same rule; only the clock moved


def test_a_successful_login_clears_the_accounts_failures_not_the_addresss(app):
    fail_times(app, "alice@acme.test", 9)
    assert attempt(client_from(app, "198.51.100.1"), "alice@acme.test",
                   "exportdesk").status_code == 302
    assert failures(app, email="alice@acme.test") == 0, "its owner got in"
    fail_times(app, "alice@acme.test", 9)  # so nine more mistakes are allowed again

    # An attacker's own account does not reset their address's count.
    for n in range(9):
        assert attempt(client_from(app, "203.0.113.9"), f"guess{n}@acme.test").status_code == 400
    assert attempt(client_from(app, "203.0.113.9"), "bob@globex.test",
                   "exportdesk").status_code == 302
    assert failures(app, address="203.0.113.9") == 9
    assert attempt(client_from(app, "203.0.113.9"), "guess9@acme.test").status_code == 400
    refused = attempt(client_from(app, "203.0.113.9"), "bob@globex.test", "exportdesk")
    assert refused.status_code == 429 and says(refused).startswith(TOO_MANY)


def test_the_limit_per_address_across_many_emails(app):
    for n in range(10):
        response = attempt(client_from(app, "203.0.113.7"), f"guess{n}@acme.test")
        assert response.status_code == 400 and says(response) == WRONG
    refused = attempt(client_from(app, "203.0.113.7"), "alice@acme.test", "exportdesk")
    assert refused.status_code == 429 and says(refused).startswith(TOO_MANY)
    assert attempt(client_from(app, "203.0.113.8"), "alice@acme.test",
                   "exportdesk").status_code == 302, "another address logs in"


def test_an_overlong_email_is_an_ordinary_failure(app):
    response = attempt(client_from(app, "198.51.100.4"), "x" * 1000 + "@acme.test")
    assert response.status_code == 400 and says(response) == WRONG
    assert failures(app, address="198.51.100.4") == 1


def add_failures(app, email: str, ago: timedelta, count: int) -> None:
    with app.app_context():
        at = utcnow() - ago
        db.session.execute(insert(LoginFailure), [
            {"at": at, "email": email, "address": f"192.0.2.{n}"} for n in range(count)])
        db.session.commit()


def test_failures_older_than_the_window_do_not_count_and_are_pruned(app):
    add_failures(app, "alice@acme.test", timedelta(minutes=16), 10)
    assert attempt(client_from(app, "198.51.100.1"), "alice@acme.test",
                   "exportdesk").status_code == 302

    add_failures(app, "bob@globex.test", timedelta(minutes=16), 10)
    add_failures(app, "bob@globex.test", timedelta(minutes=14, seconds=30), 10)
    refused = attempt(client_from(app, "198.51.100.1"), "bob@globex.test", "exportdesk")
    assert refused.status_code == 429
    assert says(refused) == "Too many failed logins; try again in 1 minute."

    assert attempt(client_from(app, "198.51.100.3"), "carol@acme.test").status_code == 400
    with app.app_context():  # that failure's write deleted the rows the window had left
        old = utcnow() - timedelta(minutes=15)
        assert db.session.scalar(select(func.count()).select_from(LoginFailure).where(
            LoginFailure.at < old)) == 0
    assert failures(app, email="bob@globex.test") == 10


def test_the_window_and_limit_are_settings(app, monkeypatch):
    monkeypatch.setitem(app.config, "LOGIN_FAILURE_LIMIT", 3)
    monkeypatch.setitem(app.config, "LOGIN_FAILURE_WINDOW", timedelta(seconds=2))
    fail_times(app, "alice@acme.test", 3)
    assert attempt(client_from(app, "198.51.100.1"), "alice@acme.test",
                   "exportdesk").status_code == 429
    wait_for(lambda: attempt(client_from(app, "198.51.100.1"), "alice@acme.test",
                             "exportdesk").status_code == 302,
             timeout=60, what="the failures to leave the 2-second window", every=0.5)


# Two web processes, one count


@pytest.fixture
def two_servers(fresh, tmp_path):
    """Two `flask run` processes on one database (the fresh one), each on a port of its own;
    LOGIN_FAILURE_LIMIT=4 from the environment."""
    procs, urls = [], []
    for n in range(2):
        port = free_port()
        log = tmp_path / f"web{n}.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flask", "run", "--port", str(port), "--no-reload"],
            cwd=ROOT, env={**fresh.env, "LOGIN_FAILURE_LIMIT": "4", "PYTHONUNBUFFERED": "1"},
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")

    def up(url: str, proc: subprocess.Popen, log) -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return requests.get(f"{url}/login", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        for n, (url, proc) in enumerate(zip(urls, procs, strict=True)):
            wait_for(lambda url=url, proc=proc, n=n: up(url, proc, tmp_path / f"web{n}.log"),
                     timeout=120, what=f"web server {n} to answer", every=0.2)
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def web_attempt(url: str, email: str, password: str) -> requests.Response:
    session = requests.Session()
    token = csrf_from(session.get(f"{url}/login", timeout=30).text)
    return session.post(f"{url}/login", data={"email": email, "password": password,
                                              "csrf_token": token},
                        allow_redirects=False, timeout=30)


def test_the_limit_holds_across_two_web_processes(fresh, two_servers):
    first, second = two_servers
    for n in range(4):  # alternate: each process sees only half of them itself
        response = web_attempt(two_servers[n % 2], "alice@acme.test", "wrong password")
        assert response.status_code == 400 and WRONG in response.text, response.text
    for url in (first, second):
        refused = web_attempt(url, "alice@acme.test", "exportdesk")
        assert refused.status_code == 429, refused.text
        assert TOO_MANY in refused.text
    [[count]] = query(fresh.database_url,
                      "select count(*) from login_failures where email = 'alice@acme.test'")
    assert count == 4
    # The four came from one address (127.0.0.1) too: its count is shared the same way.
    assert web_attempt(second, "bob@globex.test", "exportdesk").status_code == 429


@pytest.mark.parametrize("hops, counted", [(0, "127.0.0.1"), (1, "203.0.113.9")])
def test_behind_a_proxy_the_address_is_the_forwarded_one_only_when_told(fresh, hops, counted):
    """PROXY_HOPS=1: the proxy's X-Forwarded-For names the client, so people behind one proxy
    do not share one count; PROXY_HOPS=0 (the default): anyone could send that header, so it
    is ignored."""
    from conftest import APP_CONFIG

    from webapp import create_app

    app = create_app({**APP_CONFIG, "PROXY_HOPS": hops})
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = "127.0.0.1"  # the proxy
    token = csrf_from(client.get("/login").get_data(as_text=True))
    response = client.post("/login", headers={"X-Forwarded-For": "203.0.113.9"},
                           data={"email": "alice@acme.test", "password": "wrong password",
                                 "csrf_token": token})
    assert response.status_code == 400
    assert failures(app, address=counted) == 1
