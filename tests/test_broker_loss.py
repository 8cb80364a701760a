"""Never a lost job when the broker loses its data: the database knows what should wait on each
lane, the reconciler compares it with what the lane really holds and sends what is missing,
and leaves a lane that still holds its messages (however many) alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from conftest import (
    LANES_POSTGRES_SERVER,
    ROOT,
    TEST_DATABASE_URL,
    RedisServer,
    consumer,
    create_database,
    database_for,
    drop_database,
    free_port,
    migrate_and_seed,
    query,
    require,
    wait_for,
)
from sqlalchemy import create_engine, make_url, update
from sqlalchemy.exc import OperationalError

from jobs import dispatch, lanes, tasks
from jobs.models import EmailState, ExportJob, JobState, OutboundEmail, db, utcnow
from webapp.auth import find_user

GRACE = 10

# Runs in a process of its own on the private instance: an export and a password reset email,
# each handed to its lane after commit, and what the lanes hold afterwards.
RECORD = """
import json
from jobs import lanes
from webapp import create_app
from webapp.auth import find_user
from webapp.emails import password_reset
from webapp.exports import create_export
from jobs.models import db

app = create_app()
with app.app_context():
    job = create_export(find_user("alice@acme.test"), "orders", "csv", {})
    email = password_reset(find_user("bob@globex.test"))
    db.session.commit()
    print(json.dumps({"job": job.id, "email": email.id, "message_id": email.message_id,
                      "exports": sorted(lanes.exports.held("export")),
                      "critical": sorted(lanes.critical.held("send_email"))}))
