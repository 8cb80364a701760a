"""Webhooks: events (an export succeeded or failed, a schedule paused) posted to the endpoints
that asked for them, signed the Standard Webhooks way, through the critical lane with retries
over hours; never to a private address unless allowed (docs/webhooks.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import time
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from flask import current_app
from sqlalchemy import func, select, update

from jobs import signals
from jobs.checkpoints import fault
from jobs.datasets import InvalidParams
from jobs.dispatch import WrongState, on_commit
from jobs.lanes import critical
from jobs.models import (
    DeliveryState,
    ExportJob,
    JobState,
    Schedule,
    User,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    db,
    utcnow,
)

log = logging.getLogger(__name__)

EVENTS = {"export.succeeded": "An export succeeded", "export.failed": "An export failed",
          "schedule.paused": "A schedule paused itself"}
# Seconds before each retry: 8 attempts over about 11 hours, then the delivery has failed.
RETRY_DELAYS = (30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600)
ATTEMPTS = len(RETRY_DELAYS) + 1
SECRET_OVERLAP = timedelta(hours=24)  # a rotated-out secret still signs this long


class Refused(Exception):
    """The endpoint's address is not one we may call; the message says why."""


def new_secret() -> str:
    """A signing secret as the standard writes it: whsec_ and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def rotate(endpoint: WebhookEndpoint) -> str:
    """A new secret; the old one keeps signing beside it for SECRET_OVERLAP, so receivers can
    switch without missing a delivery."""
    endpoint.previous_secret, endpoint.previous_until = endpoint.secret, utcnow() + SECRET_OVERLAP
    endpoint.secret = new_secret()
    return endpoint.secret


def sign(keys: list[str], event_id: str, timestamp: int, body: str) -> str:
    """The webhook-signature header: `v1,<base64 HMAC-SHA256 of id.timestamp.body>` per key."""
    signed = f"{event_id}.{timestamp}.{body}".encode()
    return " ".join(
        "v1," + base64.b64encode(hmac.new(base64.b64decode(key.removeprefix("whsec_")), signed,
                                          hashlib.sha256).digest()).decode()
        for key in keys)


def url_problem(url: object) -> str | None:
    """Why `url` cannot be an endpoint (None when it can); its address is checked at each send."""
    if not isinstance(url, str) or len(url) > 2000 or not url.isprintable() or " " in url:
        return "must be an http or https URL (2,000 characters at most, no spaces)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "must be an http or https URL such as https://example.com/hooks"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL such as https://example.com/hooks"
    if parts.username or parts.password:
        return "must not hold a user name or password"
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return "has an invalid port"
    return None


def allowed(address: str) -> bool:
    """Whether an address is a public one (not private, loopback, link-local, reserved or
    multicast, also when written as IPv4 inside IPv6), or every address is allowed."""
    if current_app.config["WEBHOOK_ALLOW_PRIVATE"]:
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> str:
    """The address to connect to, resolved once and checked: the connection goes to this very
    address, so a name cannot answer public for the check and private for the call."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"{host} does not resolve ({exc.strerror})") from None
    addresses = [info[4][0] for info in found]
    refused = [a for a in addresses if not allowed(a)]
    if refused:
        raise Refused(f"{host} is a private, loopback or link-local address ({refused[0]}); "
                      "an admin can allow those with WEBHOOK_ALLOW_PRIVATE")
    return addresses[0]


class _Connection(http.client.HTTPSConnection):
    """HTTP or HTTPS to a checked address, the certificate checked against the URL's host."""

    def __init__(self, scheme: str, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.tls, self.address = scheme == "https", address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def post(url: str, body: str, headers: dict[str, str]) -> int:
    """POST the body once and return the status code; never follows a redirect."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve(parts.hostname, port)
    connection = _Connection(parts.scheme, parts.hostname, port, address,
                             current_app.config["WEBHOOK_TIMEOUT"])
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=body.encode(), headers={
            **headers, "Content-Type": "application/json", "User-Agent": "exportdesk-webhooks"})
        response = connection.getresponse()
        response.read(65536)
        return response.status
    finally:
        connection.close()


def _event_id(key: str) -> str:
    """The same event always has the same id (a repeated signal makes no second delivery)."""
    return "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def record(event_type: str, key: str, user_id: int, org_id: int, data: dict) -> list[int]:
    """A delivery of the event for each endpoint that wants it (its owner's, and their
    organisation's organisation-wide ones), in the caller's transaction; each goes to the
    critical lane after the commit. Returns the deliveries' ids."""
    event_id = _event_id(key)
    endpoints = db.session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.org_id == org_id,
        (WebhookEndpoint.user_id == user_id) | WebhookEndpoint.organisation_wide)).all()
    body = json.dumps({"id": event_id, "type": event_type,
                       "timestamp": utcnow().isoformat(timespec="seconds") + "Z", "data": data},
                      separators=(",", ":"))
    made = []
    for endpoint in endpoints:
        if event_type not in endpoint.events or db.session.scalar(
                select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint.id,
                                                 WebhookDelivery.event_id == event_id)):
            continue
        delivery = WebhookDelivery(endpoint_id=endpoint.id, event_id=event_id,
                                   event_type=event_type, body=body)
        db.session.add(delivery)
        db.session.flush()
        delivery_id = delivery.id
        on_commit(db.session(), lambda d=delivery_id: send(d))
        made.append(delivery_id)
    return made


