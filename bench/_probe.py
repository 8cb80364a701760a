"""Tasks for bench/starvation.py, loaded into consumers with TASK_MODULES=_probe."""

from __future__ import annotations

import os
import time

from jobs import lanes

LOG = os.environ.get("PROBE_LOG", "/tmp/exportdesk-probe.log")


def _record(sent: float) -> None:
    started = time.time()
    with open(LOG, "a") as f:  # one short line per write: atomic with O_APPEND
        f.write(f"{sent!r} {started!r}\n")


@lanes.critical.task()
def ping(sent: float) -> None:
    """A password-reset email, as far as the lane can tell: tiny, and urgent."""
    _record(sent)


@lanes.exports.task()
def ping_shared(sent: float) -> None:
    """The same urgent task, but on the exports lane: the classic one-queue setup."""
    _record(sent)


@lanes.exports.task(retries=0)
def hog(seconds: float) -> None:
    """A long export: busy half the time (CPU), the other half waiting (I/O)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        spin = time.monotonic() + 0.01
        while time.monotonic() < spin:
            pass
        time.sleep(0.01)
