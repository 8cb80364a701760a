"""Export speed and memory: exportdesk's engine against the database's own CSV tool and the
tutorial pattern (ORM objects, OFFSET pages); peak RSS of the worker by export size.

    python bench/export.py                 # 1M rows for speed; RSS at 100k, 1M and 5M
    python bench/export.py --quick         # 200k rows; RSS at 20k, 100k and 200k
    python bench/export.py --rows 5000000 --rss 100000,5000000 --postgres URL

Every export reads a declared dataset (a datasets file, DATASETS_FILE) from a source database
of its own (SOURCE_DATABASE_URL, a copy of the seeded one), as a team's own data is read; the
database's own tool reads that same source database.

Each timed export runs in a child process; its peak RSS comes from wait4()'s ru_maxrss. The
peak RSS by size is a real exports consumer's worker process (and its SQLite reader) running
the job, read from /proc while it runs. The engine
and the database's own tool run in turns, --repeat times each (default 3), and each reports
its best time: this machine's speed drifts during a run, and turns expose both to the drift.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
USER = "alice@acme.test"


DATASET = "ledger"
DATASETS_TOML = """
[[dataset]]
name = "ledger"
title = "Ledger"
table = "transactions"
key = "id"
tenant = "org_id"
tenant_kind = "int"
columns = [
  { name = "id", kind = "int" },
  { name = "created_at", kind = "datetime" },
  { name = "amount", kind = "decimal", scale = 2 },
  { name = "currency", kind = "text" },
  { name = "status", kind = "text" },
  { name = "customer_email", kind = "text" },
  { name = "description", kind = "text" },
]
"""


def _env(instance: Path, database_url: str, source_url: str = "") -> dict:
    datasets = instance / "datasets.toml"
    datasets.write_text(DATASETS_TOML)
    return {**os.environ, "INSTANCE_PATH": str(instance), "DATABASE_URL": database_url,
            "SOURCE_DATABASE_URL": source_url, "DATASETS_FILE": str(datasets),
            "FLASK_APP": "webapp", "BROKER_URL": "", "PYTHONPATH": str(ROOT)}


def source_copy(instance: Path, database_url: str, server: str = "") -> str:
    """The team's database: a copy of the seeded one, which exports read as their source."""
    if not server:
        copy = instance / "team.db"
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as seeded, \
                sqlite3.connect(copy) as target:
            seeded.backup(target)
        return f"sqlite:///{copy}"
    return pg_database(server, "exportdesk_bench_source", template=database_url)