def send(delivery_id: int, delay: float | None = None) -> None:
    """Put the delivery's message on the critical lane (after `delay` seconds)."""
    critical.send("send_webhook", delivery_id, delay=delay)


def job_data(job: ExportJob) -> dict:
    """The job as an event carries it: what and how it ended, and where to download it (the
    link needs the owner's login or token: never the data itself)."""
    base = current_app.config["BASE_URL"]
    return {"job": {
        "id": job.id, "state": job.state, "dataset": job.dataset, "format": job.format,
        "params": job.params, "rows": job.rows_done, "bytes": job.bytes, "sha256": job.sha256,
        "error": job.error, "schedule_id": job.schedule_id,
        "created_at": job.created_at.isoformat() + "Z",
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
        "url": f"{base}/api/jobs/{job.id}",
        "download_url": f"{base}/exports/{job.id}/download"
        if job.state == JobState.SUCCEEDED else None}}


def _on_export_finished(_app: object, job: ExportJob) -> None:
    if job.state in (JobState.SUCCEEDED, JobState.FAILED):
        kind = f"export.{job.state}"
        record(kind, f"{kind}:{job.id}:{job.finished_at}", job.user_id, job.org_id,
               job_data(job))


def _on_schedule_paused(_app: object, schedule: Schedule) -> None:
    record("schedule.paused", f"schedule.paused:{schedule.id}:{schedule.paused_at}",
           schedule.user_id, schedule.org_id, {"schedule": {
               "id": schedule.id, "name": schedule.name, "reason": schedule.pause_reason,
               "url": f"{current_app.config['BASE_URL']}/api/schedules/{schedule.id}"}})


signals.export_finished.connect(_on_export_finished)
signals.schedule_paused.connect(_on_schedule_paused)


def _claim(delivery_id: int) -> WebhookDelivery | None:
    """Take the delivery for one attempt: one conditional UPDATE, so two messages for it (a
    duplicate, a resend racing a retry) never send at once."""
    claimed = db.session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id,
               WebhookDelivery.state.in_(DeliveryState.CLAIMABLE),
               WebhookDelivery.attempts < ATTEMPTS)
        .values(state=DeliveryState.SENDING, attempts=WebhookDelivery.attempts + 1,
                claimed_at=utcnow())).rowcount
    db.session.commit()
    return db.session.get(WebhookDelivery, delivery_id) if claimed else None


def deliver(delivery_id: int) -> None:
    """One attempt: sign and POST the delivery's body; 2xx is delivered, anything else (an
    error, a timeout, a redirect, a refused address) is retried after RETRY_DELAYS, then failed."""
    delivery = _claim(delivery_id)
    if delivery is None:
        log.info("webhook delivery %s: nothing to send", delivery_id)
        return
    endpoint = db.session.get(WebhookEndpoint, delivery.endpoint_id)
    keys = [endpoint.secret]
    if endpoint.previous_secret and endpoint.previous_until and endpoint.previous_until > utcnow():
        keys.append(endpoint.previous_secret)
    timestamp = int(time.time())
    status, error = None, None
    try:
        status = post(endpoint.url, delivery.body, {
            "webhook-id": delivery.event_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(keys, delivery.event_id, timestamp, delivery.body)})
        fault("webhook_sent")
        if not 200 <= status < 300:
            error = ("redirects are not followed" if 300 <= status < 400 else
                     f"the endpoint answered {status}")
    except Refused as exc:
        error = str(exc)
    except (OSError, http.client.HTTPException) as exc:
        error = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
    _record(delivery, status, error)


def _record(delivery: WebhookDelivery, status: int | None, error: str | None) -> None:
    """The attempt in the log and the delivery's new state; the retry, if due, on the lane."""
    retry = error is not None and delivery.attempts < ATTEMPTS
    state = (DeliveryState.DELIVERED if error is None else
             DeliveryState.RETRYING if retry else DeliveryState.FAILED)
    db.session.add(WebhookAttempt(delivery_id=delivery.id, status_code=status, error=error))
    db.session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(
        state=state, delivered_at=utcnow() if error is None else None))
    db.session.commit()
    log.info("webhook delivery %s attempt %s: %s", delivery.id, delivery.attempts,
             error or status)
    if retry:
        send(delivery.id, delay=delay_after(delivery.attempts))


