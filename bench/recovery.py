"""How soon does a killed export run again? An export's `flask worker exports` consumer is
SIGKILLed (its whole process group) while the export runs, then started again at once.

  same host:     the restarted consumer finds the job claimed by a worker process of its own
                 host that no longer exists and puts it back on the lane (target: running again
                 within 5 s of the restart);
  another host:  the dead worker claimed the job as another host (WORKER_HOST), so nothing here
                 can know it died: the job waits for its lease to lapse and the reconciler's
                 next pass (target: within JOB_LEASE + RECONCILE_INTERVAL of the kill).

Times are from the restart (same host) or the kill (another host) to the job's next attempt
starting, read from job_attempts. SQLite, default lane settings but the lease and interval.

    .venv/bin/python bench/recovery.py [--runs 5] [--lease 10] [--reconcile 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, insert, select, update
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from starvation import start, stop  # noqa: E402

from jobs.models import ExportJob, JobAttempt, User  # noqa: E402


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def naive_utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def measure(env: dict, db, folder: Path, other_host: bool, run: int) -> float:
    """Kill the consumer running an export, restart it; seconds until the export runs again."""
    with db.begin() as conn:
        user_id, org_id = conn.execute(select(User.id, User.org_id)
                                       .where(User.email == "bob@globex.test")).one()
        job_id = conn.execute(insert(ExportJob.__table__).values(
            user_id=user_id, org_id=org_id, dataset="transactions", params={},
            format="csv")).inserted_primary_key[0]

    def attempts() -> list:
        with db.connect() as conn:
            return conn.execute(select(JobAttempt.started_at).where(JobAttempt.job_id == job_id)
                                .order_by(JobAttempt.number)).all()

    first_env = {**env, "WORKER_HOST": "elsewhere"} if other_host else env
    first = start("exports", first_env, folder / f"exports-{run}-a.log")
    try:
        wait(lambda: attempts(), 60, "the export to start")
        time.sleep(0.5)
    finally:
        stop([first])
    killed = time.time()
    second = start("exports", env, folder / f"exports-{run}-b.log")
    restarted = time.time()
    try:
        resumed = wait(lambda: len(rows := attempts()) > 1 and rows[1].started_at, 120,
                       "the export to run again")
    finally:
        stop([second])
        with db.begin() as conn:  # so it does not take a worker from the next run
            conn.execute(update(ExportJob).where(ExportJob.id == job_id)
                         .values(state="cancelled"))
    return (resumed - naive_utc(killed if other_host else restarted)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lease", type=float, default=10.0, help="JOB_LEASE, seconds")
    parser.add_argument("--reconcile", type=float, default=5.0, help="RECONCILE_INTERVAL")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="exportdesk-recovery-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "INSTANCE_PATH": tmp, "FLASK_APP": "webapp", "BROKER_URL": "",
               "DATABASE_URL": f"sqlite:///{folder / 'exportdesk.db'}",
               "JOB_LEASE": str(args.lease), "RECONCILE_INTERVAL": str(args.reconcile),
               "RECONCILE_GRACE": "1", "LANE_EXPORTS_RETRIES": "50",
               "EXPORT_BATCH_ROWS": "200", "EXPORTS_RUNNING_PER_USER": "10"}
        for command in (["db", "upgrade"], ["seed", "--rows", str(args.rows)]):
            subprocess.run([sys.executable, "-m", "flask", *command], cwd=ROOT, env=env,
                           check=True, capture_output=True)
        db = create_engine(env["DATABASE_URL"], poolclass=NullPool)
        critical = start("critical", env, folder / "critical.log")  # runs the reconciler
        try:
            results = {
                "same host (from the restart)": [measure(env, db, folder, False, n)
                                                 for n in range(args.runs)],
                "another host (from the kill)": [measure(env, db, folder, True, 100 + n)
                                                 for n in range(args.runs)],
            }
        finally:
            stop([critical])
    bound = args.lease + args.reconcile
    print(f"\nexport running again after its consumer was SIGKILLed and restarted "
          f"({args.runs} runs each; JOB_LEASE={args.lease:g} s, "
          f"RECONCILE_INTERVAL={args.reconcile:g} s)")
    print(f"{'dead worker of':<30} {'p50 s':>7} {'max s':>7} {'target s':>9}  met")
    for (name, seconds), target in zip(results.items(), (5.0, bound), strict=True):
        print(f"{name:<30} {statistics.median(seconds):>7.2f} {max(seconds):>7.2f} "
              f"{target:>9.1f}  {'yes' if max(seconds) <= target else 'NO'}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
