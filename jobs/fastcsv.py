"""CSV at the database's own speed: PostgreSQL's COPY; for SQLite, Arrow in a reader process.

Both paths write the same bytes, PostgreSQL's COPY CSV format: a field is quoted only when it
holds a comma, a double quote, CR or LF (quotes doubled inside); NULL and empty text are both an
empty field; LF ends a row. Text a spreadsheet would run as a formula gets a leading apostrophe.
Each batch is one keyset page (`Dataset.batch`), so an export can checkpoint after any batch
and resume after its last key. Literal values in the SQL are validated server-side parameters
(integers, ISO dates, fixed choices), rendered by SQLAlchemy: COPY cannot take bind parameters.
"""

from __future__ import annotations

import csv
import json
import queue
import select
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    Integer,
    Select,
    String,
    Text,
    bindparam,
    case,
    cast,
    func,
    literal,
    literal_column,
)
from sqlalchemy import exc as sa_exc

from jobs.datasets import Dataset

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # also in jobs.sqlite_reader, as a regex


@dataclass(frozen=True)
class Batch:
    data: bytes | bytearray  # whole CSV rows, each ending in LF
    rows: int
    last_key: int


def neutralise(text: str) -> str:
    """Stop spreadsheets from running a text cell as a formula (OWASP CSV injection)."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def header(dataset: Dataset) -> bytes:
    return (",".join(dataset.column_names) + "\n").encode()


def batches(conn: Connection, dataset: Dataset, org_id: int, params: dict[str, str],
            after: object, size: int) -> Iterator[Batch]:
    """The dataset's rows after key `after` as CSV, `size` rows per batch, in key order."""
    if conn.dialect.name == "postgresql":
        return _copy_batches(conn, dataset, org_id, params, after, size)
    if conn.dialect.name == "sqlite":
        return _sqlite_batches(conn, dataset, org_id, params, after, size)
    raise NotImplementedError(f"no CSV path for {conn.dialect.name}")


def _sql(conn: Connection, stmt: Select) -> str:
    return str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))


# PostgreSQL: the server formats every value and writes the CSV itself (COPY ... TO STDOUT).


def copy_query(dataset: Dataset, org_id: int, params: dict[str, str], after: object,
               size: int | None) -> Select:
    """The page as PostgreSQL text columns, ready for COPY (also the benchmark's psql query)."""
    stmt = dataset.batch(org_id, params, after, size)
    return stmt.with_only_columns(
        *(_pg_text(dataset.table.c[c.name], c.kind) for c in dataset.columns),
        maintain_column_froms=True,
    )


def _pg_text(col: ColumnElement, kind: str) -> ColumnElement:
    if kind == "int":
        value = col
    elif kind == "money":
        value = func.round(col, 2).cast(String)
    elif kind == "datetime":
        value = func.to_char(col, "YYYY-MM-DD HH24:MI:SS")
    else:  # empty text as NULL, so COPY writes an empty field (not "") as SQLite's path does
        value = func.nullif(case((func.substr(col, 1, 1).in_(FORMULA_PREFIXES),
                                  literal("'") + col), else_=col), "")
    return value.label(col.name)


PAGES_IN_FLIGHT = 2  # PostgreSQL formats a page slower than we read it: two backends at once


def _copy_batches(conn: Connection, dataset: Dataset, org_id: int, params: dict[str, str],
                  after: object, size: int) -> Iterator[Batch]:
    """Pages as key ranges read side by side: the key that ends each page is looked up first
    on `conn` (the `size`-th key after the last one, read from the key's index), so the next
    pages can be read on connections of their own while this one is written. The page
    without an end is the last, unless it comes back full (rows added meanwhile)."""
    import psycopg

    key = dataset.table.c[dataset.key]
    key_index = dataset.column_names.index(dataset.key)
    lower, upper = bindparam("lower", 0), bindparam("upper", 0)  # 0: replaced per page

    def compiled(stmt: Select):
        return stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})

    ends = {first: dataset.batch(org_id, params, None if first else lower, 1)
            .with_only_columns(key).offset(size - 1) for first in (True, False)}
    pages = {(first, last): compiled(copy_query(dataset, org_id, params, None if first else lower,
                                                size if last else None)
                                     .where(*([] if last else [key <= upper])))
             for first in (True, False) for last in (True, False)}
    spare = [conn.engine.raw_connection() for _ in range(PAGES_IN_FLIGHT)]
    free: queue.SimpleQueue = queue.SimpleQueue()
    for connection in spare:
        free.put(connection.driver_connection)

    def fetch(start: object, end: object) -> Batch | None:
        page = pages[start is None, end is None]
        values = {**page.params, **{k: v for k, v in (("lower", start), ("upper", end))
                                    if k in page.params}}
        driver = free.get()
        try:  # values merged client-side by psycopg: COPY takes no bind parameters
            sql = psycopg.ClientCursor(driver).mogrify(str(page), values)
            data, rows, last_row = _copy(driver, f"COPY ({sql}) TO STDOUT WITH (FORMAT csv)")
        finally:
            free.put(driver)
        if not rows:
            return None
        # COPY sends one message per row: the page's last one holds its last key
        return Batch(data, rows, int(next(csv.reader([last_row.decode()]))[key_index]))

    try:
        with ThreadPoolExecutor(PAGES_IN_FLIGHT, thread_name_prefix="copy-page") as pool:
            pending: deque = deque()  # (page being read, is it the last)
            start, more = after, True
            while more or pending:
                while more and len(pending) < PAGES_IN_FLIGHT:
                    end = conn.execute(ends[start is None],
                                       {} if start is None else {"lower": start}).scalar()
                    pending.append((pool.submit(fetch, start, end), end is None))
                    start, more = end, end is not None
                future, last = pending.popleft()
                batch = future.result()
                if batch is None:  # a range emptied meanwhile, or nothing left
                    continue
                if last and batch.rows == size:
                    start, more = batch.last_key, True
                yield batch
    finally:
        for connection in spare:
            connection.close()


