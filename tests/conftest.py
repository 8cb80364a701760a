"""Shared fixtures: an app on a private instance folder with migrated, seeded data."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from flask import Flask
from sqlalchemy import create_engine, make_url, text

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SEED_ROWS = 20_000
# Set it to run the whole suite on PostgreSQL, e.g.
# TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres: every session (and
# every stack) gets a fresh database on that server, dropped afterwards.
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
# The PostgreSQL server the lanes' tests make their broker databases on (BROKER_URL=postgresql…).
LANES_POSTGRES_SERVER = TEST_DATABASE_URL or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
if not TEST_DATABASE_URL:
    os.environ.pop("DATABASE_URL", None)  # never point the suite at a developer's database
# Count an export's rows at once (the default waits a second), in the test apps and in every
# process the tests start: many tests wait for the count to stop a worker a fraction of the way.
os.environ["COUNT_AFTER"] = "0"


def create_database(server_url: str, template: str | None = None) -> str:
    """A fresh database on the server `server_url` points at, empty or a copy of the database
    `template` (a URL on the same server, which nobody may be connected to); returns its URL."""
    url = make_url(server_url)
    name = f"exportdesk_test_{secrets.token_hex(6)}"
    copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"{copy}')
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, database_url: str) -> None:
    engine = create_engine(make_url(server_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        name = make_url(database_url).database
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    engine.dispose()


def database_for(instance: Path) -> str:
    """The database a test instance uses: its own SQLite file, or a fresh PostgreSQL one."""
    if TEST_DATABASE_URL:
        return create_database(TEST_DATABASE_URL)
    return f"sqlite:///{instance / 'exportdesk.db'}"


def migrate_and_seed(env: dict, rows: int) -> None:
    flask = [sys.executable, "-m", "flask"]
    for command in (["db", "upgrade"], ["seed", "--rows", str(rows)]):
        done = subprocess.run([*flask, *command], cwd=ROOT, env=env, capture_output=True)
        assert done.returncode == 0, done.stderr.decode(errors="replace")


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
def instance(tmp_path_factory):
    """A migrated, seeded instance folder (and database); the environment points at both for
    the whole session."""
    path = tmp_path_factory.mktemp("instance")
    database = database_for(path)
    os.environ["INSTANCE_PATH"] = str(path)
    os.environ["DATABASE_URL"] = database
    migrate_and_seed({**os.environ, "FLASK_APP": "webapp"}, SEED_ROWS)
    yield path
    if TEST_DATABASE_URL:
        drop_database(TEST_DATABASE_URL, database)


@pytest.fixture(scope="session")
def database_url(instance) -> str:
    return os.environ["DATABASE_URL"]


# The test apps' settings on top of the environment's.
APP_CONFIG = {"TESTING": True, "CHECKPOINT_INTERVAL": 0.0, "EXPORT_BATCH_ROWS": 500,
              "EXPORTS_QUEUED_PER_USER": 10_000, "EXPORTS_RUNNING_PER_USER": 10_000}


@pytest.fixture(scope="session")
def app(instance):
    from webapp import create_app

    return create_app(APP_CONFIG)


# A state of its own for each test: a module whose tests must not see rows other tests left
# (or must count every row) overrides `app`, `instance` and `database_url` with `fresh`:
#
#     @pytest.fixture
#     def app(fresh):
#         return fresh.app
#
# and likewise `instance` (fresh.path) and `database_url` (fresh.database_url). The
# fixtures built on them (client, alice, broker, sending, ...) then use the fresh app too.
FRESH_ROWS = 2_000


@dataclass
class Fresh:
    """An instance folder with a database of its own, migrated and seeded, and an app on both;
    `env` is the environment a subprocess (`flask ...`) needs to use them."""

    path: Path
    database_url: str
    env: dict
    app: Flask


@pytest.fixture(scope="module")
def fresh_template(tmp_path_factory) -> str:
    """A database migrated and seeded (FRESH_ROWS transactions) once per module: each test's
    `fresh` database is a copy of it."""
    path = tmp_path_factory.mktemp("template")
    database = database_for(path)
    migrate_and_seed({**os.environ, "INSTANCE_PATH": str(path), "FLASK_APP": "webapp",
                      "DATABASE_URL": database}, FRESH_ROWS)
    yield database
    if TEST_DATABASE_URL:
        drop_database(TEST_DATABASE_URL, database)


def copy_database(template: str, instance: Path) -> str:
    """A copy of the database `template` for the instance folder `instance`; returns its URL."""
    if TEST_DATABASE_URL:
        return create_database(TEST_DATABASE_URL, template=template)
    copy = instance / "exportdesk.db"
    with closing(sqlite3.connect(make_url(template).database)) as source, \
            closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    return f"sqlite:///{copy}"


@pytest.fixture
def fresh(tmp_path, fresh_template, monkeypatch) -> Fresh:
    """A fresh state for one test: its own instance folder, database (a copy of the module's
    `fresh_template`) and lanes (SQLite queues in that folder), and an app on them. The
    environment points at them during the test; the lanes go back to the app they served."""
    from jobs import lanes
    from jobs.models import db
    from webapp import create_app

    path = tmp_path / "instance"
    path.mkdir()
    database = copy_database(fresh_template, path)
    monkeypatch.setenv("INSTANCE_PATH", str(path))
    monkeypatch.setenv("DATABASE_URL", database)
    served = lanes.exports.app
    app = create_app(APP_CONFIG)  # binds the lanes to it
    yield Fresh(path, database, {**os.environ, "FLASK_APP": "webapp"}, app)
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()
    if served is not None:
        lanes.init_app(served)
    if TEST_DATABASE_URL:
        drop_database(TEST_DATABASE_URL, database)


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
        self.database_url = env["DATABASE_URL"]
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

    def log_tail(self, lines: int = 200) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# Browser pages and the Content-Security-Policy: Chromium reports what the policy refused (an
# inline style or script, another site's file) on the console, with JavaScript on or off; the
# init script also turns the page's `securitypolicyviolation` events into console errors.
CSP_REPORTER = """document.addEventListener('securitypolicyviolation', (e) => console.error(
  `Content Security Policy violation: ${e.violatedDirective} refused ${e.blockedURI}`));"""
CSP_VIOLATIONS: list[str] = []


def watch_csp(context) -> None:
    """Record in CSP_VIOLATIONS every policy violation a page of this browser context meets:
    the CSP must hold in the real browser, not only in the header."""
    context.add_init_script(CSP_REPORTER)

    def seen(message) -> None:
        text = message.text
        if "content security policy" in text.lower().replace("-", " "):
            CSP_VIOLATIONS.append(f"{message.page.url if message.page else '?'}: {text}")

    context.on("console", seen)


def no_csp_violations() -> None:
    """Fail with every violation recorded since the last call (and forget them)."""
    seen = list(CSP_VIOLATIONS)
    CSP_VIOLATIONS.clear()
    assert not seen, "the Content-Security-Policy refused something:\n" + "\n".join(seen)


STACKS = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the end of the log of every stack it started (web and consumers)
    and what each of its browser pages shows."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for stack in item.stash.get(STACKS, []):
        report.sections.append((f"Stack log {stack.url}", stack.log_tail()))
    browser = item.funcargs.get("browser")
    for context in getattr(browser, "contexts", []):
        for page in context.pages:
            try:
                shown = page.inner_text("body", timeout=2000)
            except Exception as exc:  # noqa: BLE001 (the page's state is what we report)
                shown = f"(no text: {exc})"
            report.sections.append((f"Page {page.url}", shown[-3000:]))


@pytest.fixture
def stack_factory(request, tmp_path):
    """Start stacks on fresh instance folders (migrated and seeded); stops them at the end."""
    stacks: list[Stack] = []
    request.node.stash[STACKS] = stacks

    def make(rows: int = SEED_ROWS, **extra_env: str) -> Stack:
        path = tmp_path / f"stack{len(stacks)}"
        path.mkdir()
        env = {**os.environ, "INSTANCE_PATH": str(path), "FLASK_APP": "webapp",
               "PYTHONUNBUFFERED": "1", "DATABASE_URL": database_for(path), **extra_env}
        migrate_and_seed(env, rows)
        stack = Stack(path, free_port(), env)
        stacks.append(stack)
        stack.start()
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        if TEST_DATABASE_URL:
            drop_database(TEST_DATABASE_URL, stack.database_url)
    shutil.rmtree(tmp_path, ignore_errors=True)


def query(database_url: str, sql: str, **params) -> list:
    """Rows of one SQL statement against a test database (SQLite or PostgreSQL)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def wait_for(predicate, timeout: float = 30, what: str = "condition", every: float = 0.05):
    """Poll until predicate() is truthy and return its value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def run_inline(app, email: str, dataset: str = "transactions", params: dict | None = None,
               fmt: str = "csv"):
    """Record an export for the user and run it to its end in this process, as a worker would;
    returns the job, refreshed and detached (a failed attempt is recorded on it)."""
    from jobs import engine
    from jobs.models import ExportJob, db
    from webapp.auth import find_user

    with app.app_context():
        user = find_user(email)
        job = ExportJob(user=user, org_id=user.org_id, dataset=dataset, params=params or {},
                        format=fmt)
        db.session.add(job)
        db.session.commit()
        try:
            engine.run(job.id, max_attempts=1)
        except engine.AttemptFailed:
            pass
        db.session.refresh(job)
        db.session.expunge(job)
        return job


def download_url(app, job, route: str) -> str:
    """Where a download of `job` is asked for: its page's link ("page"), or the signed link
    emailed to its owner ("link")."""
    if route == "page":
        return f"/exports/{job.id}/download"
    from jobs.models import ExportJob, db
    from webapp.tokens import download_token

    with app.app_context():
        return f"/d/{download_token(db.session.get(ExportJob, job.id))}"


@pytest.fixture(scope="session")
def s3():
    """An S3 server (moto's server mode) in this process: tests/s3server.py."""
    from s3server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket on the `s3` server."""
    return s3.new_bucket()


@pytest.fixture(scope="module")
def smtp():
    """A real SMTP server (aiosmtpd) in this process, one per test module."""
    from mailserver import MailServer

    server = MailServer().start()
    yield server
    server.stop()


@pytest.fixture
def sending(app, smtp, monkeypatch):
    """The critical lane runs its tasks inline, sending to the test SMTP server; the mailbox
    starts empty."""
    from jobs import lanes

    monkeypatch.setitem(app.config, "SMTP_URL", smtp.url)
    lanes.critical.immediate = True
    smtp.mailbox.clear()
    yield smtp.mailbox
    lanes.critical.immediate = False


# Real consumers and a private Redis


@contextmanager
def consumer(lane: str, broker_url: str, instance: Path, log: Path, **env: str):
    """`flask worker LANE` as a real process; SIGINT and a kill of its group at the end.

    Its reconciler runs once at start (RECONCILE_INTERVAL=3600) and leaves alone what other
    tests left waiting in the shared database (RECONCILE_GRACE=3600), so a lane under test
    holds only the test's own work; it knows the probe tasks of tests/lane_probe.py; `env`
    overrides anything, e.g. DATABASE_URL for a private one."""
    full_env = {**os.environ, "INSTANCE_PATH": str(instance), "FLASK_APP": "webapp",
                "RECONCILE_INTERVAL": "3600", "RECONCILE_GRACE": "3600",
                "BROKER_URL": broker_url, "TASK_MODULES": "lane_probe",
                "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen([sys.executable, "-m", "flask", "worker", lane], cwd=ROOT,
                            env=full_env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: "Huey consumer started" in log.read_text() or proc.poll() is not None,
                 what="consumer start")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class RedisServer:
    """A private redis-server on a free port that a test can stop and start again."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="session")
def redis_server():
    if shutil.which("redis-server") is None:
        require("redis-server", "the Redis broker tests start a private redis-server")
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_lanes() -> str:
    """A database of its own on LANES_POSTGRES_SERVER for lanes on PostgreSQL (its URL, to use
    as BROKER_URL), dropped at the end with whatever connections remain."""
    from sqlalchemy.exc import OperationalError

    try:
        create_engine(LANES_POSTGRES_SERVER).connect().close()
    except OperationalError as exc:
        require("PostgreSQL", f"lanes on PostgreSQL: {exc}")
    url = create_database(LANES_POSTGRES_SERVER)
    yield url
    drop_database(LANES_POSTGRES_SERVER, url)


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def broker(request, app):
    """The lanes on the SQLite broker (the default), on a private Redis or on PostgreSQL,
    emptied; restored after."""
    from jobs import lanes

    url = ""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        if server.proc.poll() is not None:
            server.start()
        url = server.url
    elif request.param == "postgres":
        url = request.getfixturevalue("postgres_lanes")
    lanes.configure(url, Path(app.instance_path))
    for lane in lanes.LANES.values():
        lane.flush()
    yield request.param
    lanes.configure(app.config["BROKER_URL"], Path(app.instance_path))