def prepare(instance: Path, database_url: str, rows: int) -> None:
    """Migrate and seed `rows` transactions, then give every one to acme (alice's org)."""
    env = _env(instance, database_url)
    flask = [sys.executable, "-m", "flask"]
    subprocess.run([*flask, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([*flask, "seed", "--rows", str(rows)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("update transactions set org_id = "
                          "(select id from organisations where slug = 'acme')"))
    if engine.dialect.name == "postgresql":  # fresh statistics, no dead rows from the update
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("vacuum analyze transactions"))
    engine.dispose()


def export_sql(database_url: str) -> str:
    """The whole export as one query for the database's own CSV tool: on PostgreSQL the
    engine's COPY query; on SQLite the same values, formatted in SQL as a sqlite3 user would."""
    from sqlalchemy import create_engine, text

    from jobs.csvrows import FORMULA_PREFIXES
    from jobs.dataset_file import load
    from jobs.postgres_pages import copy_query

    declared = Path(tempfile.mkdtemp()) / "datasets.toml"
    declared.write_text(DATASETS_TOML)

    engine = create_engine(database_url)
    with engine.connect() as conn:
        org = conn.execute(text("select id from organisations where slug = 'acme'")).scalar()
    engine.dispose()
    if engine.dialect.name == "postgresql":
        stmt = copy_query(load(declared)[DATASET], org, {}, None, None)
        return str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
    prefixes = ", ".join(f"char({ord(p)})" for p in FORMULA_PREFIXES)
    texts = ", ".join(f"CASE WHEN substr({c}, 1, 1) IN ({prefixes}) THEN '''' || {c} ELSE {c} END"
                      for c in ("currency", "status", "customer_email", "description"))
    return (f"SELECT id, substr(created_at, 1, 19), printf('%.2f', amount), {texts} "
            f"FROM transactions WHERE org_id = {int(org)} ORDER BY id")


def measure(cmd: list[str], env: dict, out: Path, timing: Path | None = None
            ) -> tuple[float, int, int]:
    """Seconds, peak RSS and its reader's peak RSS (bytes) of one child process writing its
    stdout to `out`; for a Python child, its own figures (without interpreter start-up) from
    `timing`."""
    with out.open("wb") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    if timing is not None:
        own = json.loads(timing.read_text())
        return own["seconds"], own["rss"], own["reader_rss"]
    return seconds, usage.ru_maxrss * 1024, 0


def best_of(repeat: int, *runs: Callable[[], tuple[float, int, int]]
            ) -> list[tuple[float, int, int]]:
    """Each run `repeat` times, in turns: per run, its best seconds and its highest RSS."""
    results: list[list[tuple[float, int, int]]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, seen in zip(runs, results, strict=True):
            seen.append(run())
    return [(min(r[0] for r in seen), max(r[1] for r in seen), max(r[2] for r in seen))
            for seen in results]


def child(kind: str, out: str) -> None:
    """Run one export in this process (called as a child by the parent). On SQLite the
    engine reads through a reader process (jobs.sqlite_reader): its peak RSS is reported too."""
    from webapp import create_app

    app = create_app()
    started = time.perf_counter()
    with app.app_context():
        _export(app, kind, out)
    Path(out + ".json").write_text(json.dumps({
        "seconds": time.perf_counter() - started,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "reader_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }))


def submit() -> None:
    """Record an export for USER and send it to the exports lane, as the web app does; print
    its id."""
    from jobs import dispatch
    from jobs.models import ExportJob, db
    from webapp import create_app
    from webapp.auth import find_user

    with create_app().app_context():
        user = find_user(USER)
        job = ExportJob(user=user, org_id=user.org_id, dataset=DATASET, params={},
                        format="csv")
        db.session.add(job)
        db.session.flush()
        dispatch.submit(job)
        db.session.commit()
        print(job.id)


def _peak_rss(pid: int) -> int:
    """VmHWM in bytes, or 0 for a process that is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for threads in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in threads.read_text().split()]
        except OSError:
            pass
    return found


def worker_rss(inst: Path, env: dict, me: list[str]) -> tuple[int, int]:
    """Peak RSS of a real exports worker process and of its SQLite reader during one export:
    `flask worker exports` with one worker process, the job sent as the web app sends it. The
    worker is the pid in the job's claim; the peaks (VmHWM) are read every 2 ms, so a reader is
    last read within 2 ms of its end."""
    env = {**env, "LANE_EXPORTS_WORKERS": "1"}
    # Sent before the consumer starts, so the watch below begins before the export can.
    job_id = int(subprocess.run([*me, "--child", "submit"], cwd=ROOT, env=env, check=True,
                                capture_output=True, text=True).stdout)
    consumer = subprocess.Popen([sys.executable, "-m", "flask", "worker", "exports"], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    worker = reader = 0
    try:
        database = sqlite3.connect(f"file:{inst / 'exportdesk.db'}?mode=ro", uri=True)
        deadline = time.monotonic() + 600
        pid = None
        while time.monotonic() < deadline:
            state, claim = database.execute("select state, claimed_by from export_jobs "
                                            "where id = ?", (job_id,)).fetchone()
            if state in ("succeeded", "failed", "cancelled"):
                break
            pid = pid or (claim and int(claim.split(":")[-1].split("#")[0]))
            if not pid:
                time.sleep(0.002)
                continue
            for _ in range(25):  # the database is read every 50 ms, the processes every 2
                worker = max(worker, _peak_rss(pid))
                for child in _children(pid):
                    reader = max(reader, _peak_rss(child))
                time.sleep(0.002)
        if state != "succeeded":
            raise RuntimeError(f"export {job_id} ended {state}")
        # The worker process lives on: its high-water mark also covers an export that ended
        # between two looks (the reader's, gone with it, is then its last sample).
        claim = database.execute("select worker from job_attempts where job_id = ? "
                                 "order by number desc", (job_id,)).fetchone()[0]
        database.close()
        worker = max(worker, _peak_rss(int(claim.split(":")[-1])))
        if not worker:
            raise RuntimeError(f"the worker of export {job_id} ({claim}) was not found")
    finally:
        os.killpg(consumer.pid, signal.SIGINT)
        consumer.wait(60)
    return worker, reader


def _export(app, kind: str, out: str) -> None:
    from jobs.models import ExportJob, db
    from webapp.auth import find_user

    user = find_user(USER)
    if kind == "engine":  # the real thing: job row, checkpoints, progress, publish
        from jobs import engine

        job = ExportJob(user=user, org_id=user.org_id, dataset=DATASET, params={},
                        format="csv")
        db.session.add(job)
        db.session.commit()
        engine.run(job.id, max_attempts=1)
        db.session.refresh(job)
        assert job.state == "succeeded", job.error
        shutil.move(Path(app.config["EXPORT_DIR"]) / job.file_name, out)
        return
    import csv  # the tutorial pattern: ORM objects, csv.writer, OFFSET pages

    from jobs.models import Transaction

    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "created_at", "amount", "currency", "status",
                         "customer_email", "description"])
        offset = 0
        while True:
            page = (Transaction.query.filter_by(org_id=user.org_id)
                    .order_by(Transaction.id).offset(offset).limit(5000).all())
            if not page:
                break
            for t in page:
                writer.writerow([t.id, t.created_at, t.amount, t.currency, t.status,
                                 t.customer_email, t.description])
            offset += len(page)
            db.session.expunge_all()


def pg_database(server: str, name: str, template: str = "") -> str:
    """An empty database `name` on `server` (dropped first), or a copy of `template`'s."""
    from sqlalchemy import create_engine, make_url

    url = make_url(server)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"{copy}')
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the speed runs")
    parser.add_argument("--rss", default="100000,1000000,5000000", help="sizes for peak RSS")
    parser.add_argument("--floor-rows", type=int, default=200_000,
                        help="rows for the tutorial pattern (OFFSET is quadratic)")
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL", PG_DEFAULT),
                        help="PostgreSQL server URL ('' to skip)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the engine and of the reference tool, in turns (best)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--child", choices=["engine", "tutorial", "submit"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "submit":
        submit()
        return
    if args.child:
        child(args.child, args.out)
        return
    if args.quick:
        args.rows, args.rss, args.floor_rows = 200_000, "20000,100000,200000", 50_000
    rss_sizes = [int(s) for s in args.rss.split(",")]
    me = [sys.executable, str(Path(__file__).resolve())]
    work = Path(tempfile.mkdtemp(prefix="exportdesk-bench-"))
    table: list[tuple[str, int, float, int, int]] = []  # label, rows, seconds, rss, reader
    try:
        # SQLite: speed at --rows, against sqlite3 -csv and the tutorial pattern.
        sizes = sorted({args.rows, args.floor_rows, *rss_sizes})
        rss: dict[int, tuple[int, int]] = {}  # rows: worker, reader
        for size in sizes:
            inst = work / f"sqlite-{size}"
            inst.mkdir()
            url = f"sqlite:///{inst / 'exportdesk.db'}"
            print(f"seeding SQLite with {size:,} rows …", file=sys.stderr)
            prepare(inst, url, size)
            team = source_copy(inst, url)
            env = _env(inst, url, team)
            if size == args.rows:
                engine = [*me, "--child", "engine", "--out", str(inst / "e.csv")]
                tool = ["sqlite3", "-csv", "-header", str(inst / "team.db"), export_sql(url)]
                ours, cli = best_of(
                    args.repeat,
                    partial(measure, engine, env, inst / "stdout", inst / "e.csv.json"),
                    partial(measure, tool, env, inst / "cli.csv"))
                table.append(("exportdesk engine (SQLite)", size, *ours))
                table.append(("sqlite3 -csv", size, *cli))
            if size in rss_sizes:
                rss[size] = worker_rss(inst, env, me)
            if size == args.floor_rows:
                floor = measure([*me, "--child", "tutorial", "--out", str(inst / "t.csv")],
                                env, inst / "stdout", inst / "t.csv.json")
                table.append(("tutorial: ORM + OFFSET (SQLite)", size, *floor))
            if size not in (args.rows, args.floor_rows) and size != max(sizes):
                shutil.rmtree(inst)
        if args.postgres:
            url = pg_database(args.postgres, "exportdesk_bench")
            inst = work / "pg"
            inst.mkdir()
            try:
                print(f"seeding PostgreSQL with {args.rows:,} rows …", file=sys.stderr)
                prepare(inst, url, args.rows)
                team = source_copy(inst, url, args.postgres)
                env = _env(inst, url, team)
                psql_url = team.replace("+psycopg", "")
                copy = f"\\copy ({export_sql(url)}) to stdout with (format csv, header)"
                engine = [*me, "--child", "engine", "--out", str(inst / "e.csv")]
                ours, cli = best_of(
                    args.repeat,
                    partial(measure, engine, env, inst / "stdout", inst / "e.csv.json"),
                    partial(measure, ["psql", psql_url, "-q", "-c", copy], env, inst / "cli.csv"))
                table.append(("exportdesk engine (PostgreSQL)", args.rows, *ours))
                table.append(("psql \\copy", args.rows, *cli))
            finally:
                for name in ("exportdesk_bench_source", "exportdesk_bench"):  # leave them empty
                    pg_database(args.postgres, name)
        report(table, rss)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(table: list[tuple[str, int, float, int, int]],
           rss: dict[int, tuple[int, int]]) -> None:
    rate = {label: rows / seconds for label, rows, seconds, *_ in table}
    print(f"\n{'export (best of the turns)':36} {'rows':>10} {'seconds':>8} {'rows/s':>10} "
          f"{'peak RSS':>9} {'+ reader':>9}")
    for label, rows, seconds, peak, reader in table:
        print(f"{label:36} {rows:>10,} {seconds:>8.2f} {rows / seconds:>10,.0f} "
              f"{peak / 2**20:>7.0f}MB {f'{reader / 2**20:.0f}MB' if reader else '':>9}")
    print()
    pairs = [("exportdesk engine (SQLite)", "sqlite3 -csv", 1.0),
             ("exportdesk engine (PostgreSQL)", "psql \\copy", 0.9),
             ("exportdesk engine (SQLite)", "tutorial: ORM + OFFSET (SQLite)", None)]
    for ours, theirs, target in pairs:
        if ours in rate and theirs in rate:
            ratio = rate[ours] / rate[theirs]
            goal = f"target ≥ {target:.1f}× {'met' if ratio >= target else 'MISSED'}" \
                if target else "floor"
            print(f"{ours} / {theirs}: {ratio:.2f}×  ({goal})")
    sizes = sorted(rss)
    print("\npeak RSS by export size (SQLite), in `flask worker exports`: the worker process "
          "+ its reader = both")
    for size in sizes:
        worker, reader = rss[size]
        print(f"  {size:>10,} rows: {worker / 2**20:6.1f} MB + {reader / 2**20:6.1f} MB "
              f"= {(worker + reader) / 2**20:6.1f} MB")
    if len(sizes) > 1:  # the target holds for the worker with its reader, not each alone
        small, large = (sum(rss[size]) for size in (sizes[0], sizes[-1]))
        ok = large <= 1.2 * small and large < 200 * 2**20
        print(f"  worker + reader: largest / smallest {large / small:.2f}×, largest "
              f"{large / 2**20:.0f} MB (target ≤ 1.2× and < 200 MB: {'met' if ok else 'MISSED'})")


if __name__ == "__main__":
    main()
