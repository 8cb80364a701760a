"""Lanes: one Huey instance per kind of work, each with its own storage, settings and consumer."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import time
import tomllib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path

from flask import Flask, current_app, has_app_context
from huey import Huey, crontab  # noqa: F401 (crontab: for periodic tasks)
from huey import signals as S
from huey.api import TaskWrapper
from huey.constants import EmptyData
from huey.consumer import Consumer, ForkSafeFlag, Scheduler

from jobs.lane_storage import LaneStorage, MemoryLaneStorage, open_storage

log = logging.getLogger(__name__)

DEFAULTS = {
    "critical": dict(workers=8, timeout=30.0, retries=3, retry_delay=60.0, retry_backoff=2.0,
                     poll_interval=0.1, shutdown_timeout=30.0),
    "exports": dict(workers=2, timeout=1800.0, retries=3, retry_delay=5.0, retry_backoff=2.0,
                    poll_interval=1.0, shutdown_timeout=15.0),
}


@dataclass(frozen=True)
class LaneSettings:
    """How a lane runs: defaults, then the LANES_FILE (TOML), then LANE_<NAME>_<FIELD> env vars."""

    workers: int
    timeout: float  # hard limit in seconds; enforced because workers are processes
    retries: int
    retry_delay: float
    retry_backoff: float
    poll_interval: float  # longest an idle SQLite consumer waits between polls
    shutdown_timeout: float  # how long a graceful stop waits for running tasks
    worker_type: str = "process"

    @classmethod
    def load(cls, name: str) -> LaneSettings:
        values: dict = dict(DEFAULTS[name])
        path = os.environ.get("LANES_FILE")
        if path:
            with open(path, "rb") as f:
                values.update(tomllib.load(f).get("lanes", {}).get(name, {}))
        for field in fields(cls):
            raw = os.environ.get(f"LANE_{name.upper()}_{field.name.upper()}")
            if raw is not None:
                values[field.name] = raw
        for field in fields(cls):
            if field.name in values:
                values[field.name] = {"int": int, "float": float, "str": str}[field.type](
                    values[field.name])
        if values.get("worker_type", "process") != "process":
            raise ValueError(f"lane {name}: only process workers enforce hard timeouts")
        return cls(**values)


# Keys of the lane's own ledger, kept in its storage beside the queue (see `health`).
ENQUEUED, RUNNING, CONSUMER = "ledger:enqueued:", "ledger:running:", "ledger:consumer:"
PERIODIC = "ledger:periodic:"
PAUSED = "ledger:paused"
HEARTBEAT_SECONDS = 2.0
_stop_flag: ForkSafeFlag | None = None


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


def stopping() -> bool:
    """True in a worker process once its consumer was asked to stop (graceful shutdown)."""
    return _stop_flag is not None and _stop_flag.is_set()


class Lane(Huey):
    """A Huey instance whose storage (SQLite file, Redis keys or PostgreSQL rows) is chosen by
    `configure`.

    It keeps a small ledger in its own storage (enqueue times, running tasks, consumer
    heartbeats, per-minute counters) so that `health()` answers for every consumer on any host.
    """

    storage: LaneStorage

    def __init__(self, name: str):
        self.settings = LaneSettings.load(name)
        self.broker_url = ""
        self.queue_dir: Path | None = None
        self.interval_tasks: list[tuple[TaskWrapper, float]] = []
        self.check_hooks: list[Callable[[], None]] = []
        self.app: Flask | None = None  # set by init_app: tasks run in its context
        self.tasks: dict[str, TaskWrapper] = {}  # by short name, for send()
        super().__init__(name, results=False, utc=True)
        self.signal()(self._record)

    def every(self, seconds: float, name: str) -> Callable[[Callable], TaskWrapper]:
        """Declare a task on this lane that its consumer enqueues every `seconds` (and once
        at start-up); several consumers of one lane each enqueue it, so it must be idempotent."""

        def decorator(func: Callable) -> TaskWrapper:
            task = self.task(name=name)(func)
            self.interval_tasks.append((task, seconds))
            return task

        return decorator

    def on_check(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run `hook` in this lane's consumer process when it starts and whenever it checks
        its workers (every HEARTBEAT_SECONDS): e.g. to resume the jobs of a worker that died."""
        self.check_hooks.append(hook)
        return hook

    def get_storage(self, **kwargs) -> LaneStorage:
        """The lane's storage, chosen once (by `configure`): see open_storage."""
        return open_storage(self.name, self.broker_url, self.queue_dir)

    def get_immediate_storage(self) -> LaneStorage:
        return MemoryLaneStorage(self.name)

    def configure(self, broker_url: str, queue_dir: Path) -> None:
        self.broker_url, self.queue_dir = broker_url, Path(queue_dir)
        if not self.immediate:
            self.storage = self.create_storage()

    def task(self, **kwargs) -> Callable:
        """Declare a task on this lane, with the lane's timeout and retry policy as defaults."""
        s = self.settings
        kwargs.setdefault("timeout", s.timeout)
        kwargs.setdefault("retries", s.retries)
        kwargs.setdefault("retry_delay", s.retry_delay)
        kwargs.setdefault("retry_backoff", s.retry_backoff)
        declare = super().task(**kwargs)

        def decorator(fn: Callable) -> TaskWrapper:
            wrapper = declare(fn)
            self.tasks[kwargs.get("name") or fn.__name__] = wrapper
            return wrapper

        return decorator

    def send(self, task_name: str, *args, delay: float | None = None) -> None:
        """Put a message for this lane's task `task_name` on the lane (after `delay` seconds):
        how the core sends work without importing the module that declares the task."""
        try:
            task = self.tasks[task_name]
        except KeyError:
            raise LookupError(f"lane {self.name!r} has no task {task_name!r}: "
                              "is jobs.tasks imported?") from None
        if delay is None:
            task(*args)
        else:
            task.schedule(args, delay=delay)

    def context(self) -> AbstractContextManager:
        """A fresh app context (so a database session of its own) for a task or a consumer
        hook: of the current app, else of the app `init_app` bound (a worker process has no
        other). Fresh also in immediate mode, where a task may run inside another's commit."""
        app = current_app._get_current_object() if has_app_context() else self.app
        if app is None:
            raise RuntimeError(f"lane {self.name!r} has no app: call jobs.lanes.init_app(app)")
        return app.app_context()

    def periodic_task(self, validate_datetime, **kwargs) -> Callable:
        """A periodic task that runs once per schedule however many consumers run the lane.

        Every consumer's scheduler enqueues it; the first run to claim the schedule's minute
        (rounded, so clocks may differ by up to 30 s) in the lane's storage does the work.
        """

        def decorator(fn: Callable) -> Callable:
            name = kwargs.get("name") or fn.__name__

            @functools.wraps(fn)
            def once(*args, **kw):
                slot = round(time.time() / 60)
                if not self.storage.put_if_empty(f"{PERIODIC}{name}:{slot}", b"1"):
                    return None
                self.storage.delete_data(f"{PERIODIC}{name}:{slot - 5}")
                return fn(*args, **kw)

            return super(Lane, self).periodic_task(validate_datetime, **kwargs)(once)

        return decorator

    def enqueue(self, task):
        """Enqueue a task declared on this lane (another lane's task raises), stamping the time."""
        self._registry.create_message(task)  # raises HueyException for another lane's task
        result = super().enqueue(task)
        if not self.immediate and not task.eta:
            self.storage.put_data(ENQUEUED + task.id, repr(time.time()).encode())
        return result

    @property
    def paused(self) -> bool:
        """Set by an admin (jobs.dispatch.pause): the lane's consumers take nothing new."""
        return self.storage.peek_data(PAUSED) is not EmptyData

    def pause(self) -> None:
        self.storage.put_data(PAUSED, b"1")

    def resume(self) -> None:
        self.storage.delete_data(PAUSED)

    def dequeue(self):
        """The next task, or None while the lane is paused (queued work waits in the queue)."""
        if self.paused:
            if self.storage.blocking:  # Huey's worker sleeps only after a polling storage's
                time.sleep(self.settings.poll_interval)  # empty read: else it would spin
            return None
        return super().dequeue()

    def held(self, task_name: str) -> set[int]:
        """The first argument (a job or email id) of every message for the task `task_name`
        ("send_email" or its full name "jobs.tasks.send_email") that this lane holds: in its
        queue, or in its schedule (delayed messages and Huey's retries wait there).

        Queue and schedule are read at one instant (`LaneStorage.held_messages`), so
        a message the scheduler moves from one to the other meanwhile is seen. A message a
        worker has taken and not finished with is in neither: callers allow for that.
        """
        ids: set[int] = set()
        for data in self.storage.held_messages():
            try:
                message = self.serializer.deserialize(data)
            except Exception:  # unreadable: no worker could run it either
                log.warning("lane %s holds a message it cannot read", self.name)
                continue
            if message.args and task_name in (message.name, message.name.rpartition(".")[2]):
                ids.add(message.args[0])
        return ids

    def minutes(self, count: int = 60) -> list[tuple[int, int, int]]:
        """(minute, completed, failed) for the last `count` minutes, oldest first."""
        return self.storage.minutes(count)

    def execute(self, task, timestamp=None):
        """Run a task under this lane's hard timeout, whatever timeout its message carries."""
        task.timeout = min(task.timeout or self.settings.timeout, self.settings.timeout)
        with self.context():
            return super().execute(task, timestamp)

    def _record(self, signal: str, task, *_args) -> None:
        """Huey signal handler: keep the ledger of running tasks and per-minute outcomes."""
        storage, now = self.storage, time.time()
        if signal == S.SIGNAL_EXECUTING:
            storage.pop_data(ENQUEUED + task.id)
            info = {"task": task.name, "worker": f"{socket.gethostname()}:{os.getpid()}",
                    "started": now}
            storage.put_data(RUNNING + task.id, json.dumps(info).encode())
        elif signal in (S.SIGNAL_COMPLETE, S.SIGNAL_ERROR, S.SIGNAL_TIMEOUT):
            storage.delete_data(RUNNING + task.id)
            storage.count("completed" if signal == S.SIGNAL_COMPLETE else "failed", now)
        elif signal == S.SIGNAL_INTERRUPTED:  # stopped by a shutdown: give it back, not lose it
            storage.delete_data(RUNNING + task.id)
            self.enqueue(task)
        elif signal in (S.SIGNAL_REVOKED, S.SIGNAL_CANCELED, S.SIGNAL_EXPIRED):
            storage.pop_data(ENQUEUED + task.id)

    def heartbeat(self, workers: int) -> None:
        key = f"{CONSUMER}{socket.gethostname()}:{os.getpid()}"
        self.storage.put_data(key, json.dumps({"at": time.time(), "workers": workers}).encode())

    def health(self) -> dict:
        """Depth, oldest wait, running tasks, live workers, outcomes in the last 5 minutes."""
        now = time.time()
        depth = self.pending_count()
        items = self.storage.result_items()
        enqueued = [float(v) for k, v in items.items() if k.startswith(ENQUEUED)]
        consumers = [json.loads(v) for k, v in items.items() if k.startswith(CONSUMER)]
        live = [c for c in consumers if now - c["at"] <= 3 * HEARTBEAT_SECONDS]
        running = [json.loads(v) for k, v in items.items() if k.startswith(RUNNING)]
        recent = self.minutes(5)
        return {
            "lane": self.name,
            "broker": self.storage.kind,
            "depth": depth,
            "oldest_wait": round(now - min(enqueued), 3) if depth and enqueued else 0.0,
            "running": len(running) if live else 0,
            "consumers": len(live),
            "workers": sum(c["workers"] for c in live),
            "completed_5m": sum(completed for _, completed, _ in recent),
            "failed_5m": sum(failed for _, _, failed in recent),
        }

    def consumer(self, **overrides) -> Consumer:
        """A consumer with this lane's settings; SIGINT and SIGTERM both stop it gracefully."""
        s = self.settings
        options = dict(
            workers=s.workers,
            worker_type=s.worker_type,
            initial_delay=min(0.1, s.poll_interval),
            max_delay=s.poll_interval,
            backoff=1.15,
            periodic=True,
            check_worker_health=True,
            health_check_interval=HEARTBEAT_SECONDS,
            shutdown_timeout=s.shutdown_timeout,
        )
        options.update(overrides)
        return LaneConsumer(self, **options)


