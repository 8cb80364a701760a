"""Lanes: one Huey instance per kind of work, each with its own storage, settings and consumer."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huey import Huey
from huey.api import TaskWrapper
from huey.consumer import Consumer, Scheduler
from huey.storage import BaseStorage, RedisStorage, SqliteStorage
from redis import ConnectionPool

log = logging.getLogger(__name__)


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


class LaneScheduler(Scheduler):
    """Huey's scheduler, plus the lane's interval tasks (Huey's own periodic tasks are per
    minute at best; the reconciler wants seconds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._due: dict[str, float] = {}

    def loop(self, now=None):
        if self.periodic:
            self.enqueue_interval_tasks()
        return super().loop(now)

    def enqueue_interval_tasks(self) -> None:
        for task, seconds in self.huey.interval_tasks:
            if self._due.get(task.name, 0.0) <= time.monotonic():
                self._due[task.name] = time.monotonic() + seconds
                try:
                    self.huey.enqueue(task.s())
                except Exception:  # broker down: try again at the next interval
                    log.exception("could not enqueue interval task %s", task.name)


class LaneConsumer(Consumer):
    scheduler_class = LaneScheduler


class Lane(Huey):
    """A Huey instance whose storage (SQLite file or Redis keys) is chosen by `configure`."""

    def __init__(self, name: str, settings: LaneSettings):
        self.settings = settings
        self.broker_url = ""
        self.queue_dir: Path | None = None
        self.interval_tasks: list[tuple[TaskWrapper, float]] = []
        super().__init__(name, results=False, utc=True)

    def every(self, seconds: float, name: str) -> Callable[[Callable], TaskWrapper]:
        """Declare a task on this lane that its consumer enqueues every `seconds` (and once
        at start-up); several consumers of one lane each enqueue it, so it must be idempotent."""

        def decorator(func: Callable) -> TaskWrapper:
            task = self.task(name=name, timeout=self.settings.timeout)(func)
            self.interval_tasks.append((task, seconds))
            return task

        return decorator

    def create_consumer(self, **options) -> Consumer:
        return LaneConsumer(self, **options)

    def get_storage(self, **kwargs) -> BaseStorage:
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            # A broker that does not answer must fail a submission fast, not hang a request:
            # the job stays recorded and the reconciler sends it later.
            pool = ConnectionPool.from_url(self.broker_url, socket_connect_timeout=5)
            return RedisStorage(self.name, connection_pool=pool, blocking=True, read_timeout=1)
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
