"""Kill the exports consumer (SIGKILL of its whole process group, or SIGTERM) at several points
of a 200,000-row export and restart it: the final file is byte-identical to an inline export."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TEST_DATABASE_URL,
    database_for,
    drop_database,
    migrate_and_seed,
    wait_for,
)
from sqlalchemy import create_engine, func, insert, select
from sqlalchemy.pool import NullPool

from webapp.models import ExportJob, JobAttempt, User

pytestmark = pytest.mark.integration
ROWS = 200_000
USER = "bob@globex.test"
# Small batches keep the export running for a few seconds; a short lease and a fast
# reconciler put a killed worker's job back on its lane within about three seconds.
CONSUMER_ENV = {"JOB_LEASE": "2", "RECONCILE_INTERVAL": "1", "RECONCILE_GRACE": "1",
                "EXPORT_BATCH_ROWS": "50", "CHECKPOINT_INTERVAL": "0.05",
                "LANE_EXPORTS_RETRIES": "20", "LANE_EXPORTS_WORKERS": "1"}




class Big:
    """A private instance seeded with 200,000 transactions, its own database and broker."""

    def __init__(self, path: Path):
        self.path = path
        self.env = {**os.environ, "INSTANCE_PATH": str(path), "FLASK_APP": "webapp",
                    "PYTHONUNBUFFERED": "1", "BROKER_URL": "", "DATABASE_URL": database_for(path)}
        self.db = create_engine(self.env["DATABASE_URL"], poolclass=NullPool)

    def new_job(self, fmt: str) -> int:
        """A queued job nobody has sent yet: the reconciler in the critical consumer sends it."""
        with self.db.begin() as conn:
            user_id, org_id = conn.execute(
                select(User.id, User.org_id).where(User.email == USER)).one()
            return conn.execute(insert(ExportJob.__table__).values(
                user_id=user_id, org_id=org_id, dataset="transactions", params={},
                format=fmt)).inserted_primary_key[0]

    def job(self, job_id: int):
        with self.db.connect() as conn:
            return conn.execute(select(ExportJob.__table__)
                                .where(ExportJob.id == job_id)).one()

    def attempts(self, job_id: int) -> int:
        with self.db.connect() as conn:
            return conn.execute(select(func.count()).select_from(JobAttempt)
                                .where(JobAttempt.job_id == job_id)).scalar_one()


    def inline_export(self, fmt: str) -> Path:
        out = self.path / f"inline.{fmt}"
        done = subprocess.run([sys.executable, "-m", "flask", "export", "transactions",
                               "--user", USER, "--format", fmt, "--output", str(out)],
                              cwd=ROOT, env=self.env, capture_output=True)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return out

    @contextmanager
    def worker(self, lane: str, name: str):
        """`flask worker LANE` in its own session; its whole group is SIGKILLed at the end."""
        log = self.path / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "flask", "worker", lane], cwd=ROOT,
                                env={**self.env, **CONSUMER_ENV}, stdout=log.open("ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: "Huey consumer started" in log.read_text()
                     or proc.poll() is not None, what=f"{name} to start")
            assert proc.poll() is None, log.read_text()
            yield proc
        finally:
            kill_group(proc)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big")
    instance = Big(path)
    migrate_and_seed(instance.env, ROWS)
    yield instance
    instance.db.dispose()
    if TEST_DATABASE_URL:
        drop_database(TEST_DATABASE_URL, instance.env["DATABASE_URL"])


def run_with_interruptions(big: Big, fmt: str, points: list[float], sig: int) -> tuple[int, list]:
    """Start the job, interrupt its consumer with `sig` at each fraction of the rows in
    `points` (0.0: as soon as it runs), restart it each time; returns the job id and what the
    part file held beyond its checkpoint at each kill."""
    job_id = big.new_job(fmt)
    part = big.path / "exports" / f"job-{job_id}.{fmt}.part"
    beyond, claims = [], {None}
    with big.worker("critical", "critical"):
        for n, point in enumerate(points):
            with big.worker("exports", f"exports{n}") as proc:
                def reached(point=point):
                    job = big.job(job_id)
                    started = job.state == "running" and job.claimed_by not in claims
                    return started and job.rows_total and job.rows_done >= point * job.rows_total
                wait_for(reached, what=f"attempt {n + 1} to reach {point:.0%}")
                kill_group(proc, sig)
                job = big.job(job_id)
                claims.add(job.claimed_by)
                size = part.stat().st_size if part.exists() else 0
                beyond.append(size - (job.checkpoint or {}).get("bytes", 0))
                assert job.state in ("running", "queued"), job.error
                claims.add(job.claimed_by)
        with big.worker("exports", "exports-last"):
            job = wait_for(lambda: (j := big.job(job_id)).state in ("succeeded", "failed") and j,
                           timeout=120, what="the export to finish")
    assert job.state == "succeeded", job.error
    # (SIGTERM to the whole group, as systemd sends it, may interrupt an attempt twice)
    assert big.attempts(job_id) >= len(points) + 1
    return job_id, beyond


def test_sigkill_at_six_points_gives_a_byte_identical_csv(big):
    job_id, beyond = run_with_interruptions(
        big, "csv", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9], signal.SIGKILL)
    final = (big.path / "exports" / f"job-{job_id}.csv").read_bytes()
    assert final == big.inline_export("csv").read_bytes()
    assert final.count(b"\n") > 100_000 - 1000  # globex holds about half the rows
    assert any(b > 0 for b in beyond), "some kill left bytes past the checkpoint, cut back"
    assert not list((big.path / "exports").glob(f"job-{job_id}.*.part"))


def test_sigkill_csv_gz_resumes_to_a_valid_gzip_of_the_same_csv(big):
    job_id, _ = run_with_interruptions(big, "csv.gz", [0.2, 0.5, 0.8], signal.SIGKILL)
    final = (big.path / "exports" / f"job-{job_id}.csv.gz").read_bytes()
    assert gzip.decompress(final) == big.inline_export("csv").read_bytes()


def test_sigterm_at_three_points_gives_a_byte_identical_csv(big):
    # SIGTERM to the whole group, as systemd sends it: the worker process may be stopped
    # mid-batch (KeyboardInterrupt) and leave bytes past its checkpoint, which are cut back.
    job_id, _ = run_with_interruptions(big, "csv", [0.15, 0.45, 0.75], signal.SIGTERM)
    final = (big.path / "exports" / f"job-{job_id}.csv").read_bytes()
    assert final == big.inline_export("csv").read_bytes()
