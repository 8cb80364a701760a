"""Lane storages: Huey's SQLite, Redis and memory storages, each with the reads a lane needs."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from huey.storage import BaseStorage, MemoryStorage, RedisStorage, SqliteStorage
from redis import ConnectionPool


def _minute(ts: float) -> int:
    return int(ts // 60)


class LaneStorage:
    """What a lane asks of its storage beyond Huey's own interface (mixed into a Huey storage):
    a lane gets one of the subclasses once (`open_storage`) and never asks which it got."""

    kind = ""  # the `broker` a lane's health reports

    def count(self, outcome: str, at: float) -> None:
        """One more task ended with `outcome` ("completed" or "failed") in the minute of `at`."""
        self.incr(f"ledger:{outcome}:{_minute(at)}")

    def minutes(self, count: int) -> list[tuple[int, int, int]]:
        """(minute, completed, failed) for the last `count` minutes, oldest first."""
        last = _minute(time.time())
        span = range(last - count + 1, last + 1)
        values = self.counts(f"ledger:{outcome}:{m}" for m in span
                             for outcome in ("completed", "failed"))
        return [(m, values.get(f"ledger:completed:{m}", 0), values.get(f"ledger:failed:{m}", 0))
                for m in span]

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        """The counters among `keys` (Huey's `incr`), read at once; a missing one is 0."""
        raise NotImplementedError

    def held_messages(self) -> list[bytes]:
        """Every message in the queue and in the schedule, both read at one instant."""
        raise NotImplementedError

    def after_fork(self) -> None:
        """In a forked child: drop what must not be shared with the parent (nothing here)."""


class SqliteLaneStorage(LaneStorage, SqliteStorage):
    """A lane's queue in a SQLite file of its own."""

    kind = "sqlite"

    @classmethod
    def in_dir(cls, name: str, queue_dir: Path) -> SqliteLaneStorage:
        return cls(name, filename=str(queue_dir / f"queue-{name}.db"), timeout=30,
                   create_tables=False)

    def _create_connection(self):
        """The file (and its folder) made on first use, not at start-up: a command that never
        queues anything leaves nothing behind. Huey's tables all say "if not exists"."""
        Path(self.filename).parent.mkdir(parents=True, exist_ok=True)
        conn = super()._create_connection()
        for statement in self.ddl:
            conn.execute(statement)
        return conn

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        # One query: `incr(key, 0)` per key would be a write transaction each.
        keys = list(keys)
        marks = ",".join("?" * len(keys))
        rows = self.sql(f"select key, value from counter where queue = ? and key in ({marks})",
                        (self.name, *keys), results=True)
        return {key: int(value) for key, value in rows}

    def held_messages(self) -> list[bytes]:
        rows = self.sql("select data from schedule where queue = ? union all "
                        "select data from task where queue = ?", (self.name, self.name),
                        results=True)
        return [data for (data,) in rows]

    def after_fork(self) -> None:
        self._conn = None  # the child opens its own connection, never uses the parent's


class RedisLaneStorage(LaneStorage, RedisStorage):
    """A lane's queue in Redis keys (a ConnectionPool notices a fork by itself)."""

    kind = "redis"

    @classmethod
    def from_url(cls, name: str, url: str) -> RedisLaneStorage:
        # A broker that does not answer must fail a submission fast, not hang a request:
        # the job stays recorded and the reconciler sends it later.
        pool = ConnectionPool.from_url(url, socket_connect_timeout=5)
        return cls(name, connection_pool=pool, blocking=True, read_timeout=1)

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        keys = list(keys)
        found = self.conn.hmget(self.counter_key, keys)
        return {k: int(v) for k, v in zip(keys, found, strict=True) if v is not None}

    def held_messages(self) -> list[bytes]:
        pipe = self.conn.pipeline(transaction=True)  # one MULTI
        pipe.zrange(self.schedule_key, 0, -1)
        pipe.lrange(self.queue_key, 0, -1)
        scheduled, queued = pipe.execute()
        return [*scheduled, *queued]


class MemoryLaneStorage(LaneStorage, MemoryStorage):
    """The storage of immediate mode (tests), where tasks run as they are sent."""

    kind = "memory"

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        return {key: self.incr(key, 0) for key in keys}

    def held_messages(self) -> list[bytes]:
        with self._lock:
            return [*self.scheduled_items(), *self.enqueued_items()]


class UnconfiguredStorage(LaneStorage, BaseStorage):
    """Stands in until `configure` picks the real storage, so nothing is queued by accident."""

    kind = "unconfigured"

    def _unconfigured(self) -> NoReturn:
        raise RuntimeError(f"lane {self.name!r} is not configured: call jobs.lanes.configure()")

    def enqueue(self, data, priority=None):
        self._unconfigured()

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        self._unconfigured()

    def held_messages(self) -> list[bytes]:
        self._unconfigured()


def open_storage(name: str, broker_url: str, queue_dir: Path | None) -> LaneStorage:
    """The storage of lane `name`: Redis when broker_url says, else a SQLite file in queue_dir
    (a stand-in that refuses work until `jobs.lanes.configure` gives either)."""
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisLaneStorage.from_url(name, broker_url)
    if queue_dir is not None:
        return SqliteLaneStorage.in_dir(name, queue_dir)
    return UnconfiguredStorage(name)
