"""Does a saturated exports lane delay urgent tasks? Enqueue-to-start latency of 500 critical
tasks while every export worker is busy and more exports wait, on SQLite, Redis and PostgreSQL
lanes, against the classic single shared queue.

    .venv/bin/python bench/starvation.py [--pings 500] [--rate 50] [--redis-url URL]
        [--postgres-url URL] [--hosts 2]

With --hosts 2 the consumers run on two "hosts", each its own instance folder with a critical
and an exports consumer, sharing nothing but PostgreSQL (the app's database) and the broker,
as in docs/operations.md; SQLite lanes cannot be shared, so only Redis and PostgreSQL run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def start(lane: str, env: dict, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "flask", "worker", lane], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while "Huey consumer started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"consumer {lane} did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@contextmanager
def database(server: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server `server`, dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, make_url

    url = make_url(server)
    name = f"exportdesk_starvation_{secrets.token_hex(4)}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


def scenario(name: str, broker: str, shared: bool, args, workdir: Path,
             database_url: str = "") -> list[float]:
    """Saturate the exports lane, then send pings at a steady rate; latencies in ms. The
    consumers run on `args.hosts` hosts, each its own instance folder; the app's database is
    `database_url`, or a SQLite file of the first host's."""
    from jobs import lanes

    scene = workdir / name.replace(" ", "-")
    homes = [scene / f"host{n + 1}" for n in range(args.hosts)]
    for home in homes:
        home.mkdir(parents=True)
    probe_log = scene / "probe.log"  # the bench's own measurement, not state the hosts share
    env = {**os.environ, "FLASK_APP": "webapp", "BROKER_URL": broker, "TASK_MODULES": "_probe",
           "PROBE_LOG": str(probe_log), "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}",
           "RECONCILE_INTERVAL": "3600",
           "DATABASE_URL": database_url or f"sqlite:///{homes[0] / 'exportdesk.db'}"}
    hosts = [{**env, "INSTANCE_PATH": str(home), "WORKER_HOST": home.name} for home in homes]
    # The classic setup: one queue whose workers do everything (as many as both lanes have).
    workers = lanes.critical.settings.workers + lanes.exports.settings.workers
    if shared:
        for host in hosts:
            host["LANE_EXPORTS_WORKERS"] = str(workers)
    subprocess.run([sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=hosts[0],
                   check=True, capture_output=True)
    os.environ.update(PROBE_LOG=str(probe_log))
    lanes.configure(broker, homes[0])  # (SQLite lanes: the one host's files)
    for lane in lanes.LANES.values():
        lane.storage.flush_queue()
        lane.storage.flush_schedule()
    import _probe as probe

    probe.LOG = str(probe_log)
    procs = []
    try:
        for host, home in zip(hosts, homes, strict=True):
            procs.append(start("exports", host, home / "exports.log"))
            if not shared:
                procs.append(start("critical", host, home / "critical.log"))
        per_host = workers if shared else lanes.exports.settings.workers
        busy = per_host * args.hosts + args.queued_exports
        for _ in range(busy):
            probe.hog(args.export_seconds)
        time.sleep(1.0)  # every export worker is now inside a long export
        send = probe.ping_shared if shared else probe.ping
        interval = 1.0 / args.rate
        next_at = time.monotonic()
        for _ in range(args.pings):
            next_at += interval
            send(time.time())
            time.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + args.export_seconds * 4 + 60
        while time.monotonic() < deadline:
            lines = probe_log.read_text().splitlines() if probe_log.exists() else []
            if len(lines) >= args.pings:
                break
            time.sleep(0.1)
        depth = lanes.exports.pending_count()
    finally:
        stop(procs)
        for lane in lanes.LANES.values():
            lane.storage.flush_queue()
            lane.storage.flush_schedule()
            if hasattr(lane.storage, "close"):
                lane.storage.close()
    latencies = [(float(b) - float(a)) * 1000 for a, b in (line.split() for line in lines)]
    if len(latencies) < args.pings:
        print(f"  {name}: only {len(latencies)} of {args.pings} pings started in time")
    print(f"  {name}: done ({len(latencies)} pings, {depth} exports still queued at the end)",
          flush=True)
    return latencies


def reachable(what: str, check) -> bool:
    """Whether a service answers; if not, says so (its rows are left out)."""
    try:
        check()
    except Exception as exc:  # the line says why
        print(f"  {what} unavailable: {exc}")
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="pings per second")
    parser.add_argument("--export-seconds", type=float, default=10.0)
    parser.add_argument("--queued-exports", type=int, default=20)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/4"))
    parser.add_argument("--postgres-url", help="a server to make the bench's databases on",
                        default=os.environ.get("BENCH_POSTGRES_URL", PG_DEFAULT))
    parser.add_argument("--hosts", type=int, default=1, choices=(1, 2),
                        help="worker hosts, each with a critical and an exports consumer")
    args = parser.parse_args()
    import redis
    from sqlalchemy import create_engine

    from jobs import lanes

    poll_ms = lanes.critical.settings.poll_interval * 1000
    print(f"starvation: {args.pings} critical tasks at {args.rate:g}/s while every export "
          f"worker runs a {args.export_seconds:g} s export and {args.queued_exports} more wait"
          f"{f', on {args.hosts} worker hosts' if args.hosts > 1 else ''}", flush=True)
    redis_ok = reachable(f"Redis at {args.redis_url}",
                         lambda: redis.Redis.from_url(args.redis_url).ping())
    postgres_ok = reachable(f"PostgreSQL at {args.postgres_url}",
                            lambda: create_engine(args.postgres_url).connect().close())
    if args.hosts > 1 and not (redis_ok and postgres_ok):
        raise SystemExit("--hosts 2 needs PostgreSQL (the hosts' database) and Redis")
    rows = []
    with tempfile.TemporaryDirectory(prefix="exportdesk-bench-") as tmp:
        work = Path(tmp)
        if args.hosts == 1:
            rows.append(("(a) isolated lanes, SQLite", poll_ms + 50,
                         scenario("a sqlite", "", False, args, work)))
        with database(args.postgres_url) if args.hosts > 1 else nullcontext("") as app_db:
            if redis_ok:
                rows.append(("(b) isolated lanes, Redis", 20.0,
                             scenario("b redis", args.redis_url, False, args, work, app_db)))
            if postgres_ok:
                with database(args.postgres_url) as lane_db:
                    rows.append(("(d) isolated lanes, PostgreSQL", 20.0,
                                 scenario("d postgresql", lane_db, False, args, work, app_db)))
            shared_broker = args.redis_url if args.hosts > 1 else ""
            rows.append(("(c) one shared queue (baseline)", None,
                         scenario("c shared", shared_broker, True, args, work, app_db)))
    baseline_p99 = percentile(rows[-1][2], 99)
    print()
    print(f"{'setup':<34} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9} "
          f"{'p99 target':>11} {'p99 vs baseline':>16}")
    for label, target, values in rows:
        p50, p95, p99 = (percentile(values, p) for p in (50, 95, 99))
        verdict = "" if target is None else f"≤{target:.0f} {'ok' if p99 <= target else 'MISS'}"
        ratio = f"{p99 / baseline_p99:.4f}×" if target is not None else "1×"
        print(f"{label:<34} {len(values):>4} {p50:>9.1f} {p95:>9.1f} {p99:>9.1f} "
              f"{max(values):>9.1f} {verdict:>11} {ratio:>16}")
    print(f"(mean of the baseline: {statistics.mean(rows[-1][2]):.0f} ms)")


if __name__ == "__main__":
    # SIGTERM as Ctrl-C: unwind, so every consumer this bench started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
