"""Lanes against real consumers on SQLite, on the real Redis and on PostgreSQL: isolation, hard
timeouts, fair share, health, graceful shutdown, periodic tasks once per schedule."""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import signal
import time
from pathlib import Path

import lane_probe
import pytest
from conftest import consumer, require, wait_for
from expected import expected_rows
from huey.exceptions import HueyException
from sqlalchemy import update

from jobs import lanes, tasks
from jobs.models import ExportJob, JobState, db
from webapp.auth import find_user
from webapp.exports import create_export

pytestmark = pytest.mark.integration
REDIS_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/3")




@pytest.fixture(params=["sqlite", "redis", "postgres"])
def broker(request, app, instance):
    """Both lanes on SQLite files, on the real Redis or on PostgreSQL (a database of their
    own), emptied; restored afterwards.

    Jobs other tests left queued or running are cancelled, so that fair share sees only
    this test's exports.
    """
    with app.app_context():
        db.session.execute(update(ExportJob).where(ExportJob.state.in_(JobState.ACTIVE))
                           .values(state=JobState.CANCELLED, lease_expires_at=None))
        db.session.commit()
    url = ""
    if request.param == "redis":
        import redis

        try:
            redis.Redis.from_url(REDIS_URL).ping()
        except redis.RedisError as exc:
            require("redis", f"{REDIS_URL}: {exc}")
        redis.Redis.from_url(REDIS_URL).flushdb()
        url = REDIS_URL
    elif request.param == "postgres":
        url = request.getfixturevalue("postgres_lanes")
    lanes.configure(url, instance)
    for lane in lanes.LANES.values():
        lane.storage.flush_queue()
        lane.storage.flush_schedule()
        lane.storage.flush_results()
    yield url
    lanes.configure(app.config["BROKER_URL"], Path(app.instance_path))


