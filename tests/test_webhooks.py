"""Webhooks against a real HTTP server in this process: signatures verified by the
`standardwebhooks` package (an independent implementation), retries on a 500 and a timeout by a
real critical consumer (SQLite and Redis lanes), one event id however often it is sent (a
worker killed after sending), private addresses refused, redirects not followed, the API."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from conftest import consumer, csrf_from, login, run_inline, wait_for
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook

from jobs import lanes, schedules, webhooks
from jobs.models import (
    DeliveryState,
    Schedule,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    db,
    utcnow,
)
from webapp.auth import create_token, find_user


@pytest.fixture
def app(fresh):
    return fresh.app


class Receiver:
    """An HTTP endpoint that records every POST and answers from a script: a status code, or
    "slow" (answers only after the sender's timeout); 204 once the script is done."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                receiver.requests.append((dict(self.headers), body))
                answer = receiver.answers.pop(0) if receiver.answers else 204
                if answer == "slow":
                    time.sleep(3)
                    answer = 204
                try:
                    self.send_response(answer)
                    if 300 <= answer < 400:
                        self.send_header("Location", "http://example.com/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up waiting
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks?from=exportdesk"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(*answers) -> Receiver:
        made.append(Receiver(*answers))
        return made[-1]

    yield make
    for server in made:
        server.close()


def token(app, email: str = "alice@acme.test") -> dict:
    with app.app_context():
        return {"Authorization": f"Bearer {create_token(find_user(email))}"}


def register(app, url: str, events=("export.succeeded",), email="alice@acme.test") -> dict:
    response = app.test_client().post("/api/webhooks", headers=token(app, email),
                                      json={"url": url, "events": list(events)})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def deliveries(app) -> list[tuple]:
    with app.app_context():
        rows = db.session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        return [(d.event_type, d.state, [(a.status_code, a.error) for a in d.log]) for d in rows]


def verified(secret: str, request: tuple) -> dict:
    headers, body = request
    return Webhook(secret).verify(body, headers)


@pytest.fixture
def lane_broker(app, request):
    """The lanes on SQLite (the default) or on the shared test Redis, for this test."""
    url = ""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        redis.Redis(port=server.port).flushall()
        url = server.url
    lanes.configure(url, Path(app.instance_path))
    yield url
    lanes.configure(app.config["BROKER_URL"], Path(app.instance_path))


@pytest.mark.integration
@pytest.mark.parametrize("lane_broker", ["sqlite", "redis"], indirect=True)
def test_signed_delivery_retried_after_a_500_and_a_timeout(app, fresh, receiver, lane_broker,
                                                           tmp_path):
    endpoint = receiver(500, "slow")
    hook = register(app, endpoint.url)
    with consumer("critical", lane_broker, fresh.path, tmp_path / "critical.log",
                  DATABASE_URL=fresh.database_url, WEBHOOK_ALLOW_PRIVATE="true",
                  WEBHOOK_TIMEOUT="1", WEBHOOK_RETRY_SCALE="0.01"):
        job = run_inline(app, "alice@acme.test", "orders")
        wait_for(lambda: deliveries(app) and deliveries(app)[0][1] == "delivered", 60,
                 "the delivery\n" + (tmp_path / "critical.log").read_text())
    [(kind, _state, log)] = deliveries(app)
    assert kind == "export.succeeded"
    assert log == [(500, "the endpoint answered 500"), (None, "timed out"), (204, None)]
    assert len(endpoint.requests) == 3
    events = [verified(hook["secret"], r) for r in endpoint.requests]
    assert len({r[0]["webhook-id"] for r in endpoint.requests}) == 1, "one event, one id"
    event = events[-1]
    assert event["id"] == endpoint.requests[0][0]["webhook-id"]
    assert event["type"] == "export.succeeded" and event["timestamp"].endswith("Z")
    assert event["data"]["job"]["id"] == job.id and event["data"]["job"]["rows"] == job.rows_done
    assert event["data"]["job"]["download_url"].endswith(f"/exports/{job.id}/download")
    assert "customer" not in endpoint.requests[0][1], "a link to the data, never the data"
    with pytest.raises(Exception, match="signature"):
        Webhook(webhooks.new_secret()).verify(endpoint.requests[0][1], endpoint.requests[0][0])


@pytest.mark.integration
def test_a_worker_killed_after_sending_sends_the_same_event_again(app, fresh, receiver,
                                                                  tmp_path):
    endpoint = receiver()
    hook = register(app, endpoint.url)
    settings = dict(DATABASE_URL=fresh.database_url, WEBHOOK_ALLOW_PRIVATE="true",
                    WEBHOOK_TIMEOUT="1", LANE_CRITICAL_TIMEOUT="1")
    with consumer("critical", "", fresh.path, tmp_path / "killed.log",
                  FAULT_INJECT="webhook_sent", **settings) as first:
        run_inline(app, "alice@acme.test", "orders")
        wait_for(lambda: first.poll() is not None, 60, "the worker to be killed after sending")
    assert len(endpoint.requests) == 1 and deliveries(app)[0][1] == "sending"
    with consumer("critical", "", fresh.path, tmp_path / "second.log", RECONCILE_INTERVAL="1",
                  **settings):
        wait_for(lambda: deliveries(app)[0][1] == "delivered", 60,
                 "the delivery\n" + (tmp_path / "second.log").read_text())
    [(_kind, _state, log)] = deliveries(app)
    assert log == [(None, "its worker stopped while sending it"), (204, None)]
    first_try, second_try = endpoint.requests
    assert first_try[0]["webhook-id"] == second_try[0]["webhook-id"] and \
        first_try[1] == second_try[1], "the same event, which the receiver can drop"
    assert verified(hook["secret"], second_try)["type"] == "export.succeeded"


@pytest.fixture
def inline(app):
    """The critical lane runs its tasks at once, in this process."""
    lanes.critical.immediate = True
    yield
    lanes.critical.immediate = False


def test_a_private_address_is_refused_unless_allowed(app, inline, receiver, monkeypatch):
    endpoint = receiver()
    register(app, endpoint.url)
    run_inline(app, "alice@acme.test", "orders")
    [(_kind, state, [(status, error)])] = deliveries(app)
    assert state == "retrying" and status is None and endpoint.requests == []
    assert "private, loopback or link-local" in error and "WEBHOOK_ALLOW_PRIVATE" in error
    with app.app_context():
        for address in ("127.0.0.1", "10.1.2.3", "192.168.0.10", "172.16.5.4", "169.254.169.254",
                        "100.64.0.1", "0.0.0.0", "::1", "fe80::1%eth0", "fc00::1",
                        "::ffff:127.0.0.1", "224.0.0.1"):
            assert not webhooks.allowed(address), address
        assert webhooks.allowed("93.184.216.34") and webhooks.allowed("2606:4700::1111")
        monkeypatch.setitem(app.config, "WEBHOOK_ALLOW_PRIVATE", True)
        assert webhooks.allowed("127.0.0.1")
        webhooks.deliver(db.session.scalar(select(WebhookDelivery.id)))
    assert len(endpoint.requests) == 1 and deliveries(app)[0][1] == "delivered"


def test_a_redirect_is_not_followed(app, inline, receiver, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOW_PRIVATE", True)
    endpoint = receiver(302)
    register(app, endpoint.url)
    run_inline(app, "alice@acme.test", "orders")
    assert deliveries(app)[0][1:] == ("retrying", [(302, "redirects are not followed")])
    assert len(endpoint.requests) == 1


def test_a_duplicated_message_sends_once_and_resend_sends_the_same_event(app, inline,
                                                                         receiver, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOW_PRIVATE", True)
    endpoint = receiver()
    hook = register(app, endpoint.url, events=["export.succeeded", "export.failed"])
    run_inline(app, "alice@acme.test", "orders")
    with app.app_context():
        delivery_id = db.session.scalar(select(WebhookDelivery.id))
        webhooks.deliver(delivery_id)  # a second message for the same delivery
    assert len(endpoint.requests) == 1
    client, alice = app.test_client(), token(app)
    resent = client.post(f"/api/webhooks/{hook['id']}/deliveries/{delivery_id}/resend",
                         headers=alice)
    assert resent.status_code == 202
    assert len(endpoint.requests) == 2
    assert endpoint.requests[0][1] == endpoint.requests[1][1]
    log = client.get(f"/api/webhooks/{hook['id']}", headers=alice).get_json()["deliveries"]
    assert [a["status_code"] for a in log[0]["attempts"]] == [204, 204]
    assert log[0]["state"] == "delivered" and log[0]["type"] == "export.succeeded"
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(WebhookAttempt)) == 2


def test_rotation_signs_with_both_secrets_for_a_while(app, inline, receiver, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOW_PRIVATE", True)
    endpoint = receiver()
    hook = register(app, endpoint.url)
    client, alice = app.test_client(), token(app)
    rotated = client.patch(f"/api/webhooks/{hook['id']}", headers=alice,
                           json={"rotate_secret": True}).get_json()
    assert rotated["secret"] != hook["secret"] and rotated["previous_secret_valid_until"]
    assert "secret" not in client.get(f"/api/webhooks/{hook['id']}", headers=alice).get_json()
    run_inline(app, "alice@acme.test", "orders")
    [request] = endpoint.requests
    assert len(request[0]["webhook-signature"].split(" ")) == 2
    assert verified(hook["secret"], request) == verified(rotated["secret"], request)


def test_failed_exports_and_paused_schedules_are_events_too(app, inline, receiver, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOW_PRIVATE", True)
    endpoint = receiver()
    hook = register(app, endpoint.url, events=["export.failed", "schedule.paused"])
    run_inline(app, "alice@acme.test", "orders")  # succeeded: not asked for
    failed = run_inline(app, "alice@acme.test", "payroll")
    with app.app_context():
        schedule = schedules.define(Schedule(), find_user("alice@acme.test"), {
            "name": "Nightly", "dataset": "orders", "repeat": "daily", "at": "03:00"})
        db.session.add(schedule)
        db.session.flush()
        schedules.auto_pause(schedule, "its owner's account is disabled")
        db.session.commit()
    kinds = [verified(hook["secret"], r) for r in endpoint.requests]
    assert [k["type"] for k in kinds] == ["export.failed", "schedule.paused"]
    assert kinds[0]["data"]["job"]["id"] == failed.id and kinds[0]["data"]["job"]["error"]
    assert kinds[0]["data"]["job"]["download_url"] is None
    assert kinds[1]["data"]["schedule"]["reason"] == "its owner's account is disabled"


def test_the_webhook_api_checks_fields_and_owners(app):
    client, alice, bob = app.test_client(), token(app), token(app, "bob@globex.test")
    for body, field in [({"url": "ftp://x", "events": ["export.failed"]}, "url"),
                        ({"url": "https://u:p@example.com", "events": ["export.failed"]}, "url"),
                        ({"url": "https://example.com", "events": []}, "events"),
                        ({"url": "https://example.com", "events": ["export.started"]}, "events"),
                        ({"url": "https://example.com", "events": [["export.failed"]]}, "events"),
                        ({"url": "http://[::1", "events": ["export.failed"]}, "url"),
                        ({"url": "https://example.com/\x00", "events": ["export.failed"]}, "url"),
                        ({"url": "https://example.com", "events": ["export.failed"],
                          "organisation_wide": True}, "organisation_wide")]:
        response = client.post("/api/webhooks", headers=alice, json=body)
        assert response.status_code == 400 and field in response.get_json()["fields"], body
    assert client.post("/api/webhooks", headers=alice, data="x").status_code == 400
    hook = register(app, "https://example.com/hooks")
    url = f"/api/webhooks/{hook['id']}"
    assert hook["secret"].startswith("whsec_")
    assert client.get(url, headers=bob).status_code == 404
    assert client.patch(url, headers=bob, json={"events": ["export.failed"]}).status_code == 404
    assert client.get("/api/webhooks", headers=bob).get_json()["webhooks"] == []
    changed = client.patch(url, headers=alice, json={"events": ["export.failed"]})
    assert changed.status_code == 200 and changed.get_json()["events"] == ["export.failed"]
    assert "secret" not in changed.get_json()
    assert client.patch(url, headers=alice, json={"url": "nope"}).status_code == 400
    wide = client.post("/api/webhooks", headers=token(app, "admin@exportdesk.test"), json={
        "url": "https://example.com/all", "events": ["export.failed"],
        "organisation_wide": True})
    assert wide.status_code == 201
    assert client.delete(url, headers=alice).status_code == 204
    assert client.get(url, headers=alice).status_code == 404


def test_resend_is_refused_while_an_attempt_is_under_way(app):
    hook = register(app, "https://example.com/hooks")
    with app.app_context():
        delivery = WebhookDelivery(endpoint_id=hook["id"], event_id="evt_1",
                                   event_type="export.failed", body=json.dumps({}),
                                   state=DeliveryState.SENDING)
        db.session.add(delivery)
        db.session.commit()
        delivery_id = delivery.id
    response = app.test_client().post(
        f"/api/webhooks/{hook['id']}/deliveries/{delivery_id}/resend", headers=token(app))
    assert response.status_code == 409 and "being sent right now" in response.get_json()["error"]


def test_the_pages_register_show_the_secret_once_rotate_and_resend(app, inline, receiver,
                                                                  monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOW_PRIVATE", True)
    endpoint = receiver()
    alice = login(app.test_client(), "alice@acme.test")
    page = alice.get("/webhooks").get_data(as_text=True)
    assert "For everyone in my organisation" not in page, "organisation-wide is for admins"
    token = csrf_from(page)
    bad = alice.post("/webhooks", data={"url": "gopher://x", "csrf_token": token})
    assert bad.status_code == 400
    assert "URL must be an http or https URL" in bad.get_data(as_text=True)
    assert "Events must be a list" in bad.get_data(as_text=True)
    assert alice.post("/webhooks", data={"url": endpoint.url}).status_code == 400  # no CSRF
    made = alice.post("/webhooks", data={"url": endpoint.url, "events": "export.succeeded",
                                         "csrf_token": token})
    assert made.status_code == 201
    secret = made.get_data(as_text=True).split('<code id="secret">')[1].split("<")[0]
    assert secret.startswith("whsec_")
    with app.app_context():
        endpoint_id = db.session.scalar(select(func.max(WebhookEndpoint.id)))
    path = f"/webhooks/{endpoint_id}"
    assert secret not in alice.get(path).get_data(as_text=True), "shown once"

    run_inline(app, "alice@acme.test", "orders")
    verified(secret, endpoint.requests[0])
    shown = alice.get(path).get_data(as_text=True)
    assert "export.succeeded" in shown and "Delivered" in shown and ": 204" in shown
    with app.app_context():
        delivery_id = db.session.scalar(select(WebhookDelivery.id))
    resent = alice.post(f"{path}/deliveries/{delivery_id}/resend", data={"csrf_token": token})
    assert resent.status_code == 303 and len(endpoint.requests) == 2

    rotated = alice.post(f"{path}/rotate", data={"csrf_token": token}).get_data(as_text=True)
    new_secret = rotated.split('<code id="secret">')[1].split("<")[0]
    assert new_secret != secret and "The previous secret also signs until" in rotated

    bob = login(app.test_client(), "bob@globex.test")
    assert bob.get(path).status_code == 404
    assert bob.post(f"{path}/delete", data={"csrf_token": csrf_from(
        bob.get("/webhooks").get_data(as_text=True))}).status_code == 404
    assert alice.post(f"{path}/delete", data={"csrf_token": token}).status_code == 303
    assert alice.get(path).status_code == 404


def test_a_delivery_whose_message_was_lost_is_sent_again_once(app):
    hook = register(app, "https://example.com/hooks")
    with app.app_context():
        lanes.critical.flush()
        old = utcnow() - timedelta(minutes=5)
        lost = WebhookDelivery(endpoint_id=hook["id"], event_id="evt_lost", body="{}",
                               event_type="export.failed", created_at=old)
        recent = WebhookDelivery(endpoint_id=hook["id"], event_id="evt_recent", body="{}",
                                 event_type="export.failed")
        done = WebhookDelivery(endpoint_id=hook["id"], event_id="evt_done", body="{}",
                               event_type="export.failed", created_at=old,
                               state=DeliveryState.DELIVERED)
        db.session.add_all([lost, recent, done])
        db.session.commit()
        assert webhooks.send_lost(grace=60) == [lost.id]
        assert lanes.critical.held("send_webhook") == {lost.id}
        assert webhooks.send_lost(grace=60) == [], "the lane holds it now: no second message"
        lanes.critical.flush()
