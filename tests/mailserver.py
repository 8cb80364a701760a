"""A real SMTP server (aiosmtpd) in the test process, recording what it receives."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import threading
import time
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from urllib.parse import quote

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from conftest import free_port

LINK = re.compile(r"https?://\S+")


class Mailbox:
    """Handler that keeps every message; wait_for blocks until one matches."""

    def __init__(self):
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self._changed = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        message = BytesParser(policy=policy.default).parsebytes(envelope.content)
        with self._changed:
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self._changed.notify_all()
        return "250 Message accepted"

    def clear(self) -> None:
        with self._changed:
            self.messages.clear()
            self.envelopes.clear()

    def wait_for(self, match=lambda m: True, timeout: float = 60) -> EmailMessage:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages:
                    if match(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    subjects = [m["Subject"] for m in self.messages]
                    raise AssertionError(f"no matching email; got {subjects}")
                self._changed.wait(left)


def text_of(message: EmailMessage) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def html_of(message: EmailMessage) -> str:
    return message.get_body(preferencelist=("html",)).get_content()


def links_in(message: EmailMessage) -> list[str]:
    return LINK.findall(text_of(message))


class MailServer:
    """Start with start(); `url` is the SMTP_URL that reaches it."""

    def __init__(self, scheme: str = "smtp", user: str | None = None, password: str = "",
                 cert: tuple[Path, Path] | None = None):
        self.mailbox = Mailbox()
        self.port = free_port()
        kwargs: dict = {}
        if user:
            def check(server, session, envelope, mechanism, data):
                given = (data.login, data.password) if isinstance(data, LoginPassword) else ()
                ok = given == (user.encode(), password.encode())
                return AuthResult(success=ok, handled=False)

            kwargs.update(authenticator=check, auth_required=True, auth_exclude_mechanism=["LOGIN"],
                          auth_require_tls=scheme == "smtp+starttls")  # smtps: TLS already
        context = None
        if cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        if scheme == "smtp+starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        if scheme == "smtps":
            kwargs.update(ssl_context=context)
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port,
                                     server_hostname="localhost", ready_timeout=10, **kwargs)
        credentials = f"{quote(user)}:{quote(password)}@" if user else ""
        self.url = f"{scheme}://{credentials}127.0.0.1:{self.port}?timeout=5"
        if cert:
            self.url += f"&cafile={cert[0]}"

    def start(self) -> MailServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


def self_signed_cert(folder: Path) -> tuple[Path, Path] | None:
    """A throwaway certificate for 127.0.0.1, made with the openssl command (None without it)."""
    if shutil.which("openssl") is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key