def marks(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_every_task_declares_its_lane_and_cannot_be_sent_to_another():
    declared = {name: lane.name for lane in lanes.LANES.values()
                for name in lane._registry._registry if name.startswith("jobs.")}
    assert declared == {
        "jobs.tasks.export": "exports",
        "jobs.tasks.reconcile": "critical",
        "jobs.tasks.send_email": "critical",
        "jobs.tasks.housekeeping": "critical",
        "jobs.tasks.schedules": "critical",
        "jobs.tasks.send_webhook": "critical",
    }, "a task was added or moved: declare its lane on purpose and list it here"
    with pytest.raises(HueyException, match="not found"):
        lanes.critical.enqueue(tasks.run_export.s(1))
    with pytest.raises(HueyException, match="not found"):
        lanes.exports.enqueue(lane_probe.critical_ping.s("x"))


def test_lane_settings_come_from_defaults_file_and_env(tmp_path, monkeypatch):
    assert lanes.LaneSettings.load("critical").workers == 8
    assert lanes.LaneSettings.load("exports").timeout == 1800.0
    settings_file = tmp_path / "lanes.toml"
    settings_file.write_text("[lanes.exports]\nworkers = 4\ntimeout = 600\n")
    monkeypatch.setenv("LANES_FILE", str(settings_file))
    monkeypatch.setenv("LANE_EXPORTS_TIMEOUT", "900")
    loaded = lanes.LaneSettings.load("exports")
    assert (loaded.workers, loaded.timeout, loaded.retries) == (4, 900.0, 3)
    monkeypatch.setenv("LANE_EXPORTS_WORKER_TYPE", "thread")
    with pytest.raises(ValueError, match="hard timeouts"):
        lanes.LaneSettings.load("exports")


def test_critical_hard_timeout_frees_the_slot_and_retries_by_policy(broker, instance, tmp_path):
    marker, pings = tmp_path / "sleep", tmp_path / "ping"
    with consumer("critical", broker, instance, tmp_path / "log", LANE_CRITICAL_WORKERS="1",
                  LANE_CRITICAL_TIMEOUT="1", LANE_CRITICAL_RETRIES="1",
                  LANE_CRITICAL_RETRY_DELAY="0"):
        # Retry policy travels in the message (Huey); the timeout is the consumer's lane's.
        lane_probe.critical_sleep(60, str(marker), retries=1, retry_delay=0)
        lane_probe.critical_ping(str(pings))
        wait_for(lambda: len(marks(marker)) == 2 and marks(pings), timeout=30,
                 what="two timed-out attempts and the ping")
        time.sleep(1.5)  # the second attempt's timeout
        starts = [float(m[1]) for m in marks(marker) if m[0] == "start"]
        assert len(starts) == 2 and not [m for m in marks(marker) if m[0] == "end"]
        ping_at = float(marks(pings)[0][2])
        assert ping_at - starts[0] <= 1 + 5, "the only worker was not freed by the timeout"
        health = wait_for(lambda: (h := lanes.critical.health())["failed_5m"] >= 2 and h,
                          timeout=10, what="timeouts counted as failures")
        assert health["completed_5m"] >= 1 and health["depth"] == 0


def test_export_attempts_time_out_are_recorded_then_fail(broker, app, instance, tmp_path):
    with app.app_context():
        job = create_export(find_user("alice@acme.test"), "transactions", "csv", {})
        db.session.commit()
        job_id = job.id
    # One row per batch makes the export take several times the 0.6 s hard timeout.
    with consumer("exports", broker, instance, tmp_path / "log", LANE_EXPORTS_TIMEOUT="0.6",
                  LANE_EXPORTS_RETRIES="1", LANE_EXPORTS_RETRY_DELAY="0.1",
                  EXPORT_BATCH_ROWS="1", CHECKPOINT_INTERVAL="0.01"):
        with app.app_context():
            def finished():
                db.session.expire_all()
                found = db.session.get(ExportJob, job_id)
                return found if found.state in ("failed", "succeeded") else None

            job = wait_for(finished, timeout=60, what="the export to end")
            assert job.state == "failed" and "TaskTimeout" in job.error
            assert [a.outcome for a in job.attempts] == ["timed_out", "timed_out"]
            assert job.attempts[1].started_at >= job.attempts[0].finished_at
            assert 0 < job.rows_done < job.rows_total, "the second attempt resumed"


def test_fair_share_one_running_export_per_user(broker, app, instance, tmp_path):
    with app.app_context():
        alice, bob = find_user("alice@acme.test"), find_user("bob@globex.test")
        a_ids = []
        for status in ("pending", "settled", "refunded"):
            a_ids.append(create_export(alice, "transactions", "csv", {"status": status}).id)
        b_id = create_export(bob, "orders", "csv", {}).id
        db.session.commit()
    with consumer("exports", broker, instance, tmp_path / "log", EXPORT_BATCH_ROWS="2",
                  CHECKPOINT_INTERVAL="0.05"):
        with app.app_context():
            def all_done():
                db.session.expire_all()
                jobs = [db.session.get(ExportJob, i) for i in (*a_ids, b_id)]
                return jobs if all(j.state == "succeeded" for j in jobs) else None

            jobs = wait_for(all_done, timeout=120, what="all exports")
            a_jobs, b_job = jobs[:3], jobs[3]
            spans = sorted((j.attempts[0].started_at, j.attempts[0].finished_at)
                           for j in a_jobs)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert start >= end, "two of alice's exports ran at once"
            assert b_job.attempts[0].started_at < spans[1][0], "bob waited behind alice"
            assert all(len(j.attempts) == 1 for j in jobs), "deferrals are not attempts"


def test_lane_health_reports_depth_wait_workers_and_outcomes(broker, instance, tmp_path):
    pings = tmp_path / "ping"
    for _ in range(3):
        lane_probe.critical_ping(str(pings))
    time.sleep(0.3)
    idle = lanes.critical.health()
    assert idle["depth"] == 3 and idle["oldest_wait"] >= 0.3 and idle["workers"] == 0
    with consumer("critical", broker, instance, tmp_path / "log", LANE_CRITICAL_WORKERS="3"):
        wait_for(lambda: len(marks(pings)) == 3, what="pings")
        # (the probe's periodic task may be enqueued at a minute boundary: wait it out too)
        health = wait_for(lambda: (h := lanes.critical.health())["completed_5m"] >= 3
                          and h["depth"] == 0 and h, what="completions")
        assert health["oldest_wait"] == 0.0
        assert health["consumers"] == 1 and health["workers"] == 3
        lane_probe.critical_sleep(3, str(tmp_path / "sleep"))
        busy = wait_for(lambda: (h := lanes.critical.health())["running"] == 1 and h,
                        what="a running task")
        # "", redis://… or postgresql+psycopg://…: sqlite, redis or postgresql
        assert busy["broker"] == (broker.split(":")[0].split("+")[0] or "sqlite")
    assert lanes.critical.health()["consumers"] == 0


def test_sigterm_checkpoints_a_running_export_which_resumes_identically(
        broker, app, instance, tmp_path):
    with app.app_context():
        job = create_export(find_user("bob@globex.test"), "transactions", "csv", {})
        db.session.commit()
        job_id = job.id

    def current():
        with app.app_context():
            db.session.expire_all()
            found = db.session.get(ExportJob, job_id)
            db.session.expunge(found)
            return found

    slow = dict(EXPORT_BATCH_ROWS="2", CHECKPOINT_INTERVAL="0.05")
    with consumer("exports", broker, instance, tmp_path / "log", **slow) as proc:
        wait_for(lambda: current().rows_done > 100, what="the export to make progress")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    stopped = current()
    assert stopped.state == "queued" and stopped.checkpoint["rows"] > 0
    with app.app_context():
        outcomes = [a.outcome for a in db.session.get(ExportJob, job_id).attempts]
    assert outcomes == ["interrupted"]
    assert lanes.exports.pending_count() == 1, "the job went back on its lane"
    with consumer("exports", broker, instance, tmp_path / "log2"):
        done = wait_for(lambda: (j := current()).state == "succeeded" and j, timeout=60,
                        what="the resumed export")
    data = (instance / "exports" / done.file_name).read_bytes()
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert rows == expected_rows(os.environ["DATABASE_URL"], "transactions", "globex")
    with app.app_context():
        assert [a.outcome for a in db.session.get(ExportJob, job_id).attempts] == [
            "interrupted", "succeeded"]


def test_graceful_stop_lets_critical_tasks_finish_and_gives_back_the_rest(
        broker, instance, tmp_path):
    short, long_ = tmp_path / "short", tmp_path / "long"
    with consumer("critical", broker, instance, tmp_path / "log", LANE_CRITICAL_WORKERS="2",
                  LANE_CRITICAL_SHUTDOWN_TIMEOUT="2") as proc:
        lane_probe.critical_sleep(1, str(short))
        lane_probe.critical_sleep(60, str(long_))
        wait_for(lambda: marks(short) and marks(long_), what="both tasks to start")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [m[0] for m in marks(short)] == ["start", "end"], "a short task finished"
    assert [m[0] for m in marks(long_)] == ["start"]
    back = [t for t in lanes.critical.pending() if t.name.endswith("critical_sleep")]
    assert len(back) == 1 and back[0].args[0] == 60, "the interrupted task is back on its lane"


PERIODIC_MARKER = {"path": ""}


@lanes.critical.periodic_task(lanes.crontab(minute="*"), name="test_periodic_probe")
def periodic_probe() -> None:
    with open(PERIODIC_MARKER["path"], "a") as f:
        f.write(f"tick {time.time()!r} {os.getpid()}\n")


def _run_periodic(_: int) -> None:
    periodic_probe.call_local()


def test_periodic_task_runs_once_per_schedule_across_consumers(broker, tmp_path):
    """Every consumer's scheduler enqueues a periodic task; eight runs of the same schedule,
    from four processes at once, do its work once."""
    PERIODIC_MARKER["path"] = str(tmp_path / "periodic")
    if hasattr(lanes.critical.storage, "close"):
        lanes.critical.storage.close()  # forked processes open their own connections
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_run_periodic, range(8))
    assert len(marks(tmp_path / "periodic")) == 1
