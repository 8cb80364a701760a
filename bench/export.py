"""Export speed and memory: exportdesk's engine against the database's own CSV tool and the
tutorial pattern (ORM objects, OFFSET pages); peak RSS of the worker by export size.

    python bench/export.py                 # 1M rows for speed; RSS at 100k, 1M and 5M
    python bench/export.py --quick         # 200k rows; RSS at 20k, 100k and 200k
    python bench/export.py --rows 5000000 --rss 100000,5000000 --postgres URL

Each export runs in a child process; its peak RSS comes from wait4()'s ru_maxrss.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
USER = "alice@acme.test"


def _env(instance: Path, database_url: str) -> dict:
    return {**os.environ, "INSTANCE_PATH": str(instance), "DATABASE_URL": database_url,
            "FLASK_APP": "webapp", "BROKER_URL": "", "PYTHONPATH": str(ROOT)}


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
    """The engine's query for the whole export (no batches), with values inlined."""
    from sqlalchemy import create_engine, text

    from jobs.datasets import DATASETS

    engine = create_engine(database_url)
    with engine.connect() as conn:
        org = conn.execute(text("select id from organisations where slug = 'acme'")).scalar()
        stmt = DATASETS["transactions"].text_batch(org, {}, None, 1, engine.dialect.name)
        sql = str(stmt.limit(None).compile(engine, compile_kwargs={"literal_binds": True}))
    engine.dispose()
    return sql


def measure(cmd: list[str], env: dict, out: Path, timing: Path | None = None
            ) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one child process writing its stdout to `out`; a
    Python child's own export time (without interpreter start-up) from `timing`."""
    with out.open("wb") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    if timing is not None:
        seconds = float(timing.read_text())
    return seconds, usage.ru_maxrss * 1024


def child(kind: str, out: str) -> None:
    """Run one export in this process (called as a child by the parent)."""
    from webapp import create_app

    app = create_app()
    started = time.perf_counter()
    try:
        with app.app_context():
            _export(app, kind, out)
    finally:
        Path(out + ".seconds").write_text(str(time.perf_counter() - started))


def _export(app, kind: str, out: str) -> None:
    from webapp.auth import find_user
    from webapp.models import ExportJob, db

    user = find_user(USER)
    if kind == "engine":  # the real thing: job row, checkpoints, progress, publish
        from jobs import engine

        job = ExportJob(user=user, org_id=user.org_id, dataset="transactions", params={},
                        format="csv")
        db.session.add(job)
        db.session.commit()
        engine.run(job.id, max_attempts=1)
        db.session.refresh(job)
        assert job.state == "succeeded", job.error
        shutil.move(Path(app.config["EXPORT_DIR"]) / job.file_name, out)
        return
    import csv  # the tutorial pattern: ORM objects, csv.writer, OFFSET pages

    from webapp.models import Transaction

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


def pg_database(server: str, name: str) -> str:
    from sqlalchemy import create_engine, make_url

    url = make_url(server)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
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
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--child", choices=["engine", "tutorial"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out)
        return
    if args.quick:
        args.rows, args.rss, args.floor_rows = 200_000, "20000,100000,200000", 50_000
    rss_sizes = [int(s) for s in args.rss.split(",")]
    me = [sys.executable, str(Path(__file__).resolve())]
    work = Path(tempfile.mkdtemp(prefix="exportdesk-bench-"))
    table: list[tuple[str, int, float, int]] = []  # label, rows, seconds, rss
    try:
        # SQLite: speed at --rows, against sqlite3 -csv and the tutorial pattern.
        sizes = sorted({args.rows, args.floor_rows, *rss_sizes})
        rss: dict[int, int] = {}
        for size in sizes:
            inst = work / f"sqlite-{size}"
            inst.mkdir()
            url = f"sqlite:///{inst / 'exportdesk.db'}"
            print(f"seeding SQLite with {size:,} rows …", file=sys.stderr)
            prepare(inst, url, size)
            env = _env(inst, url)
            seconds, peak = measure([*me, "--child", "engine", "--out", str(inst / "e.csv")],
                                    env, inst / "stdout", inst / "e.csv.seconds")
            rss[size] = peak
            if size == args.rows:
                table.append(("exportdesk engine (SQLite)", size, seconds, peak))
                cli, cli_rss = measure(["sqlite3", "-csv", "-header", str(inst / "exportdesk.db"),
                                        export_sql(url)], env, inst / "cli.csv")
                table.append(("sqlite3 -csv", size, cli, cli_rss))
            if size == args.floor_rows:
                floor, floor_rss = measure([*me, "--child", "tutorial", "--out",
                                            str(inst / "t.csv")], env, inst / "stdout",
                                    inst / "t.csv.seconds")
                table.append(("tutorial: ORM + OFFSET (SQLite)", size, floor, floor_rss))
            if size not in (args.rows, args.floor_rows) and size != max(sizes):
                shutil.rmtree(inst)
        if args.postgres:
            url = pg_database(args.postgres, "exportdesk_bench")
            inst = work / "pg"
            inst.mkdir()
            try:
                print(f"seeding PostgreSQL with {args.rows:,} rows …", file=sys.stderr)
                prepare(inst, url, args.rows)
                env = _env(inst, url)
                seconds, peak = measure([*me, "--child", "engine", "--out",
                                         str(inst / "e.csv")], env, inst / "stdout",
                                    inst / "e.csv.seconds")
                table.append(("exportdesk engine (PostgreSQL)", args.rows, seconds, peak))
                psql_url = url.replace("+psycopg", "")
                copy = f"\\copy ({export_sql(url)}) to stdout with (format csv, header)"
                cli, cli_rss = measure(["psql", psql_url, "-q", "-c", copy], env,
                                       inst / "cli.csv")
                table.append(("psql \\copy", args.rows, cli, cli_rss))
            finally:
                pg_database(args.postgres, "exportdesk_bench")  # leave it empty
        report(table, rss)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(table: list[tuple[str, int, float, int]], rss: dict[int, int]) -> None:
    rate = {label: rows / seconds for label, rows, seconds, _ in table}
    print(f"\n{'export':36} {'rows':>10} {'seconds':>8} {'rows/s':>10} {'peak RSS':>9}")
    for label, rows, seconds, peak in table:
        print(f"{label:36} {rows:>10,} {seconds:>8.2f} {rows / seconds:>10,.0f} "
              f"{peak / 2**20:>7.0f}MB")
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
    print("\npeak RSS of the engine's worker process by export size (SQLite):")
    for size in sizes:
        print(f"  {size:>10,} rows: {rss[size] / 2**20:6.1f} MB")
    if len(sizes) > 1:
        growth = rss[sizes[-1]] / rss[sizes[0]]
        ok = growth <= 1.2 and rss[sizes[-1]] < 200 * 2**20
        print(f"  largest / smallest: {growth:.2f}× (target ≤ 1.2× and < 200 MB: "
              f"{'met' if ok else 'MISSED'})")


if __name__ == "__main__":
    main()
