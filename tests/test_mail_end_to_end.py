"""Emails through the real stack (`flask dev`: web + a consumer per lane) and a real SMTP server."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import requests
from conftest import csrf_from, free_port, query, wait_for
from mailserver import MailServer, links_in, text_of
from test_end_to_end import browser_login

pytestmark = pytest.mark.integration


@pytest.fixture
def smtp():
    server = MailServer().start()
    yield server
    server.stop()


def export(web: requests.Session, url: str, dataset: str = "transactions",
           date_to: str = "") -> int:
    token = csrf_from(web.get(f"{url}/").text)
    response = web.post(f"{url}/exports", allow_redirects=False, data={
        "dataset": dataset, "format": "csv", "csrf_token": token, "date_to": date_to})
    assert response.status_code == 303
    return int(response.headers["Location"].rsplit("/", 1)[1])


def state(web: requests.Session, url: str, job_id: int) -> str:
    return web.get(f"{url}/api/jobs/{job_id}").json()["state"]




def test_reset_email_overtakes_busy_exports_and_every_link_works(stack_factory, smtp):
    stack = stack_factory(rows=60_000, SMTP_URL=smtp.url, BASE_URL="https://exportdesk.test",
                          LANE_EXPORTS_WORKERS="1", EXPORT_BATCH_ROWS="200",
                          CHECKPOINT_INTERVAL="0.05")
    alice = browser_login(stack.url, "alice@acme.test")
    # Different end dates: the same request twice would return the same job.
    jobs = [export(alice, stack.url, date_to=f"2026-12-0{day}") for day in range(1, 5)]

    anonymous = requests.Session()
    page = anonymous.get(f"{stack.url}/password-reset").text
    response = anonymous.post(f"{stack.url}/password-reset", data={
        "email": "bob@globex.test", "csrf_token": csrf_from(page)})
    assert response.status_code == 200
    reset = smtp.mailbox.wait_for(lambda m: m["To"] == "bob@globex.test", timeout=60)
    waiting = [j for j in jobs if state(alice, stack.url, j) != "succeeded"]
    assert waiting, "the reset email waited for the exports instead of overtaking them"

    [link] = [link for link in links_in(reset) if "/password-reset/" in link]
    assert link.startswith("https://exportdesk.test/password-reset/")
    path = urlsplit(link).path
    form = anonymous.get(stack.url + path)
    response = anonymous.post(stack.url + path, allow_redirects=False, data={
        "password": "brand new pw", "confirm": "brand new pw", "csrf_token": csrf_from(form.text)})
    assert response.status_code == 303
    bob = requests.Session()
    token = csrf_from(bob.get(f"{stack.url}/login").text)
    assert bob.post(f"{stack.url}/login", allow_redirects=False, data={
        "email": "bob@globex.test", "password": "brand new pw", "csrf_token": token,
    }).status_code == 302
    assert anonymous.get(stack.url + path).status_code == 400, "single use"

    wait_for(lambda: all(state(alice, stack.url, j) == "succeeded" for j in jobs), 300,
               "the exports\n" + stack.log.read_text(errors="replace"))
    for job_id in jobs:
        message = smtp.mailbox.wait_for(lambda m, j=job_id: f"/exports/{j}" in text_of(m), 60)
        assert message["Subject"].startswith("Your Transactions export is ready (")
    [link] = [link for link in links_in(message) if "/d/" in link]
    assert link.startswith("https://exportdesk.test/d/")
    emailed = requests.get(stack.url + urlsplit(link).path)  # no session: the link is enough
    assert emailed.status_code == 200
    assert emailed.content == alice.get(f"{stack.url}/exports/{jobs[-1]}/download").content
    sent = query(stack.database_url, "select state, attempts, count(*) from outbound_emails "
                 "group by state, attempts")
    assert [tuple(r) for r in sent] == [("sent", 1, 5)], "five emails, each sent once"


def test_smtp_down_email_fails_after_retries_while_the_export_succeeds(stack_factory):
    closed = free_port()
    stack = stack_factory(SMTP_URL=f"smtp://127.0.0.1:{closed}?timeout=2",
                          LANE_CRITICAL_RETRIES="2", LANE_CRITICAL_RETRY_DELAY="0.3")
    alice = browser_login(stack.url, "alice@acme.test")
    job_id = export(alice, stack.url, "orders")
    wait_for(lambda: state(alice, stack.url, job_id) == "succeeded", 60, "the export")

    def email_row():
        rows = query(stack.database_url, "select state, attempts, error from outbound_emails "
                     "where job_id = :id", id=job_id)
        return tuple(rows[0]) if rows and rows[0][0] == "failed" else None

    _state, attempts, error = wait_for(email_row, 60, "the email to fail for good")
    assert attempts == 3, "the first try and two retries"
    assert "Connection refused" in error

    fragment = alice.get(f"{stack.url}/exports/{job_id}", headers={"HX-Request": "true"}).text
    assert "state-succeeded" in fragment and f"/exports/{job_id}/download" in fragment
    download = alice.get(f"{stack.url}/exports/{job_id}/download")
    assert download.status_code == 200 and download.content.startswith(b"id,created_at,customer")