def delay_after(attempt: int) -> float:
    """Seconds before the next attempt after failed attempt number `attempt` (a setting can
    shrink them all, for tests)."""
    return RETRY_DELAYS[attempt - 1] * current_app.config["WEBHOOK_RETRY_SCALE"]


def resend(delivery: WebhookDelivery) -> None:
    """Send a delivery again (same id and body) with a fresh allowance of attempts, once the
    caller commits; also one waiting for a retry (a message the broker lost is sent this way).
    Not while an attempt is under way: it may be delivering right now."""
    if delivery.state == DeliveryState.SENDING:
        raise WrongState("This delivery is being sent right now; it can be resent once this "
                         "attempt has ended.")
    delivery.state, delivery.attempts, delivery.delivered_at = DeliveryState.QUEUED, 0, None
    delivery_id = delivery.id
    on_commit(db.session(), lambda: send(delivery_id))


def send_lost(grace: float) -> list[int]:
    """Deliveries waiting to be sent (queued, or retrying) for `grace` seconds whose message
    the critical lane holds in neither its queue nor its schedule (the broker lost it, or the
    hand-over after commit failed) go on the lane again; returns their ids. A second message
    for one delivery is harmless: the claim lets one attempt run at a time."""
    cutoff = utcnow() - timedelta(seconds=grace)
    try:
        held = critical.held("send_webhook")
    except Exception as exc:  # the broker is away: the next reconcile looks again
        log.warning("cannot read the critical lane (%s: %s)", type(exc).__name__, exc)
        return []
    waiting = db.session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.state.in_(DeliveryState.CLAIMABLE),
        func.coalesce(WebhookDelivery.claimed_at, WebhookDelivery.created_at) <= cutoff))
    lost = [i for i in waiting if i not in held]
    db.session.commit()
    for delivery_id in lost:
        send(delivery_id)
    if lost:
        log.info("reconciler sent %d webhook delivery(ies) the lane did not hold: %s",
                 len(lost), lost)
    return lost


def release_stalled(now: datetime | None = None) -> list[int]:
    """Deliveries whose worker stopped while sending (killed, cut off) are sent again, with
    the same webhook-id (receivers drop repeats by it); returns their ids. At least once."""
    stale = (now or utcnow()) - timedelta(seconds=current_app.config["WEBHOOK_TIMEOUT"]
                                          + critical.settings.timeout)
    ids = list(db.session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.state == DeliveryState.SENDING, WebhookDelivery.claimed_at < stale)))
    for delivery_id in ids:
        left = WebhookDelivery.attempts < ATTEMPTS
        moved = db.session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.state == DeliveryState.SENDING)
            .values(state=DeliveryState.RETRYING).where(left)).rowcount
        db.session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.state == DeliveryState.SENDING)
            .values(state=DeliveryState.FAILED))
        db.session.add(WebhookAttempt(delivery_id=delivery_id,
                                      error="its worker stopped while sending it"))
        db.session.commit()
        if moved:
            send(delivery_id)
    return ids


def define(endpoint: WebhookEndpoint, user: User, data: dict) -> WebhookEndpoint:
    """Check an endpoint's URL and events (and, for admins only, whether it is organisation-
    wide) and write them on `endpoint`; InvalidParams with each field's error otherwise."""
    errors: dict[str, str] = {}
    url = data.get("url", endpoint.url)
    if problem := url_problem(url):
        errors["url"] = problem
    events = data.get("events", endpoint.events)
    if not isinstance(events, list) or not events or any(
            not isinstance(e, str) or e not in EVENTS for e in events):
        errors["events"] = f"must be a list of one or more of {', '.join(EVENTS)}"
    wide = data.get("organisation_wide", endpoint.organisation_wide or False)
    if wide not in (True, False):
        errors["organisation_wide"] = "must be true or false"
    elif wide and not user.is_admin:
        errors["organisation_wide"] = "only an admin can register an endpoint for everyone"
    if errors:
        raise InvalidParams(errors)
    endpoint.url, endpoint.events, endpoint.organisation_wide = url, sorted(set(events)), wide
    if endpoint.id is None:
        endpoint.user, endpoint.org_id, endpoint.secret = user, user.org_id, new_secret()
    return endpoint


def deliveries(endpoint: WebhookEndpoint, limit: int = 50) -> list[WebhookDelivery]:
    """Its latest deliveries, newest first, each with its attempts (the delivery log)."""
    return list(db.session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
        .order_by(WebhookDelivery.id.desc()).limit(limit)))
