"""Pausing a lane against real consumers (SQLite and Redis): nothing new is taken while paused,
queued work waits, and runs once the lane is resumed."""

from __future__ import annotations

import time

import lane_probe
import pytest
from test_lanes import broker, consumer, marks, wait_for  # noqa: F401 (broker: a fixture)

from jobs import dispatch, lanes

pytestmark = pytest.mark.integration


def test_paused_lane_takes_nothing_until_resumed(broker, app, instance, tmp_path):  # noqa: F811
    pings = tmp_path / "ping"
    with app.app_context():
        dispatch.pause("exports")
    try:
        with consumer("exports", broker, instance, tmp_path / "log"):
            lane_probe.exports_ping(str(pings))
            wait_for(lambda: lanes.exports.health()["workers"] > 0, what="a live consumer")
            time.sleep(3)  # several polls of an idle SQLite consumer (poll_interval 1 s)
            assert marks(pings) == []
            assert lanes.exports.health()["depth"] == 1
            assert dispatch.lane_health()[1]["paused"] is True
            with app.app_context():
                dispatch.resume("exports")
            wait_for(lambda: len(marks(pings)) == 1, what="the ping after resume")
    finally:
        lanes.exports.resume()
