"""Lanes on PostgreSQL (BROKER_URL=postgresql+psycopg://…), against the real server: what the
lanes need of their storage beyond what tests/test_lanes.py shows through real consumers."""

from __future__ import annotations

import multiprocessing
import secrets
import threading
from datetime import UTC, datetime, timedelta

import pytest
from conftest import LANES_POSTGRES_SERVER, create_database, drop_database, query, wait_for
from sqlalchemy import make_url

from jobs.lane_storage import PostgresLaneStorage, open_storage

pytestmark = pytest.mark.integration


def lane_name() -> str:
    """A queue of the test's own in the shared lanes database."""
    return f"test-{secrets.token_hex(4)}"


def test_every_spelling_of_a_postgresql_url_selects_it_and_tables_wait_for_first_use(
        postgres_lanes):
    url = create_database(LANES_POSTGRES_SERVER)
    try:
        parsed = make_url(url)
        spellings = [parsed.set(drivername=d).render_as_string(hide_password=False)
                     for d in ("postgresql+psycopg", "postgresql", "postgres")]
        storages = [open_storage("critical", each, None) for each in spellings]
        assert [(s.kind, type(s)) for s in storages] == [("postgresql", PostgresLaneStorage)] * 3
        tables = "select table_name from information_schema.tables where table_name like 'lane%'"
        assert query(url, tables) == [], "configuring a lane creates nothing"
        storages[0].enqueue(b"first")
        assert sorted(t for (t,) in query(url, tables)) == [
            "lane_counter", "lane_kv", "lane_schedule", "lane_task"]
        assert storages[2].dequeue() == b"first", "one queue, whichever spelling"
        for storage in storages:
            storage.close()
    finally:
        drop_database(LANES_POSTGRES_SERVER, url)


def test_a_waiting_worker_is_woken_by_the_enqueue_not_by_a_poll(postgres_lanes):
    """The worker's wait is far longer than the test's deadline: only the enqueue's NOTIFY can
    hand it the message in time."""
    name = lane_name()
    worker, producer = open_storage(name, postgres_lanes, None), open_storage(
        name, postgres_lanes, None)
    worker.read_timeout = 600
    got: list[bytes | None] = []
    waiting = threading.Thread(target=lambda: got.append(worker.dequeue()), daemon=True)
    waiting.start()
    listening = (f"select 1 from pg_stat_activity where datname = "
                 f"'{make_url(postgres_lanes).database}' and query like 'listen %{name}%' "
                 "and state = 'idle'")
    wait_for(lambda: query(LANES_POSTGRES_SERVER, listening), what="the worker to LISTEN")
    producer.enqueue(b"wake up")
    waiting.join(60)
    assert got == [b"wake up"]
    worker.close()
    producer.close()


def _drain(args: tuple[str, str]) -> list[bytes]:
    """A worker process: its own storage, taking messages until the lane stays empty."""
    url, name = args
    storage = open_storage(name, url, None)
    taken = []
    while (data := storage.dequeue()) is not None:
        taken.append(data)
    storage.close()
    return taken


def test_concurrent_workers_take_every_message_exactly_once(postgres_lanes):
    name = lane_name()
    storage = open_storage(name, postgres_lanes, None)
    sent = [f"message {n}".encode() for n in range(400)]
    for data in sent:
        storage.enqueue(data)
    storage.close()
    with multiprocessing.get_context("fork").Pool(4) as pool:
        taken = pool.map(_drain, [(postgres_lanes, name)] * 4)
    everything = [data for each in taken for data in each]
    assert sorted(everything) == sorted(sent), "each message taken once, none lost"
    assert sum(1 for each in taken if each) >= 2, "the workers shared the line"


def test_priority_schedule_counters_and_one_snapshot_of_what_is_held(postgres_lanes):
    storage = open_storage(lane_name(), postgres_lanes, None)
    storage.enqueue(b"low")
    storage.enqueue(b"high", priority=10)
    now = datetime.now(UTC).replace(tzinfo=None)
    storage.add_to_schedule(b"due", now - timedelta(seconds=1))
    storage.add_to_schedule(b"later", now + timedelta(hours=1))
    assert sorted(storage.held_messages()) == [b"due", b"high", b"later", b"low"]
    assert storage.read_schedule(now) == [b"due"]
    assert (storage.dequeue(), storage.dequeue()) == (b"high", b"low")
    storage.count("completed", 120.0)
    storage.count("completed", 150.0)
    storage.count("failed", 180.0)
    assert storage.counts(["ledger:completed:2", "ledger:failed:3", "ledger:failed:2"]) == {
        "ledger:completed:2": 2, "ledger:failed:3": 1}
    assert storage.put_if_empty("ledger:periodic:x", b"1")
    assert not storage.put_if_empty("ledger:periodic:x", b"1"), "claimed once"
    storage.close()


def _child(storage: PostgresLaneStorage, answer) -> None:
    storage.after_fork()
    storage.enqueue(b"from the child")
    answer.send((storage.conn.info.backend_pid, storage.dequeue()))


def test_a_forked_worker_opens_connections_of_its_own(postgres_lanes):
    """A consumer forks its workers: each must talk to PostgreSQL on its own connection, never
    on the parent's socket (two processes on one connection corrupt its protocol)."""
    storage = open_storage(lane_name(), postgres_lanes, None)
    parent_pid = storage.conn.info.backend_pid
    fork = multiprocessing.get_context("fork")
    answers, answer = fork.Pipe()
    child = fork.Process(target=_child, args=(storage, answer))  # forked: nothing pickled
    child.start()
    assert answers.poll(60), "the child answered"
    child_pid, taken = answers.recv()
    child.join(60)
    assert child.exitcode == 0
    assert child_pid != parent_pid and taken == b"from the child"
    assert storage.conn.info.backend_pid == parent_pid and storage.queue_size() == 0
    storage.close()
