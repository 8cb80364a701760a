"""Settings read at start-up: BASE_URL follows the development port; production refuses to
start without what it cannot guess, in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_inline
from sqlalchemy import select

from jobs.models import OutboundEmail, db
from webapp import config, emails
from webapp.auth import find_user


@pytest.fixture
def port_8000(monkeypatch):
    """As after `PORT=8000 make dev`: PORT set, BASE_URL not."""
    monkeypatch.setenv("PORT", "8000")
    monkeypatch.delenv("BASE_URL", raising=False)
    monkeypatch.delenv("EXPORTDESK_ENV", raising=False)


def test_base_url_follows_port_in_development(monkeypatch):
    monkeypatch.delenv("BASE_URL", raising=False)
    monkeypatch.delenv("PORT", raising=False)
    assert config.load()["BASE_URL"] == "http://127.0.0.1:5000"
    monkeypatch.setenv("PORT", "8000")
    assert config.load()["BASE_URL"] == "http://127.0.0.1:8000"
    monkeypatch.setenv("BASE_URL", "https://exports.example.com/")
    assert config.load()["BASE_URL"] == "https://exports.example.com"


def test_emailed_links_use_the_port(port_8000, fresh):
    """Reset, invitation and download emails, as queued, link to port 8000."""
    app = fresh.app
    assert app.config["BASE_URL"] == "http://127.0.0.1:8000"
    job = run_inline(app, "alice@acme.test", "orders")
    with app.app_context():
        alice = find_user("alice@acme.test")
        emails.password_reset(alice)
        emails.invitation(find_user("bob@globex.test"), alice)
        db.session.commit()
        sent = {e.kind: e for e in db.session.scalars(select(OutboundEmail))}
    assert job.state == "succeeded"
    for kind, path in (("password-reset", "/password-reset/"), ("invitation", "/invitation/"),
                       ("download-link", "/d/")):
        for body in (sent[kind].text_body, sent[kind].html_body):
            assert f"http://127.0.0.1:8000{path}" in body, (kind, body)
            assert "127.0.0.1:5000" not in body


def flask_routes(tmp_path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("BASE_URL", "SECRET_KEY", "PORT")}
    return subprocess.run([sys.executable, "-m", "flask", "routes"], cwd=ROOT,
                          env={**base, "FLASK_APP": "webapp", "INSTANCE_PATH": str(tmp_path),
                               **env}, capture_output=True, text=True, timeout=60)


def test_production_without_base_url_refuses_to_start_in_one_line(tmp_path):
    done = flask_routes(tmp_path, EXPORTDESK_ENV="production", SECRET_KEY="s" * 32)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "exportdesk cannot start: BASE_URL must be set when EXPORTDESK_ENV=production "
        "(the site address in emailed links, e.g. https://exports.example.com)"]
    ok = flask_routes(tmp_path, EXPORTDESK_ENV="production", SECRET_KEY="s" * 32,
                      BASE_URL="https://exports.example.com")
    assert ok.returncode == 0, ok.stderr


def test_production_without_secret_key_says_so_in_one_line(tmp_path):
    done = flask_routes(tmp_path, EXPORTDESK_ENV="production",
                        BASE_URL="https://exports.example.com")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("exportdesk cannot start: SECRET_KEY must be set when "
                                   "EXPORTDESK_ENV=production")


def test_flask_dev_hands_its_port_to_the_web_and_the_consumers(app, monkeypatch):
    """`flask dev --port 8123` (or PORT=8123 make dev): every process it starts reads PORT, so
    the emails its consumers write link to that port."""
    started = {}
    monkeypatch.setenv("PORT", "5000")  # restored after the test
    monkeypatch.setattr("webapp.cli.run_together",
                        lambda commands, cwd: started.update(commands, port=os.environ["PORT"])
                        or 0)
    result = app.test_cli_runner().invoke(args=["dev", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert started["port"] == "8123" and started["web"][-2:] == ["--port", "8123"]
