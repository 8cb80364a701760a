"""Pausing a lane against real consumers (SQLite, Redis, PostgreSQL): nothing new is taken while
paused, queued work waits, and runs once the lane is resumed; paused workers do not spin on the
broker."""

from __future__ import annotations

import time

import lane_probe
import pytest
import redis
from conftest import query
from test_lanes import broker, consumer, marks, wait_for  # noqa: F401 (broker: a fixture)

from jobs import dispatch, lanes

pytestmark = pytest.mark.integration


def requests_served(url: str) -> int:
    """Requests the broker has served so far: Redis commands, or transactions in the lanes'
    PostgreSQL database (a backend reports them about once a second while busy); 0 for SQLite,
    whose idle workers sleep between polls anyway."""
    if url.startswith("redis"):
        return redis.Redis.from_url(url).info("stats")["total_commands_processed"]
    if url:
        [(count,)] = query(url, "select xact_commit from pg_stat_database "
                                   "where datname = current_database()")
        return count
    return 0


def test_paused_lane_takes_nothing_until_resumed(broker, app, instance, tmp_path):  # noqa: F811
    pings = tmp_path / "ping"
    with app.app_context():
        dispatch.pause("exports")
    try:
        with consumer("exports", broker, instance, tmp_path / "log"):
            lane_probe.exports_ping(str(pings))
            wait_for(lambda: lanes.exports.health()["workers"] > 0, what="a live consumer")
            before = requests_served(broker)
            time.sleep(3)  # several polls of an idle SQLite consumer (poll_interval 1 s)
            # Two workers asking "paused?" about once a second, the consumer's heartbeat and
            # schedule: tens of requests; a worker that spun would make thousands.
            assert requests_served(broker) - before < 300, "paused workers spin on the broker"
            assert marks(pings) == []
            assert lanes.exports.health()["depth"] == 1
            assert dispatch.lane_health()[1]["paused"] is True
            with app.app_context():
                dispatch.resume("exports")
            wait_for(lambda: len(marks(pings)) == 1, what="the ping after resume")
    finally:
        lanes.exports.resume()
