r"""Export speed and memory: exportdesk's engine against the database's own CSV tool and the
tutorial pattern (ORM objects, OFFSET pages); peak RSS of the worker by export size.

    python bench/export.py                 # 1M rows for speed; RSS at 100k, 1M and 5M
    python bench/export.py --quick         # 200k rows; RSS at 20k, 100k and 200k
    python bench/export.py --rows 5000000 --rss 100000,5000000 --postgres URL
    python bench/export.py --formats csv   # only csv (default csv,csv.gz,xlsx)
    python bench/export.py --storage s3    # also into a bucket (moto), in turns with the folder

The reference is the plain command a user would type instead: `sqlite3 -csv -header db "select
<the columns> … where org_id = … order by id"` or `psql -c "\copy (…) to stdout with (format csv,
header)"`, and the same piped into `gzip -6` for csv.gz (xlsx is held against the plain csv).
A second line runs the tool on a query that formats the values as the engine does (formula
prefixes, two-decimal amounts, timestamps to the second): the same bytes, the tool's own speed.

Every export reads a declared dataset (a datasets file, DATASETS_FILE) from a source database
of its own (SOURCE_DATABASE_URL, a copy of the seeded one), as a team's own data is read; the
database's own tool reads that same source database.

Each export is a job sent, as the web app sends it, to a real `flask worker exports` (one worker
process), with checkpoints, progress, publish and the owner's email on; its time is the job's
own, from `started_at` (claimed) to `finished_at` (published), and its peak RSS the worker's
high-water mark so far (the reader's too: an SQLite export whose values are not canonical has
one). The tool's time is its process's, from start to exit. The engine and the tool run in
turns, --repeat times each (default 3), and each reports its best time: this machine's speed
drifts during a run, and turns expose both to the drift. The peak RSS by size is measured
apart, on a worker of its own per export, read from /proc while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
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


COLUMNS = "id, created_at, amount, currency, status, customer_email, description"


def _acme(database_url: str) -> tuple[str, int]:
    """The database's dialect name and acme's organisation id."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        org = conn.execute(text("select id from organisations where slug = 'acme'")).scalar()
    engine.dispose()
    return engine.dialect.name, int(org)


def plain_sql(database_url: str) -> str:
    """The query a user would type: the dataset's columns as stored, acme's rows, in key order."""
    _, org = _acme(database_url)
    return f"SELECT {COLUMNS} FROM transactions WHERE org_id = {org} ORDER BY id"


def export_sql(database_url: str) -> str:
    """The whole export as one query that formats the values as the engine does: on
    PostgreSQL the engine's COPY query; on SQLite the same values, formatted in SQL."""
    from jobs.csvrows import FORMULA_PREFIXES
    from jobs.dataset_file import load
    from jobs.postgres_pages import copy_query

    declared = Path(tempfile.mkdtemp()) / "datasets.toml"
    declared.write_text(DATASETS_TOML)

    dialect, org = _acme(database_url)
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        stmt = copy_query(load(declared)[DATASET], org, {}, None, None)
        return str(stmt.compile(dialect=postgresql.dialect(),
                                compile_kwargs={"literal_binds": True}))
    prefixes = ", ".join(f"char({ord(p)})" for p in FORMULA_PREFIXES)
    texts = ", ".join(f"CASE WHEN substr({c}, 1, 1) IN ({prefixes}) THEN '''' || {c} ELSE {c} END"
                      for c in ("currency", "status", "customer_email", "description"))
    return (f"SELECT id, substr(created_at, 1, 19), printf('%.2f', amount), {texts} "
            f"FROM transactions WHERE org_id = {org} ORDER BY id")


Run = tuple[float, int, int, int]  # seconds, peak RSS, its reader's peak RSS, bytes written