"""


@pytest.fixture
def private(tmp_path):
    """An instance folder and database of its own, migrated and seeded, no consumer yet."""
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path), "FLASK_APP": "webapp",
           "PYTHONUNBUFFERED": "1", "BROKER_URL": "", "DATABASE_URL": database_for(tmp_path)}
    migrate_and_seed(env, 2000)
    yield env
    if TEST_DATABASE_URL:
        drop_database(TEST_DATABASE_URL, env["DATABASE_URL"])


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["redis", "sqlite", "postgres"])
def test_job_and_email_the_broker_forgot_run_once_it_is_back(private, smtp, tmp_path, kind):
    instance, database = Path(private["INSTANCE_PATH"]), private["DATABASE_URL"]
    server, broker_url = None, ""
    if kind == "redis":
        if shutil.which("redis-server") is None:
            require("Redis", "this test starts a private redis-server and restarts it empty")
        server = RedisServer(free_port())
        server.start()
        broker_url = server.url
    elif kind == "postgres":
        try:
            create_engine(LANES_POSTGRES_SERVER).connect().close()
        except OperationalError as exc:
            require("PostgreSQL", f"the lanes' database: {exc}")
        broker_url = create_database(LANES_POSTGRES_SERVER)
    try:
        recorded = subprocess.run([sys.executable, "-c", RECORD], cwd=ROOT, capture_output=True,
                                  text=True, timeout=60, env={**private, "BROKER_URL": broker_url})
        assert recorded.returncode == 0, recorded.stderr
        sent = json.loads(recorded.stdout.splitlines()[-1])
        job_id, email_id = sent["job"], sent["email"]
        assert job_id in sent["exports"] and email_id in sent["critical"], "both reached a lane"
        [(enqueued_at,)] = query(database, "select enqueued_at from export_jobs where id = :id",
                                 id=job_id)
        assert enqueued_at is not None, "the job is recorded as handed over"

        # The broker forgets, while no consumer runs.
        if server:
            server.stop()
            server.start()  # same port, empty: no persistence
            assert redis.Redis(port=server.port).dbsize() == 0
        elif broker_url:  # the lanes' database dropped and made again, empty: no tables yet
            drop_database(LANES_POSTGRES_SERVER, broker_url)
            engine = create_engine(LANES_POSTGRES_SERVER, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{make_url(broker_url).database}"')
            engine.dispose()
        else:
            files = list(instance.glob("queue-*.db*"))
            assert {f.name for f in files} >= {"queue-critical.db", "queue-exports.db"}
            for file in files:
                file.unlink()

        env = dict(DATABASE_URL=database, SMTP_URL=smtp.url, RECONCILE_INTERVAL="1",
                   RECONCILE_GRACE="1")
        logs = {lane: tmp_path / f"{lane}.log" for lane in ("critical", "exports")}
        with (consumer("critical", broker_url, instance, logs["critical"], **env),
              consumer("exports", broker_url, instance, logs["exports"], **env)):
            def job_ended():
                rows = query(database, "select state, file_name, error from export_jobs "
                             "where id = :id", id=job_id)
                return rows[0] if rows[0][0] in ("succeeded", "failed") else None

            state, file_name, error = wait_for(job_ended, timeout=120, what="the export to end")
            assert state == "succeeded", error
            assert file_name and (instance / "exports" / file_name).is_file()
            smtp.mailbox.wait_for(lambda m: m["Message-ID"] == sent["message_id"], timeout=120)

        log = logs["critical"].read_text(errors="replace")
        assert f"job(s) their lane lost: [{job_id}]" in log, log
        assert f"email(s) their lane lost or never got: [{email_id}]" in log, log
        [row] = query(database, "select state, attempts from outbound_emails where id = :id",
                      id=email_id)
        assert tuple(row) == ("sent", 1), "sent once"
        received = [m for m in smtp.mailbox.messages if m["Message-ID"] == sent["message_id"]]
        assert len(received) == 1
    finally:
        if server:
            server.stop()
        elif broker_url:
            drop_database(LANES_POSTGRES_SERVER, broker_url)


def lengths() -> dict[str, tuple[int, int]]:
    return {name: (lane.pending_count(), lane.scheduled_count())
            for name, lane in lanes.LANES.items()}


def test_a_lane_holding_a_long_line_is_sent_nothing_a_lane_that_lost_it_all_of_it(app, broker):
    """Everything queued or scheduled long ago (older than the grace period) but still held:
    nothing is sent. After the lane loses its data: every message once, and then no more."""
    with app.app_context():
        # Only this test's rows wait: other tests' leftovers would be resent (rightly).
        db.session.execute(update(ExportJob).where(ExportJob.state.in_(JobState.ACTIVE))
                           .values(state=JobState.CANCELLED, lease_expires_at=None))
        db.session.execute(update(OutboundEmail)
                           .where(OutboundEmail.state.in_(EmailState.CANCELLABLE))
                           .values(state=EmailState.CANCELLED))
        user = find_user("alice@acme.test")
        jobs = [ExportJob(user=user, org_id=user.org_id, dataset="orders", params={"n": n})
                for n in range(120)]
        emails = [OutboundEmail(key=f"line:{broker}:{n}:{utcnow().timestamp()}", kind="test",
                                to_address="alice@acme.test", subject=f"In line {n}",
                                text_body="hi", html_body="<p>hi", message_id=f"<{n}@line>")
                  for n in range(40)]
        db.session.add_all(jobs + emails)
        db.session.commit()
        job_ids, email_ids = [j.id for j in jobs], [e.id for e in emails]
        for job_id in job_ids[:-1]:
            dispatch.send(job_id)
        for email_id in email_ids[:-1]:
            tasks.send_email(email_id)
        # The last of each waits in the schedule: a retry due in ten minutes.
        for wrapper, arg in ((tasks.run_export, job_ids[-1]), (tasks.send_email, email_ids[-1])):
            task = wrapper.s(arg)
            task.eta = utcnow() + timedelta(minutes=10)
            wrapper.huey.add_schedule(task)
        dispatch.mark_enqueued(job_ids[-1])
        long_ago = utcnow() - timedelta(hours=1)
        db.session.execute(update(ExportJob).where(ExportJob.id.in_(job_ids))
                           .values(created_at=long_ago, enqueued_at=long_ago))
        db.session.execute(update(ExportJob).where(ExportJob.id == job_ids[-1])
                           .values(state=JobState.RETRYING))
        db.session.execute(update(OutboundEmail).where(OutboundEmail.id.in_(email_ids))
                           .values(created_at=long_ago))
        db.session.execute(update(OutboundEmail).where(OutboundEmail.id == email_ids[-1])
                           .values(state=EmailState.RETRYING, attempts=1))
        db.session.commit()

        assert lanes.exports.held("export") == set(job_ids)
        assert lanes.critical.held("jobs.tasks.send_email") == set(email_ids)
        before = lengths()
        assert before["exports"] == (119, 1) and before["critical"] == (39, 1)
        assert dispatch.reconcile_emails(GRACE) == []
        assert dispatch.reconcile(GRACE) == []
        assert lengths() == before, "a lane that holds its line is sent nothing"

        for lane in lanes.LANES.values():  # what a FLUSHALL or a deleted queue file does
            lane.flush()
        assert dispatch.reconcile_emails(GRACE) == email_ids
        assert dispatch.reconcile(GRACE) == job_ids
        after = lengths()
        assert after == {"exports": (120, 0), "critical": (40, 0)}, "each once"
        assert dispatch.reconcile(GRACE) == [] and lengths() == after, "and not again"
        # Leave nothing waiting for the next test's reconciler.
        db.session.execute(update(ExportJob).where(ExportJob.id.in_(job_ids))
                           .values(state=JobState.CANCELLED))
        db.session.execute(update(OutboundEmail).where(OutboundEmail.id.in_(email_ids))
                           .values(state=EmailState.CANCELLED))
        db.session.commit()
