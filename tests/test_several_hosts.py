"""Three "hosts", each its own instance folder and processes, sharing nothing but PostgreSQL, a
private Redis and the bucket (moto): the web app under gunicorn on one, a critical and an
exports consumer on each of the two others. An export starts on worker host 1, whose exports
consumer is killed; worker host 2 finishes it, and it is downloaded through the web host; a
password reset asked for meanwhile arrives within the critical lane's target."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests
from conftest import (
    ROOT,
    create_database,
    csrf_from,
    drop_database,
    free_port,
    migrate_and_seed,
    query,
    require,
    wait_for,
)
from instances import kill_group
from mailserver import MailServer
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

pytestmark = pytest.mark.integration
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
ROWS = 100_000
RESET_TARGET = 5.0  # seconds: CRITICAL_SLA_SECONDS, the critical lane's pickup target


@pytest.fixture
def cluster(tmp_path, redis_server, s3):
    """The environment every host shares, with the database migrated and seeded once."""
    if shutil.which("gunicorn", path=os.path.dirname(sys.executable)) is None:
        require("gunicorn", "the web host runs the app under gunicorn")
    try:
        create_engine(POSTGRES).connect().close()
    except OperationalError as exc:
        require("PostgreSQL", f"the hosts share one database ({exc})")
    smtp = MailServer().start()
    database = create_database(POSTGRES)
    shared = {**os.environ, "FLASK_APP": "webapp", "PYTHONUNBUFFERED": "1",
              "DATABASE_URL": database, "BROKER_URL": redis_server.url,
              **s3.settings(s3.new_bucket()), "SECRET_KEY": "one key for every host",
              "SMTP_URL": smtp.url, "BASE_URL": "https://exportdesk.test",
              "JOB_LEASE": "2", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
              "EXPORT_BATCH_ROWS": "50", "LANE_EXPORTS_WORKERS": "1",
              "LANE_EXPORTS_RETRIES": "20"}
    migrate_and_seed({**shared, "INSTANCE_PATH": str(tmp_path / "setup")}, ROWS)
    yield shared, smtp, tmp_path
    smtp.stop()
    drop_database(POSTGRES, database)


@contextmanager
def process(command: list[str], env: dict, log: Path, ready: str):
    """A process in its own session, up once `ready` is in its log; its group SIGKILLed after."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: ready in log.read_text() or proc.poll() is not None,
                 what=f"{log.stem} to start")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        kill_group(proc)


def host(shared: dict, root: Path, name: str) -> dict:
    """A host's environment: the shared one, with an instance folder and a name of its own."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    return {**shared, "INSTANCE_PATH": str(folder), "WORKER_HOST": name}


def consumer(env: dict, lane: str, name: str):
    return process([sys.executable, "-m", "flask", "worker", lane], env,
                   Path(env["INSTANCE_PATH"]) / f"{name}.log", "Huey consumer started")


def test_an_export_killed_on_one_worker_host_finishes_on_another_and_downloads_via_the_web(
        cluster):
    shared, smtp, root = cluster
    web_env, one, two = (host(shared, root, name) for name in ("web", "worker1", "worker2"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gunicorn = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "--workers", "2",
                "--bind", f"127.0.0.1:{port}", "webapp:create_app()"]
    with ExitStack() as hosts:
        hosts.enter_context(process(gunicorn, web_env, root / "web" / "gunicorn.log",
                                    "Booting worker"))
        wait_for(lambda: requests.get(f"{url}/healthz", timeout=5).ok, what="the web's health")
        hosts.enter_context(consumer(one, "critical", "critical"))
        first = hosts.enter_context(consumer(one, "exports", "exports"))

        alice = requests.Session()
        token = csrf_from(alice.get(f"{url}/login").text)
        assert alice.post(f"{url}/login", data={"email": "alice@acme.test", "password":
                                                "exportdesk", "csrf_token": token}).ok
        token = csrf_from(alice.get(f"{url}/").text)
        created = alice.post(f"{url}/exports", allow_redirects=False, data={
            "dataset": "transactions", "format": "csv", "csrf_token": token})
        assert created.status_code == 303
        job_id = int(created.headers["Location"].rsplit("/", 1)[1])

        def job():
            return alice.get(f"{url}/api/jobs/{job_id}").json()

        wait_for(lambda: (j := job())["state"] == "running" and j["progress"] >= 0.3,
                 timeout=60, what="worker host 1 to pass 30 %")
        kill_group(first, signal.SIGKILL)
        assert job()["state"] == "running", "killed mid-export"
        hosts.enter_context(consumer(two, "critical", "critical"))
        hosts.enter_context(consumer(two, "exports", "exports"))

        anonymous = requests.Session()
        token = csrf_from(anonymous.get(f"{url}/password-reset").text)
        asked = time.monotonic()
        assert anonymous.post(f"{url}/password-reset", data={
            "email": "bob@globex.test", "csrf_token": token}).ok
        smtp.mailbox.wait_for(lambda m: m["To"] == "bob@globex.test", timeout=60)
        took = time.monotonic() - asked
        assert took < RESET_TARGET, f"the reset email took {took:.1f} s"
        assert job()["state"] != "succeeded", "the reset was sent while the export ran"

        done = wait_for(lambda: (j := job())["state"] in ("succeeded", "failed") and j,
                        timeout=180, what="worker host 2 to finish the export")
        assert done["state"] == "succeeded", done["error"]
        workers = query(shared["DATABASE_URL"], "select worker from job_attempts where "
                        "job_id = :id order by number", id=job_id)
        assert [w.worker.partition(":")[0] for w in workers][:1] == ["worker1"]
        assert workers[-1].worker.startswith("worker2:")

        redirected = alice.get(f"{url}/exports/{job_id}/download", allow_redirects=False)
        assert redirected.status_code == 302
        fetched = requests.get(redirected.headers["Location"], timeout=30)
        assert fetched.status_code == 200

    expected = root / "inline.csv"
    exported = subprocess.run([sys.executable, "-m", "flask", "export", "transactions",
                               "--user", "alice@acme.test", "--format", "csv",
                               "--output", str(expected)],
                              cwd=ROOT, env=web_env, capture_output=True)
    assert exported.returncode == 0, exported.stderr.decode(errors="replace")
    assert fetched.content == expected.read_bytes()