def measure(cmd: list[str], env: dict, out: Path, timing: Path | None = None) -> Run:
    """Seconds, peak RSS and its reader's peak RSS (bytes) of one child process writing its
    stdout to `out`, and the size of the file it made; for a Python child (the file is then
    `timing` without its .json), its own figures (without interpreter start-up) from
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
        made = timing.with_suffix("").stat().st_size
        return own["seconds"], own["rss"], own["reader_rss"], made
    return seconds, usage.ru_maxrss * 1024, 0, out.stat().st_size


def best_of(repeat: int, *runs: Callable[[], Run]) -> list[Run]:
    """Each run `repeat` times, in turns: per run, its best seconds and its highest RSS."""
    results: list[list[Run]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, seen in zip(runs, results, strict=True):
            seen.append(run())
    return [(min(r[0] for r in seen), max(r[1] for r in seen), max(r[2] for r in seen),
             seen[-1][3]) for seen in results]


def tutorial(out: str) -> None:
    """The tutorial pattern in this process (a child of the parent), timed without the
    interpreter's start-up."""
    from webapp import create_app

    app = create_app()
    started = time.perf_counter()
    with app.app_context():
        _tutorial(out)
    Path(out + ".json").write_text(json.dumps({
        "seconds": time.perf_counter() - started,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "reader_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }))


def submit(fmt: str) -> None:
    """Record an export for USER in `fmt` and send it to the exports lane, as the web app does;
    print its id."""
    from jobs import dispatch
    from jobs.models import ExportJob, db
    from webapp import create_app
    from webapp.auth import find_user

    with create_app().app_context():
        user = find_user(USER)
        job = ExportJob(user=user, org_id=user.org_id, dataset=DATASET, params={},
                        format=fmt)
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


def worker_rss(inst: Path, env: dict, me: list[str], fmt: str) -> tuple[int, int]:
    """Peak RSS of a real exports worker process and of its SQLite reader during one export:
    `flask worker exports` with one worker process, the job sent as the web app sends it. The
    worker is the pid in the job's claim; the peaks (VmHWM) are read every 2 ms, so a reader is
    last read within 2 ms of its end."""
    env = {**env, "LANE_EXPORTS_WORKERS": "1"}
    # Sent before the consumer starts, so the watch below begins before the export can.
    job_id = int(subprocess.run([*me, "--child", "submit", "--format", fmt], cwd=ROOT,
                                env=env, check=True, capture_output=True, text=True).stdout)
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


class Consumer:
    """A real `flask worker exports` (one worker process) that the speed runs send jobs to."""

    def __init__(self, env: dict, me: list[str]):
        from sqlalchemy import create_engine

        self.me, self.env = me, {**env, "LANE_EXPORTS_WORKERS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "flask", "worker", "exports"],
                                        cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        self.database = create_engine(env["DATABASE_URL"])
        self.worker = self.reader = 0  # peak RSS so far

    def run(self, fmt: str) -> Run:
        """One export: the job's own seconds, the worker's (and reader's) peak RSS so far,
        and the file's size."""
        from sqlalchemy import text

        job_id = int(subprocess.run([*self.me, "--child", "submit", "--format", fmt], cwd=ROOT,
                                    env=self.env, check=True, capture_output=True,
                                    text=True).stdout)
        deadline, pid = time.monotonic() + 1800, None
        while time.monotonic() < deadline:
            with self.database.connect() as conn:
                state, started, finished, size, claim = conn.execute(text(
                    "select state, started_at, finished_at, bytes, claimed_by "
                    "from export_jobs where id = :id"), {"id": job_id}).one()
            if state in ("succeeded", "failed", "cancelled"):
                break
            pid = pid or (claim and int(claim.split(":")[-1].split("#")[0]))
            if pid:
                self.worker = max(self.worker, _peak_rss(pid))
                for child_pid in _children(pid):
                    self.reader = max(self.reader, _peak_rss(child_pid))
            time.sleep(0.05)  # the job times itself: a gentle poll leaves the CPU to it
        if state != "succeeded":
            raise RuntimeError(f"export {job_id} ended {state}")
        if pid:
            self.worker = max(self.worker, _peak_rss(pid))
        seconds = (_moment(finished) - _moment(started)).total_seconds()
        return seconds, self.worker, self.reader, size

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)
        self.process.wait(60)
        self.database.dispose()


def _moment(value: object) -> datetime:
    """A timestamp as the database driver returns it (SQLite's as text)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _tutorial(out: str) -> None:
    """ORM objects, csv.writer, OFFSET pages."""
    import csv

    from jobs.models import Transaction, db
    from webapp.auth import find_user

    user = find_user(USER)

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


Row = tuple[str, str, str, int, Run]  # database, format, what ran, rows, its figures
ENGINE = "exportdesk"
IN_BUCKET = "exportdesk, into a bucket (moto)"
BUCKET: dict[str, str] = {}  # --storage s3: the settings of a bucket on a local moto server


def moto_bucket(work: Path) -> subprocess.Popen:
    """moto's S3 server, a process of its own on a free port, with a bucket; its settings go
    into BUCKET."""
    import socket

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([shutil.which("moto_server", path=Path(sys.executable).parent),
                               "-H", "127.0.0.1", "-p", str(port)],
                              stdout=(work / "moto.log").open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="bench")
            break
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.2)
    BUCKET.update(credentials, STORAGE_URL="s3://bench/exports", S3_ENDPOINT_URL=endpoint)
    return server
TARGETS = {"SQLite": 1.5, "PostgreSQL": 1.2}  # csv: at least this times the plain tool's speed


def speed(database: str, formats: list[str], me: list[str], inst: Path, env: dict, rows: int,
          repeat: int, tool: str, plain: list[str], formatted: list[str]) -> list[Row]:
    """The engine in each format (jobs sent to a real consumer) and the plain tool (csv, and
    piped into gzip -6 for csv.gz), then the tool on the formatting query, all in turns."""
    consumers = {ENGINE: Consumer(env, me)}
    if BUCKET:
        consumers[IN_BUCKET] = Consumer({**env, **BUCKET}, me)
    try:
        return _speed(consumers, database, formats, inst, env, rows, repeat, tool, plain,
                      formatted)
    finally:
        for consumer in consumers.values():
            consumer.stop()


def _speed(consumers: dict[str, Consumer], database: str, formats: list[str], inst: Path,
           env: dict, rows: int, repeat: int, tool: str, plain: list[str],
           formatted: list[str]) -> list[Row]:
    runs: list[tuple[str, str, Callable[[], Run]]] = []
    for fmt in formats:
        for label, consumer in consumers.items():
            runs.append((fmt, label, partial(consumer.run, fmt)))
    runs.append(("csv", f"{tool} (plain)", partial(measure, plain, env, inst / "plain.csv")))
    if "csv.gz" in formats:
        piped = ["sh", "-c", f"{shlex.join(plain)} | gzip -6"]
        runs.append(("csv.gz", f"{tool} | gzip -6",
                     partial(measure, piped, env, inst / "plain.csv.gz")))
    runs.append(("csv", f"{tool} (formatted in SQL)",
                 partial(measure, formatted, env, inst / "formatted.csv")))
    results = best_of(repeat, *(run for *_, run in runs))
    return [(database, fmt, label, rows, result)
            for (fmt, label, _), result in zip(runs, results, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the speed runs")
    parser.add_argument("--rss", default="100000,1000000,5000000",
                        help="sizes for peak RSS ('': none)")
    parser.add_argument("--formats", default="csv,csv.gz,xlsx",
                        help="formats to run, of csv, csv.gz, xlsx (xlsx: against the csv tool)")
    parser.add_argument("--floor-rows", type=int, default=200_000,
                        help="rows for the tutorial pattern (OFFSET is quadratic; 0: none)")
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL", PG_DEFAULT),
                        help="PostgreSQL server URL ('' to skip)")
    parser.add_argument("--storage", choices=["local", "s3"], default="local",
                        help="s3: each export also into a bucket of a local moto server, "
                             "in turns with the local folder (an overhead ratio, not S3's speed)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the engine and of the reference tool, in turns (best)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--child", choices=["tutorial", "submit"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--format", default="csv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "submit":
        submit(args.format)
        return
    if args.child == "tutorial":
        tutorial(args.out)
        return
    if args.quick:
        args.rows, args.rss, args.floor_rows = 200_000, "20000,100000,200000", 50_000
    rss_sizes = [int(s) for s in args.rss.split(",") if s]  # "": none
    formats = args.formats.split(",")
    me = [sys.executable, str(Path(__file__).resolve())]
    work = Path(tempfile.mkdtemp(prefix="exportdesk-bench-"))
    table: list[Row] = []
    moto = moto_bucket(work) if args.storage == "s3" else None
    try:
        # SQLite: speed at --rows, against sqlite3 -csv and the tutorial pattern.
        sizes = sorted({args.rows, *rss_sizes, *([args.floor_rows] if args.floor_rows else [])})
        rss: dict[tuple[str, int], tuple[int, int]] = {}  # (format, rows): worker, reader
        for size in sizes:
            inst = work / f"sqlite-{size}"
            inst.mkdir()
            url = f"sqlite:///{inst / 'exportdesk.db'}"
            print(f"seeding SQLite with {size:,} rows …", file=sys.stderr)
            prepare(inst, url, size)
            team = source_copy(inst, url)
            env = _env(inst, url, team)
            if size == args.rows:
                cli = ["sqlite3", "-csv", "-header", str(inst / "team.db")]
                table += speed("SQLite", formats, me, inst, env, size, args.repeat,
                               "sqlite3 -csv", [*cli, plain_sql(url)], [*cli, export_sql(url)])
            if size in rss_sizes:
                for fmt in formats:
                    if fmt != "xlsx" or size <= 1_048_575:  # a sheet's limit
                        rss[fmt, size] = worker_rss(inst, env, me, fmt)
            if size == args.floor_rows:
                floor = measure([*me, "--child", "tutorial", "--out", str(inst / "t.csv")],
                                env, inst / "stdout", inst / "t.csv.json")
                table.append(("SQLite", "csv", "tutorial: ORM + OFFSET", size, floor))
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
                psql = ["psql", team.replace("+psycopg", ""), "-q", "-c"]

                def copy(sql: str) -> str:
                    return f"\\copy ({sql}) to stdout with (format csv, header)"

                table += speed("PostgreSQL", formats, me, inst, env, args.rows, args.repeat,
                               "psql \\copy", [*psql, copy(plain_sql(url))],
                               [*psql, copy(export_sql(url))])
            finally:
                for name in ("exportdesk_bench_source", "exportdesk_bench"):  # leave them empty
                    pg_database(args.postgres, name)
        report(table, rss)
    finally:
        if moto:
            moto.kill()
            moto.wait()
        shutil.rmtree(work, ignore_errors=True)


def report(table: list[Row], rss: dict[tuple[str, int], tuple[int, int]]) -> None:
    """The table (each engine row with its speed against the plain tool of its format, run in
    the same turns), the targets of issue 19, and the peak RSS by format and size."""
    found = {(database, fmt, label): (rows, run) for database, fmt, label, rows, run in table}

    def rate(database: str, fmt: str, label: str) -> float | None:
        if (database, fmt, label) not in found:
            return None
        rows, run = found[database, fmt, label]
        return rows / run[0]

    def tool(database: str, fmt: str) -> str | None:
        """The label of the plain tool an engine row of `fmt` is held against."""
        name = "sqlite3 -csv" if database == "SQLite" else "psql \\copy"
        return f"{name} | gzip -6" if fmt == "csv.gz" else f"{name} (plain)"

    print(f"\n{'database':10} {'format':6} {'run (best of the turns)':34} {'rows':>10} "
          f"{'seconds':>8} {'rows/s':>10} {'bytes':>12} {'peak RSS':>9} {'+ reader':>9} "
          f"{'vs tool':>8}")
    for database, fmt, label, rows, (seconds, peak, reader, size) in table:
        ours, theirs = rate(database, fmt, label), rate(database, fmt, tool(database, fmt))
        if fmt == "xlsx":
            theirs = rate(database, "csv", tool(database, "csv"))
        versus = f"{ours / theirs:.2f}×" if label in (ENGINE, IN_BUCKET) and theirs else ""
        print(f"{database:10} {fmt:6} {label:34} {rows:>10,} {seconds:>8.2f} "
              f"{rows / seconds:>10,.0f} {size:>12,} {peak / 2**20:>7.0f}MB "
              f"{f'{reader / 2**20:.0f}MB' if reader else '':>9} {versus:>8}")
    print()
    for database, target in TARGETS.items():
        ours, plain = rate(database, "csv", ENGINE), rate(database, "csv", tool(database, "csv"))
        if ours and plain:
            name = tool(database, "csv").removesuffix(" (plain)")
            formatted = rate(database, "csv", f"{name} (formatted in SQL)")
            print(f"{database} csv: {ours / plain:.2f}× the plain {name} (target ≥ {target}×: "
                  f"{'met' if ours / plain >= target else 'MISSED'})"
                  + (f"; {ours / formatted:.2f}× it on the formatting query" if formatted else ""))
        gz, piped = rate(database, "csv.gz", ENGINE), rate(database, "csv.gz",
                                                            tool(database, "csv.gz"))
        if gz and piped:
            size = (found[database, "csv.gz", ENGINE][1][3]
                    / found[database, "csv.gz", tool(database, "csv.gz")][1][3])
            met = gz / piped >= 2 and size <= 1.1 and (not ours or gz / ours >= 0.8)
            print(f"{database} csv.gz: {gz / piped:.2f}× `{tool(database, 'csv.gz')}` "
                  f"(target ≥ 2×) at {size:.3f}× its size (≤ 1.1×)"
                  + (f", {gz / ours:.2f}× our csv's speed (≥ 0.8×)" if ours else "")
                  + f": {'met' if met else 'MISSED'}")
        xlsx = rate(database, "xlsx", ENGINE)
        if xlsx and plain:
            print(f"{database} xlsx: {xlsx / plain:.2f}× the plain csv tool")
        for fmt in dict.fromkeys(f for d, f, label, _, _ in table
                                 if d == database and label == IN_BUCKET):
            local, bucket = rate(database, fmt, ENGINE), rate(database, fmt, IN_BUCKET)
            if local and bucket:
                print(f"{database} {fmt}: into the bucket takes {local / bucket:.2f}× the time "
                      "into the local folder (moto on this machine: the storage path's "
                      "overhead, not S3's speed)")
    floor = rate("SQLite", "csv", "tutorial: ORM + OFFSET")
    if floor and rate("SQLite", "csv", ENGINE):
        print(f"SQLite csv: {rate('SQLite', 'csv', ENGINE) / floor:.1f}× the tutorial pattern "
              "(ORM objects, csv.writer, OFFSET pages)")
    print("\npeak RSS by export size (SQLite), in `flask worker exports`: the worker process "
          "+ its reader = both")
    for fmt in dict.fromkeys(f for f, _ in rss):
        sizes = sorted(size for f, size in rss if f == fmt)
        for size in sizes:
            worker, reader = rss[fmt, size]
            print(f"  {fmt:6} {size:>10,} rows: {worker / 2**20:6.1f} MB + "
                  f"{reader / 2**20:6.1f} MB = {(worker + reader) / 2**20:6.1f} MB")
        if len(sizes) > 1:  # the target holds for the worker with its reader, not each alone
            small, large = (sum(rss[fmt, size]) for size in (sizes[0], sizes[-1]))
            ok = large <= 1.2 * small and large < 200 * 2**20
            print(f"  {fmt:6} worker + reader: largest / smallest {large / small:.2f}×, largest "
                  f"{large / 2**20:.0f} MB (target ≤ 1.2× and < 200 MB: "
                  f"{'met' if ok else 'MISSED'})")


if __name__ == "__main__":
    main()
