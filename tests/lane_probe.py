"""Tasks for the lane tests, loaded into consumers with TASK_MODULES=lane_probe."""

from __future__ import annotations

import os
import time

from jobs import lanes


def _mark(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(f"{text} {time.time()!r} {os.getpid()}\n")


@lanes.critical.task()
def critical_sleep(seconds: float, marker: str) -> None:
    _mark(marker, "start")
    time.sleep(seconds)
    _mark(marker, "end")


@lanes.critical.task()
def critical_ping(marker: str, sent: float = 0.0) -> None:
    _mark(marker, f"ping {sent!r}")


@lanes.exports.task()
def exports_sleep(seconds: float, marker: str) -> None:
    _mark(marker, "start")
    time.sleep(seconds)
    _mark(marker, "end")


@lanes.exports.task()
def exports_ping(marker: str) -> None:
    _mark(marker, "ping")

