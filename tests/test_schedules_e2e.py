"""Schedules on the real stack (`flask dev`: web + a consumer per lane) plus a second critical
consumer, so two schedulers tick at once: every due run is made once, runs on the exports
lane, and its file downloads; on the SQLite lanes and on Redis."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis
from conftest import consumer, csrf_from, query, wait_for
from sqlalchemy import create_engine, text
from test_end_to_end import browser_login

pytestmark = pytest.mark.integration
SCHEDULES = 6


@pytest.mark.parametrize("lanes_on", ["sqlite", "redis"])
def test_two_schedulers_make_each_due_run_once_and_the_runs_finish(stack_factory, request,
                                                                   lanes_on):
    broker = ""
    if lanes_on == "redis":
        server = request.getfixturevalue("redis_server")
        redis.Redis(port=server.port).flushall()
        broker = server.url
    stack = stack_factory(rows=2_000, BROKER_URL=broker, SCHEDULER_INTERVAL="0.5")
    web = browser_login(stack.url, "alice@acme.test")
    token = csrf_from(web.get(f"{stack.url}/schedules").text)
    ids = []
    for n in range(SCHEDULES):
        response = web.post(f"{stack.url}/api/schedules", headers={"X-CSRFToken": token}, json={
            "name": f"nightly {n}", "dataset": "orders", "repeat": "daily", "at": "03:00",
            "timezone": "Europe/Berlin", "date_range": "previous_month"})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])

    log = stack.instance / "second-scheduler.log"
    with consumer("critical", broker, stack.instance, log, DATABASE_URL=stack.database_url,
                  SCHEDULER_INTERVAL="0.5"):
        # Both schedulers tick twice a second; the schedules fall due all at once, their slot
        # long past (an outage): each is made up once.
        execute(stack.database_url, "update schedules set next_run_at = '2026-01-01 02:00:00'")

        def finished() -> list | None:
            rows = query(stack.database_url, "select schedule_id, state from export_jobs "
                         "where schedule_id is not null order by schedule_id")
            done = [r for r in rows if r[1] == "succeeded"]
            return rows if len(done) >= SCHEDULES else None

        rows = wait_for(finished, 120, "the scheduled runs\n" + stack.log_tail())
        now = datetime.now(UTC).isoformat()[:19]
        for schedule_id in ids:  # advanced past now: nothing more is due
            schedule = web.get(f"{stack.url}/api/schedules/{schedule_id}").json()
            assert schedule["last_run_at"] == "2026-01-01T02:00:00Z"
            assert schedule["next_run_at"] > now
    assert sorted(r[0] for r in rows) == sorted(ids), "one run per schedule, none twice"

    [run] = web.get(f"{stack.url}/api/schedules/{ids[0]}").json()["runs"]
    job = web.get(run["url"]).json()
    assert job["state"] == "succeeded" and job["lane"] == "exports"
    assert job["params"] == {"date_from": "2025-12-01", "date_to": "2025-12-31"}
    download = web.get(job["download_url"])
    assert download.status_code == 200 and download.content.startswith(b"id,created_at,")


def execute(database_url: str, sql: str) -> None:
    """Run one statement in a committed transaction of its own."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()