def _copy(driver, query: str) -> tuple[bytearray, int, bytes]:
    """The output of a COPY ... TO STDOUT read straight from libpq: (bytes, rows, last row).

    psycopg's Copy iterator costs a generator round trip per row, as much time as the server
    spends on it; keeping a buffer object per row costs as much again (the garbage collector
    walks them). Here each row is one call appended to one bytearray. When no row is buffered
    the loop waits in select(), which releases the GIL: the lease heartbeat runs through a
    slow page.
    """
    from psycopg import errors, pq

    pgconn = driver.pgconn
    result = pgconn.exec_(query.encode())
    if result.status != pq.ExecStatus.COPY_OUT:
        raise _database_error(query, errors.error_from_result(result))
    data, rows, row = bytearray(), 0, b""
    while True:
        size, received = pgconn.get_copy_data(1)  # 1: never block while holding the GIL
        if size > 0:
            data += received
            rows += 1
            row = received
        elif size == 0:
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        else:
            break
    last_row = bytes(row)
    result = pgconn.get_result()
    while pgconn.get_result() is not None:  # the end of the command
        pass
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise _database_error(query, errors.error_from_result(result))
    return data, rows, last_row


def _database_error(query: str, error: Exception) -> sa_exc.DBAPIError:
    """The error as SQLAlchemy would raise it, so the engine's retry policy applies."""
    import psycopg

    return sa_exc.DBAPIError.instance(query, None, error, psycopg.Error)


# SQLite: a child process reads pages with ADBC and formats them with Arrow (jobs.sqlite_reader).


FRAME = struct.Struct("<qqq")  # the reader's header before each page: rows, last key, bytes


class ReadFailed(RuntimeError):
    """The SQLite reader process stopped with an error."""


def _sqlite_column(col: ColumnElement, kind: str) -> ColumnElement:
    """A column with one type per page, as ADBC infers each column's type from its values:
    numbers as numbers (Arrow formats them), text never NULL (NULL and '' are both empty)."""
    if kind == "int":
        return cast(col, Integer)
    if kind == "money":
        return cast(col, Float)
    return func.coalesce(cast(col, Text), "")


def _sqlite_batches(conn: Connection, dataset: Dataset, org_id: int, params: dict[str, str],
                    after: object, size: int) -> Iterator[Batch]:
    table = dataset.table
    columns = [table.c[dataset.key],
               *(_sqlite_column(table.c[c.name], c.kind) for c in dataset.columns)]

    def page(after: object) -> str:
        stmt = dataset.batch(org_id, params, after, size)
        return _sql(conn, stmt.with_only_columns(*columns, maintain_column_froms=True))

    spec = {"database": conn.engine.url.database, "size": size, "after": after,
            "frame": FRAME.format,
            "kinds": [c.kind for c in dataset.columns],
            "from_start": page(None), "after_key": page(literal_column("?"))}  # ?: bound per page
    reader = subprocess.Popen([sys.executable, "-m", "jobs.sqlite_reader"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    try:
        reader.stdin.write(json.dumps(spec).encode())
        reader.stdin.close()
        while header := reader.stdout.read(FRAME.size):
            rows, last_key, length = FRAME.unpack(header)
            yield Batch(reader.stdout.read(length), rows, last_key)
        if reader.wait() != 0:
            error = reader.stderr.read().decode(errors="replace").strip().splitlines()
            raise ReadFailed(error[-1] if error else f"exit status {reader.returncode}")
    finally:
        if reader.poll() is None:  # closed early (cancel, shutdown, timeout): stop reading
            reader.kill()
            reader.wait()
        reader.stdout.close()
        reader.stderr.close()
