"""Sending email once: SMTP (plain, STARTTLS or SMTPS), or .eml files in development's outbox."""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from flask import current_app
from sqlalchemy import exc as sa_exc
from sqlalchemy import update

from jobs.lanes import critical
from jobs.models import EmailState, OutboundEmail, db, utcnow

log = logging.getLogger(__name__)
# Sends of one email: the critical lane's first try and its retries.
EMAIL_ATTEMPTS = critical.settings.retries + 1

SCHEMES = {"smtp": ("plain", 25), "smtp+starttls": ("starttls", 587), "smtps": ("ssl", 465)}


class DeliveryFailed(Exception):
    """This attempt failed and another one is due: the lane retries the task."""


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to reach the mail server, read from one SMTP_URL."""

    host: str
    port: int
    security: str  # "plain", "starttls" or "ssl"
    username: str | None = None
    password: str | None = None
    timeout: float = 10.0
    cafile: str | None = None

    @classmethod
    def from_url(cls, url: str) -> SmtpSettings:
        """smtp://, smtp+starttls:// or smtps://[user:password@]host[:port][?timeout=S&cafile=P]"""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(f"SMTP_URL must be {', '.join(s + '://host' for s in SCHEMES)}")
        security, default_port = SCHEMES[parts.scheme]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return cls(
            host=parts.hostname,
            port=parts.port or default_port,
            security=security,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            timeout=float(query.get("timeout", 10)),
            cafile=query.get("cafile"),
        )


class Transport(Protocol):
    def send(self, message: EmailMessage) -> None: ...


class SmtpTransport:
    """One connection per message: the critical lane's workers are processes, nothing to pool."""

    def __init__(self, settings: SmtpSettings):
        self.settings = settings

    def send(self, message: EmailMessage) -> None:
        s = self.settings
        context = ssl.create_default_context(cafile=s.cafile)
        if s.security == "ssl":
            smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=context)
        else:
            smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
        with smtp:
            if s.security == "starttls":
                smtp.starttls(context=context)
            if s.username:
                smtp.login(s.username, s.password or "")
            smtp.send_message(message)


class OutboxTransport:
    """Development without SMTP: each message becomes an .eml file you can open or browse."""

    def __init__(self, folder: Path):
        self.folder = folder

    def send(self, message: EmailMessage) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"{utcnow():%Y%m%dT%H%M%S%f}-{message['X-Exportdesk-Email']}"
        temporary = self.folder / f".{stem}.tmp"
        temporary.write_bytes(message.as_bytes())
        temporary.replace(self.folder / f"{stem}.eml")  # the listing never sees half a file


def outbox() -> Path:
    return Path(current_app.instance_path) / "outbox"


def transport() -> Transport:
    """SMTP when SMTP_URL is set; the outbox in development; an error in production."""
    url = current_app.config["SMTP_URL"]
    if url:
        return SmtpTransport(SmtpSettings.from_url(url))
    if current_app.config["PRODUCTION"]:
        raise RuntimeError("SMTP_URL is not set")
    return OutboxTransport(outbox())


def build_message(email: OutboundEmail) -> EmailMessage:
    """Plain text first, HTML as the alternative; the Message-ID was fixed when it was queued."""
    message = EmailMessage()
    message["From"] = current_app.config["MAIL_FROM"]
    message["To"] = email.to_address
    message["Subject"] = email.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = email.message_id
    message["Auto-Submitted"] = "auto-generated"
    message["X-Exportdesk-Email"] = str(email.id)
    message.set_content(email.text_body)
    message.add_alternative(email.html_body, subtype="html")
    return message


def _claim(email_id: int, max_attempts: int) -> OutboundEmail | None:
    """Take the row for one attempt; None when it is sent, being sent, or out of attempts.
    A single conditional UPDATE, so two workers holding duplicate tasks cannot both send."""
    claimed = db.session.execute(
        update(OutboundEmail)
        .where(OutboundEmail.id == email_id, OutboundEmail.state.in_(EmailState.CLAIMABLE),
               OutboundEmail.attempts < max_attempts)
        .values(state=EmailState.SENDING, attempts=OutboundEmail.attempts + 1,
                claimed_at=utcnow())
    ).rowcount
    db.session.commit()
    return db.session.get(OutboundEmail, email_id) if claimed else None


def deliver(email_id: int, max_attempts: int) -> None:
    """Send the email unless it already went; raises DeliveryFailed when a retry is due."""
    email = _claim(email_id, max_attempts)
    if email is None:
        log.info("email %s: nothing to send (already sent, in flight or given up)", email_id)
        return
    try:
        transport().send(build_message(email))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        attempt = email.attempts
        retry = attempt < max_attempts
        db.session.rollback()
        ended = db.session.execute(  # unless an admin cancelled it meanwhile
            update(OutboundEmail)
            .where(OutboundEmail.id == email_id, OutboundEmail.state == EmailState.SENDING)
            .values(state=EmailState.RETRYING if retry else EmailState.FAILED, error=error)
        ).rowcount
        db.session.commit()
        log.warning("email %s attempt %s failed: %s", email_id, attempt, error)
        if retry and ended:
            raise DeliveryFailed(error) from exc
        return
    _record_sent(email_id)
    log.info("email %s sent as %s", email_id, email.message_id)


def _record_sent(email_id: int) -> None:
    """The server has the message: record it, trying again on a new connection when the
    database dropped ours just now (sending again would be a duplicate)."""
    db.session.rollback()
    for pause in (0.2, 1.0, 3.0, None):
        try:
            with db.engine.begin() as conn:
                conn.execute(update(OutboundEmail).where(OutboundEmail.id == email_id)
                             .values(state=EmailState.SENT, sent_at=utcnow(), error=None))
            return
        except sa_exc.DBAPIError:
            if pause is None:
                raise
            log.warning("email %s sent, but not yet recorded: trying again", email_id)
            time.sleep(pause)

