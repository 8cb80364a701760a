"""Shared fixtures: an app on a private instance folder with migrated, seeded data."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEED_ROWS = 20_000


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(service: str, reason: str) -> None:
    """Skip with a visible reason on a bare machine; under CI a missing service is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{service} is required in CI: {reason}")
    pytest.skip(f"{service} unavailable: {reason}")


@pytest.fixture(scope="session")
def instance(tmp_path_factory) -> Path:
    """A migrated, seeded instance folder; INSTANCE_PATH points at it for the whole session."""
    path = tmp_path_factory.mktemp("instance")
    os.environ["INSTANCE_PATH"] = str(path)
    env = {**os.environ, "INSTANCE_PATH": str(path), "FLASK_APP": "webapp"}
    flask = [sys.executable, "-m", "flask"]
    subprocess.run([*flask, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([*flask, "seed", "--rows", str(SEED_ROWS)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    return path


@pytest.fixture(scope="session")
def app(instance):
    from webapp import create_app

    app = create_app({"TESTING": True, "CHECKPOINT_INTERVAL": 0.0, "EXPORT_BATCH_ROWS": 500,
                      "EXPORTS_QUEUED_PER_USER": 10_000})
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def login(client, email: str, password: str = "exportdesk"):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"email": email, "password": password,
                                           "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


@pytest.fixture
def alice(client):
    return login(client, "alice@acme.test")


@pytest.fixture
def bob(app):
    return login(app.test_client(), "bob@globex.test")


@pytest.fixture
def admin(app):
    return login(app.test_client(), "admin@exportdesk.test")


class Stack:
    """`flask dev` (web + a consumer per lane) on a private instance folder and a free port."""

    def __init__(self, instance: Path, port: int, env: dict):
        self.instance, self.port, self.env = instance, port, env
        self.url = f"http://127.0.0.1:{port}"
        self.log = instance / "dev.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "dev", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "Running on" in text and text.count("Huey consumer started") >= 2:
                return
            assert self.proc.poll() is None, text
            time.sleep(0.1)
        raise AssertionError("stack did not start:\n" + self.log.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(2)
            self.proc.wait(30)


@pytest.fixture
def stack_factory(tmp_path):
    """Start stacks on fresh instance folders (migrated and seeded); stops them at the end."""
    stacks: list[Stack] = []

    def make(rows: int = SEED_ROWS, **extra_env: str) -> Stack:
        path = tmp_path / f"stack{len(stacks)}"
        path.mkdir()
        env = {**os.environ, "INSTANCE_PATH": str(path), "FLASK_APP": "webapp",
               "PYTHONUNBUFFERED": "1", **extra_env}
        flask = [sys.executable, "-m", "flask"]
        subprocess.run([*flask, "db", "upgrade"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        subprocess.run([*flask, "seed", "--rows", str(rows)], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        stack = Stack(path, free_port(), env)
        stacks.append(stack)
        stack.start()
        return stack

    yield make
    for stack in stacks:
        stack.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)
