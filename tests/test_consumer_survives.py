"""A consumer survives what its own loop meets: Redis restarting under it (a heartbeat that
fails must not stop it replacing dead workers), and a job cancelled while running whose worker
died before it could stop (its attempt is ended and its parts removed)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from conftest import RedisServer, free_port, require, wait_for
from instances import Instance
from sqlalchemy import update

from jobs.models import ExportJob

pytestmark = pytest.mark.integration
ENV = {"RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1", "EXPORT_BATCH_ROWS": "500",
       "CHECKPOINT_INTERVAL": "0", "LANE_EXPORTS_WORKERS": "1", "JOB_LEASE": "600"}


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_an_exports_consumer_replaces_its_dead_worker_after_redis_restarted(tmp_path):
    if shutil.which("redis-server") is None:
        require("redis-server", "this test restarts a private redis-server")
    redis = RedisServer(free_port())
    redis.start()
    instance = Instance(tmp_path / "instance", 2_000, {**ENV, "BROKER_URL": redis.url})
    try:
        with instance.worker("exports", "exports") as consumer:
            redis.stop()
            time.sleep(5)  # two health checks (every 2 s) meet a broker that does not answer
            redis.start()
            for worker in children(consumer.pid):
                os.kill(worker, signal.SIGKILL)
            with instance.worker("critical", "critical"):  # the reconciler sends the job
                job_id = instance.new_job("csv")
                job = wait_for(lambda: (j := instance.job(job_id)).state == "succeeded" and j,
                               timeout=120, what="a replaced worker to run the export")
            assert consumer.poll() is None and job.rows_done > 0
    finally:
        instance.close()
        redis.stop()


def test_a_job_cancelled_while_its_worker_died_ends_its_attempt_and_keeps_no_part(tmp_path):
    instance = Instance(tmp_path / "instance", 20_000, ENV)
    try:
        job_id = instance.new_job("csv")
        with instance.worker("critical", "critical"):
            with instance.worker("exports", "faulty", FAULT_INJECT="synced:3") as proc:
                proc.wait(120)
            assert list(instance.exports.glob(f"job-{job_id}.*.part")), "a part to clean up"
            with instance.db.begin() as conn:  # as jobs.dispatch.cancel does, while running
                conn.execute(update(ExportJob).where(ExportJob.id == job_id)
                             .values(state="cancelled", checkpoint=None))
            with instance.worker("exports", "after"):
                wait_for(lambda: instance.attempts(job_id)[-1].finished_at, timeout=60,
                         what="the consumer to end the dead worker's attempt")
        [attempt] = instance.attempts(job_id)
        assert attempt.outcome == "cancelled" and "is gone" in attempt.error
        assert instance.job(job_id).state == "cancelled"
        assert not list(instance.exports.glob(f"job-{job_id}.*"))
    finally:
        instance.close()
