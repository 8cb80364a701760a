"""Lanes: one Huey instance per kind of work, each with its own storage, settings and consumer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huey import Huey
from huey.consumer import Consumer
from huey.storage import BaseStorage, RedisStorage, SqliteStorage


@dataclass(frozen=True)
class LaneSettings:
    """How a lane runs. Every field can be overridden by LANE_<NAME>_<FIELD> in the environment."""

    workers: int
    timeout: float  # hard limit in seconds; enforced because workers are processes
    retries: int
    retry_delay: float
    poll_interval: float  # longest an idle SQLite consumer waits between polls
    worker_type: str = "process"

    @classmethod
    def from_env(cls, name: str, **defaults: float) -> LaneSettings:
        values: dict = {}
        for field, default in defaults.items():
            raw = os.environ.get(f"LANE_{name.upper()}_{field.upper()}")
            values[field] = type(default)(raw) if raw is not None else default
        return cls(**values)


class UnconfiguredStorage(BaseStorage):
    """Stands in until `configure` picks the real storage, so nothing is queued by accident."""

    def enqueue(self, data, priority=None):
        raise RuntimeError(f"lane {self.name!r} is not configured: call jobs.lanes.configure()")


class Lane(Huey):
    """A Huey instance whose storage (SQLite file or Redis keys) is chosen by `configure`."""

    def __init__(self, name: str, settings: LaneSettings):
        self.settings = settings
        self.broker_url = ""
        self.queue_dir: Path | None = None
        super().__init__(name, results=False, utc=True)

    def get_storage(self, **kwargs) -> BaseStorage:
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return RedisStorage(self.name, url=self.broker_url, blocking=True, read_timeout=1)
        if self.queue_dir is not None:
            return SqliteStorage(
                self.name, filename=str(self.queue_dir / f"queue-{self.name}.db"), timeout=30
            )
        return UnconfiguredStorage(self.name)

    def configure(self, broker_url: str, queue_dir: Path) -> None:
        self.broker_url, self.queue_dir = broker_url, Path(queue_dir)
        if not self.immediate:
            self.storage = self.create_storage()

    def consumer(self, **overrides) -> Consumer:
        """A consumer with this lane's settings: process workers, so hard timeouts hold."""
        options = dict(
            workers=self.settings.workers,
            worker_type=self.settings.worker_type,
            initial_delay=min(0.1, self.settings.poll_interval),
            max_delay=self.settings.poll_interval,
            backoff=1.15,
            periodic=True,
            check_worker_health=True,
            health_check_interval=1,
        )
        options.update(overrides)
        return self.create_consumer(**options)


critical = Lane(
    "critical",
    LaneSettings.from_env(
        "critical", workers=8, timeout=30.0, retries=3, retry_delay=60.0, poll_interval=0.1
    ),
)
exports = Lane(
    "exports",
    LaneSettings.from_env(
        "exports", workers=2, timeout=1800.0, retries=3, retry_delay=5.0, poll_interval=1.0
    ),
)
LANES: dict[str, Lane] = {lane.name: lane for lane in (critical, exports)}


def configure(broker_url: str, queue_dir: Path) -> None:
    """Point every lane at its storage: SQLite files in queue_dir, or Redis when broker_url says."""
    for lane in LANES.values():
        lane.configure(broker_url, queue_dir)