class LaneConsumer(Consumer):
    """Huey's consumer plus interval tasks, a heartbeat and a graceful SIGTERM."""

    scheduler_class = LaneScheduler

    def __init__(self, lane: Lane, **options):
        super().__init__(lane, **options)
        self.lane = lane
        self._signal_actions[signal.SIGTERM] = (False, True)  # graceful, like SIGINT
        global _stop_flag
        _stop_flag = self.stop_flag  # forked workers inherit it: see `stopping()`

    def start(self) -> None:
        self._survive(self.lane.heartbeat, self.workers)  # before any worker runs a task (Huey
        super().start()  # then closes the storage connection, so forked workers open their own)
        self._run_check_hooks()

    def check_worker_health(self) -> bool:
        healthy = super().check_worker_health()
        self._survive(self.lane.heartbeat, self.workers)
        self._run_check_hooks()
        return healthy

    def _run_check_hooks(self) -> None:
        for hook in self.lane.check_hooks:
            self._survive(self._in_app_context, hook)

    def _in_app_context(self, hook: Callable[[], None]) -> None:
        with self.lane.context():
            hook()

    def _survive(self, step: Callable, *args) -> None:
        """Run a step of the consumer's own loop; a broker or database that does not answer
        (Redis restarting, say) is logged and tried again next time, never lets the error
        escape the loop (Huey's consumer would stop replacing its dead workers)."""
        try:
            step(*args)
        except Exception:
            log.exception("lane %s: %s failed; trying again at the next check", self.lane.name,
                          getattr(step, "__name__", step))

    def stop(self, graceful: bool = False) -> None:
        super().stop(graceful)
        self._survive(self.lane.storage.delete_data,
                      f"{CONSUMER}{socket.gethostname()}:{os.getpid()}")


critical = Lane("critical")
exports = Lane("exports")
LANES: dict[str, Lane] = {lane.name: lane for lane in (critical, exports)}


def init_app(app: Flask) -> None:
    """Bind every lane to the app: the app context each of its tasks runs in, and its storage
    (SQLite files in the instance folder, or Redis or PostgreSQL when BROKER_URL says)."""
    for lane in LANES.values():
        lane.app = app
    configure(app.config["BROKER_URL"], Path(app.instance_path))


def configure(broker_url: str, queue_dir: Path) -> None:
    """Point every lane at its storage: SQLite files in queue_dir, or Redis or PostgreSQL when
    broker_url says."""
    for lane in LANES.values():
        lane.configure(broker_url, queue_dir)
