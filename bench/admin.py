"""Benchmark: the admin job list at 1,000,000 jobs against a tiny page of the same app.

Fills a fresh database (temporary SQLite by default, or --database-url for PostgreSQL, which
must be an empty database) with N jobs in chunked Core inserts, then times the job list (first
page, a filtered page, a deep keyset page, searches) and reference pages with the Flask test
client, one request of each page per round. Prints p50/p95 in ms and each p95 over the tiny
page's p95; the target is <= 3x.

    .venv/bin/python bench/admin.py [--jobs 1000000] [--requests 200] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STATES = ["succeeded"] * 85 + ["failed"] * 7 + ["cancelled"] * 4 + ["expired"] * 3 + ["queued"]
BENCH_USERS = 200
TARGET = 3.0


def fill(jobs: int, chunk: int = 50_000) -> None:
    """Users, then `jobs` export jobs spread over 30 days, oldest first (ids follow time), with
    their parameter values as the app records them (job_param_values)."""
    from sqlalchemy import insert, select, text

    from jobs.models import ExportJob, JobParamValue, User, db, param_search_values
    from webapp.seed import seed

    seed(0)
    org = db.session.scalar(select(User.org_id).where(User.email == "alice@acme.test"))
    db.session.execute(insert(User.__table__), [
        {"email": f"user-{i}@bench.test", "password_hash": "x", "org_id": org, "role": "user"}
        for i in range(BENCH_USERS)])
    db.session.commit()
    users = db.session.execute(select(User.id, User.org_id)).all()
    rng = random.Random(8)
    start = datetime(2026, 10, 1)
    step = 30 * 86400 / jobs
    statuses = ["pending", "settled", "refunded", "failed"]
    for offset in range(0, jobs, chunk):
        rows = []
        for i in range(offset, min(offset + chunk, jobs)):
            user_id, org_id = users[rng.randrange(len(users))]
            day = start + timedelta(days=rng.randrange(300))
            rows.append({
                "user_id": user_id, "org_id": org_id,
                "dataset": "transactions" if rng.random() < 0.7 else "orders",
                "params": {"date_from": day.date().isoformat(), "status": rng.choice(statuses)},
                "format": "csv", "lane": "exports", "state": rng.choice(STATES),
                "rows_done": 1000, "rows_total": 1000, "bytes": 50_000,
                "created_at": start + timedelta(seconds=i * step),
            })
        ids = db.session.scalars(insert(ExportJob.__table__).returning(
            ExportJob.id, sort_by_parameter_order=True), rows).all()
        db.session.execute(insert(JobParamValue.__table__), [
            {"job_id": job_id, "value": value} for job_id, row in zip(ids, rows, strict=True)
            for value in param_search_values(row["params"])])
        db.session.commit()
    with db.engine.begin() as conn:
        conn.execute(text("ANALYZE"))


def timed(client, urls: list[str], rounds: int) -> list[list[float]]:
    """Milliseconds per request of each URL. Each round requests every URL once, so a change
    in the machine's speed during the run (another process, CPU frequency) touches every page
    alike and the ratios to the tiny page stay fair."""
    for url in urls:
        client.get(url)  # warm up
    samples: list[list[float]] = [[] for _ in urls]
    for _ in range(rounds):
        for url, times in zip(urls, samples, strict=True):
            began = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200, (url, response.status_code)
    return samples


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()

    folder = tempfile.TemporaryDirectory(prefix="exportdesk-bench-")
    os.environ["INSTANCE_PATH"] = folder.name
    os.environ["DATABASE_URL"] = args.database_url or f"sqlite:///{folder.name}/bench.db"
    os.environ.pop("BROKER_URL", None)
    from flask_migrate import upgrade

    from webapp import create_app

    app = create_app({"TESTING": True})
    began = time.perf_counter()
    with app.app_context():
        upgrade()
        fill(args.jobs)
    filled = time.perf_counter() - began
    print(f"filled {args.jobs:,} jobs in {filled:.0f} s "
          f"({app.config['SQLALCHEMY_DATABASE_URI'].split(':')[0]})")

    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    client.post("/login", data={"email": "admin@exportdesk.test", "password": "exportdesk",
                                "csrf_token": token})
    deep = f"/admin/jobs?after={args.jobs // 2}."
    cases = [
        ("tiny page: GET / (the export form)", "/"),
        ("GET /healthz", "/healthz"),
        ("jobs: first page", "/admin/jobs"),
        ("jobs: state=failed&dataset=orders", "/admin/jobs?state=failed&dataset=orders"),
        ("jobs: user filter", "/admin/jobs?user=user-7@bench.test"),
        ("jobs: deep page (keyset, halfway)", deep),
        ("jobs: date filter (one old day)", "/admin/jobs?date_from=2026-10-03&date_to=2026-10-03"),
        ("search: job id", f"/admin/jobs?q={args.jobs // 3}"),
        ("search: user email", "/admin/jobs?q=user-42@bench.test"),
        ("search: parameter value (common)", "/admin/jobs?q=refunded"),
        ("search: parameter value (absent)", "/admin/jobs?q=no-such-value"),
        # The state tabs' counts, which the list page asks for after it is shown.
        ("tab counts: no filter", "/admin/jobs/tabs"),
        ("tab counts: user filter", "/admin/jobs/tabs?user=user-7@bench.test"),
        ("tab counts: parameter value (common)", "/admin/jobs/tabs?q=refunded"),
    ]
    results = [(name, len(samples), statistics.median(samples), p95(samples)) for (name, _), samples
               in zip(cases, timed(client, [url for _, url in cases], args.requests), strict=True)]
    reference = results[0][3]
    print(f"\n{'page':48} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p95/tiny':>9}")
    for name, count, p50, high in results:
        print(f"{name:48} {count:5d} {p50:8.2f} {high:8.2f} {high / reference:8.2f}x")
    lists = [r[3] for r in results[2:] if not r[0].startswith("tab counts")]
    worst = max(lists) / reference
    print(f"\nworst list page p95 / tiny page p95: {worst:.2f}x "
          f"(target <= {TARGET:.0f}x: {'met' if worst <= TARGET else 'NOT met'})")
    counts = max(r[3] for r in results if r[0].startswith("tab counts")) / reference
    print(f"worst tab counts p95 / tiny page p95: {counts:.2f}x (loaded after the list)")
    folder.cleanup()


if __name__ == "__main__":
    main()
