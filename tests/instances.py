"""A private exportdesk instance for tests that start real consumers and kill them: its own
folder, database (SQLite, or a fresh PostgreSQL one) and SQLite lanes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import (
    ROOT,
    TEST_DATABASE_URL,
    database_for,
    drop_database,
    migrate_and_seed,
    wait_for,
)
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from jobs.models import ExportJob, JobAttempt, User


class Instance:
    """Seeded with `rows` transactions; consumers run with `consumer_env` on top. `env` is
    for every command (e.g. DATASETS_FILE and SOURCE_DATABASE_URL), consumers' included."""

    def __init__(self, path: Path, rows: int, consumer_env: dict[str, str],
                 user: str = "bob@globex.test", env: dict[str, str] | None = None):
        self.path, self.user, self.consumer_env = path, user, consumer_env
        path.mkdir(parents=True, exist_ok=True)  # its consumers' logs live here (any database)
        self.exports = Path(consumer_env.get("EXPORT_DIR") or path / "exports")
        self.env = {**os.environ, "INSTANCE_PATH": str(path), "FLASK_APP": "webapp",
                    "PYTHONUNBUFFERED": "1", "BROKER_URL": "", "DATABASE_URL": database_for(path),
                    **(env or {})}
        self.db = create_engine(self.env["DATABASE_URL"], poolclass=NullPool)
        migrate_and_seed(self.env, rows)
        self._inline: dict[tuple, Path] = {}

    def close(self) -> None:
        self.db.dispose()
        if TEST_DATABASE_URL:
            drop_database(TEST_DATABASE_URL, self.env["DATABASE_URL"])

    def new_job(self, fmt: str, dataset: str = "transactions", params: dict | None = None) -> int:
        """A queued job nobody has sent yet: the reconciler in the critical consumer sends it."""
        with self.db.begin() as conn:
            user_id, org_id = conn.execute(
                select(User.id, User.org_id).where(User.email == self.user)).one()
            return conn.execute(insert(ExportJob.__table__).values(
                user_id=user_id, org_id=org_id, dataset=dataset, params=params or {},
                format=fmt)).inserted_primary_key[0]

    def job(self, job_id: int):
        with self.db.connect() as conn:
            return conn.execute(select(ExportJob.__table__)
                                .where(ExportJob.id == job_id)).one()

    def attempts(self, job_id: int) -> list:
        with self.db.connect() as conn:
            return conn.execute(select(JobAttempt.__table__).where(JobAttempt.job_id == job_id)
                                .order_by(JobAttempt.number)).all()

    def count(self, table, *where) -> int:
        with self.db.connect() as conn:
            return conn.execute(select(func.count()).select_from(table).where(*where)
                                ).scalar_one()

    def scalar(self, column, *where):
        with self.db.connect() as conn:
            return conn.execute(select(column).where(*where)).scalar_one()

    def file(self, job_id: int) -> bytes:
        """The bytes a download of the job serves."""
        return (self.exports / self.job(job_id).file_name).read_bytes()

    def inline_export(self, fmt: str, dataset: str = "transactions", **env: str) -> Path:
        """The same export run inline by `flask export` (once per format, dataset and `env`
        on top of the instance's, e.g. another DATASETS_FILE)."""
        key = (fmt, dataset, tuple(sorted(env.items())))
        if key not in self._inline:
            out = self.path / f"inline{len(self._inline)}.{fmt}"
            done = subprocess.run([sys.executable, "-m", "flask", "export", dataset,
                                   "--user", self.user, "--format", fmt, "--output", str(out)],
                                  cwd=ROOT, env={**self.env, **env}, capture_output=True)
            assert done.returncode == 0, done.stderr.decode(errors="replace")
            self._inline[key] = out
        return self._inline[key]

    @contextmanager
    def worker(self, lane: str, name: str, **env: str):
        """`flask worker LANE` in its own session; its whole group is SIGKILLed at the end."""
        log = self.path / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "flask", "worker", lane], cwd=ROOT,
                                env={**self.env, **self.consumer_env, **env},
                                stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(lambda: "Huey consumer started" in log.read_text()
                     or proc.poll() is not None, what=f"{name} to start")
            assert proc.poll() is None, log.read_text()
            yield proc
        finally:
            kill_group(proc)

    @contextmanager
    def killed_and_resumed(self, fmt: str, step: str):
        """A new `fmt` job whose exports consumer SIGKILLs itself at `step` (FAULT_INJECT,
        jobs.checkpoints.fault), then an exports consumer started again: yields the job once it
        has ended (succeeded or failed), while that consumer still runs."""
        job_id = self.new_job(fmt)
        with self.worker("exports", f"faulty-{job_id}", FAULT_INJECT=step) as proc:
            proc.wait(120)  # it kills itself at the step
        assert proc.returncode == -9, "the fault fired"
        killed = self.job(job_id)
        assert killed.state == ("succeeded" if step == "committed" else "running"), killed.error
        with self.worker("exports", f"after-{job_id}"):
            yield wait_for(lambda: (j := self.job(job_id)).state in ("succeeded", "failed")
                           and j, timeout=120, what="the export to finish")

    def attempts_after_kill(self, job, step: str) -> list:
        """The attempts of a job `killed_and_resumed` at `step`, checked: one when it was
        killed after its commit (nothing ran again), else the lost one and the one that
        succeeded; killed once its file was published, the file is the first attempt's."""
        attempts = self.attempts(job.id)
        if step == "committed":
            assert len(attempts) == 1, "nothing ran again"
        else:
            assert [a.outcome for a in attempts] == ["lost", "succeeded"], \
                [(a.outcome, a.error, (a.traceback or "")[-1500:]) for a in attempts]
        if step == "published":  # finished without writing the file again
            assert job.file_name == f"job-{job.id}.a1.{job.format}"
        return attempts


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(30)


def pause_outside_a_write(pid: int, database_url: str, job_id: int) -> None:
    """SIGSTOP the worker, but not while it holds a lock the web's cancel needs (SQLite's write
    lock, PostgreSQL's lock on the job's row): else the cancel would wait for a stopped worker.
    A stopped worker is one that has not yet reached its next checkpoint."""
    engine = create_engine(database_url, poolclass=NullPool,
                           connect_args={"timeout": 0.2} if database_url.startswith("sqlite")
                           else {})
    try:
        for _ in range(50):
            os.kill(pid, signal.SIGSTOP)
            try:
                with engine.connect() as conn:
                    if conn.dialect.name == "sqlite":
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                    else:
                        conn.execute(text("SELECT id FROM export_jobs WHERE id = :id "
                                          "FOR UPDATE NOWAIT"), {"id": job_id})
                    conn.rollback()
                return
            except OperationalError:
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.01)
    finally:
        engine.dispose()
    raise AssertionError("the worker always held the lock")
