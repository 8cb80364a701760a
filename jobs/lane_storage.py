"""Lane storages: Huey's SQLite, Redis, PostgreSQL and memory storages, each with the reads a
lane needs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from huey.storage import (
    BaseStorage,
    MemoryStorage,
    PostgresStorage,
    RedisStorage,
    SqliteStorage,
)
from redis import ConnectionPool
from sqlalchemy import make_url


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


class PostgresLaneStorage(LaneStorage, PostgresStorage):
    """A lane's queue in PostgreSQL tables (`lane_task`, `lane_schedule`, `lane_kv`,
    `lane_counter`, shared by the lanes, a `queue` column apart): a worker takes a message with
    `FOR UPDATE SKIP LOCKED` and, while there is none, waits on the lane's LISTEN channel, which
    every enqueue notifies, so pickup does not wait for a poll (Huey's PostgresStorage)."""

    kind = "postgresql"
    PREFIX = "lane"
    _SCHEMA_LOCK = 0x6C616E65  # pg_advisory_xact_lock key ("lane"): one creator at a time
    _schema_ready = False  # set once this storage's first connection has made the tables

    @classmethod
    def from_url(cls, name: str, url: str) -> PostgresLaneStorage:
        # The SQLAlchemy spelling (postgresql+psycopg://) as libpq's; connect_timeout as for
        # Redis: a broker that does not answer fails a submission fast, the reconciler resends.
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        return cls(name, dsn=dsn, blocking=True, read_timeout=1, table_prefix=cls.PREFIX,
                   create_tables=False, connect_timeout=5)

    def _create_connection(self):
        """The tables made on first use, not at start-up (a command that never queues leaves
        the database alone); under an advisory lock, since concurrent `create table if not
        exists` can collide in PostgreSQL's catalogue."""
        conn = self._connect()
        if not self._schema_ready:
            with conn.transaction():
                conn.execute("select pg_advisory_xact_lock(%s)", (self._SCHEMA_LOCK,))
                for statement in self.ddl:
                    conn.execute(statement)
            self._schema_ready = True
        return conn

    def enqueue(self, data: bytes, priority: float | None = None) -> None:
        """Huey's enqueue in one statement (one round trip, not four): the row and its
        notification, which PostgreSQL delivers when the row commits."""
        self.sql(f"with queued as (insert into {self.table_task} (queue, data, priority) "
                 "values (%s, %s, %s) returning 1) select pg_notify(%s, '') from queued",
                 (self.name, data, priority or 0, self.channel))

    def counts(self, keys: Iterable[str]) -> dict[str, int]:
        rows = self.sql(f"select key, value from {self.table_counter} "
                        "where queue = %s and key = any(%s)", (self.name, list(keys)),
                        results=True)
        return {key: int(value) for key, value in rows}

    def held_messages(self) -> list[bytes]:
        # One statement, so one snapshot of both tables.
        rows = self.sql(f"select data from {self.table_schedule} where queue = %s union all "
                        f"select data from {self.table_task} where queue = %s",
                        (self.name, self.name), results=True)
        return [bytes(data) for (data,) in rows]

    def after_fork(self) -> None:
        # The child opens its own connections; dropping the parent's objects unclosed sends
        # nothing on their sockets (psycopg terminates only from the process that opened them).
        self._conn = None
        self._listen_local = threading.local()


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
    """The storage of lane `name`: Redis or PostgreSQL when broker_url says, else a SQLite file
    in queue_dir (a stand-in that refuses work until `jobs.lanes.configure` gives one)."""
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisLaneStorage.from_url(name, broker_url)
    if broker_url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        return PostgresLaneStorage.from_url(name, broker_url)
    if queue_dir is not None:
        return SqliteLaneStorage.in_dir(name, queue_dir)
    return UnconfiguredStorage(name)
