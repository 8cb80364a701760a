"""PostgreSQL's pages as CSV: the server formats every value and writes the CSV itself (COPY).

Literal values in the SQL are validated server-side parameters (integers, ISO dates, fixed
choices), rendered by SQLAlchemy: COPY cannot take bind parameters. psycopg is imported where it
is used, not here: it is the `postgres` extra, and SQLite-only installs import this module too
(through `jobs.pages`).
"""

from __future__ import annotations

import csv
import queue
import select
from collections.abc import Iterator

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    Numeric,
    Select,
    Text,
    bindparam,
    case,
    cast,
    func,
    literal,
)
from sqlalchemy import exc as sa_exc

from jobs.csvrows import FORMULA_PREFIXES, Batch
from jobs.datasets import Column, Dataset
from jobs.readahead import side_by_side

try:
    from jobs import _fastcsv  # its copy_out (pyproject.toml: optional)
except ImportError:
    _fastcsv = None

FORMULA_CODES = [ord(prefix) for prefix in FORMULA_PREFIXES]


def copy_query(dataset: Dataset, org_key: str | None, params: dict[str, str], after: object,
               size: int | None) -> Select:
    """The page as PostgreSQL text columns, ready for COPY (also the benchmark's psql query)."""
    stmt = dataset.batch(org_key, params, after, size)
    return stmt.with_only_columns(
        *(_pg_text(dataset.table.c[c.name], c) for c in dataset.columns),
        maintain_column_froms=True,
    )


def _pg_text(col: ColumnElement, column: Column) -> ColumnElement:
    """A value as the text docs/data-quality.md gives it, printed by the server in the
    session's fixed styles (jobs.source: UTC, ISO dates, shortest floats, hex bytea)."""
    kind = column.kind
    if kind == "int":
        value = cast(col, BigInteger)
    elif kind == "decimal" and column.scale is not None:  # a float is read from 15 digits
        value = func.round(cast(col, Numeric), column.scale).cast(Text)
    elif kind == "decimal":
        value = cast(col, Text)
    elif kind == "date":
        value = cast(cast(col, Date), Text)
    elif kind == "datetime":  # timestamptz: its UTC wall time
        value = cast(func.date_trunc("second", cast(col, DateTime)), Text)
    elif kind == "bool":
        value = cast(cast(col, Boolean), Text)
    else:  # empty text as NULL, so COPY writes an empty field (not "") as SQLite's path does
        col = cast(col, Text)  # bytea, json and arrays as PostgreSQL prints them
        # The first character's code, not substr() IN (…): a comparison of integers, which
        # costs the server next to nothing, where six text comparisons cost a third of a page.
        value = case((func.ascii(col).in_(FORMULA_CODES), literal("'") + col),
                     else_=func.nullif(col, ""))
    return value.label(column.name)


PAGES_IN_FLIGHT = 2  # PostgreSQL formats a page slower than we read it: two backends at once


def pages(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
          after: object, size: int) -> Iterator[Batch]:
    """Pages as key ranges read side by side: the key that ends each page is looked up first
    on `conn` (the `size`-th key after the last one, read from the key's index), so the next
    pages can be read on connections of their own while this one is written. The page
    without an end is the last, unless it comes back full (rows added meanwhile)."""
    import psycopg  # lazily: see the module docstring

    key = dataset.table.c[dataset.key]
    key_index = dataset.column_names.index(dataset.key)
    lower, upper = bindparam("lower", 0), bindparam("upper", 0)  # 0: replaced per page

    def compiled(stmt: Select):
        return stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})

    ends = {first: dataset.batch(org_key, params, None if first else lower, 1)
            .with_only_columns(key).offset(size - 1) for first in (True, False)}
    queries = {(first, last): compiled(copy_query(dataset, org_key, params,
                                                  None if first else lower,
                                                  size if last else None)
                                       .where(*([] if last else [key <= upper])))
               for first in (True, False) for last in (True, False)}
    spare = [conn.engine.raw_connection() for _ in range(PAGES_IN_FLIGHT)]
    free: queue.SimpleQueue = queue.SimpleQueue()
    for connection in spare:
        free.put(connection.driver_connection)

    def fetch(start: object, end: object) -> Batch | None:
        page = queries[start is None, end is None]
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
        last = next(csv.reader([last_row.decode(errors="replace")]))[key_index]
        return Batch(data, rows, int(last), utf8=True)  # the session's encoding (jobs.source)

    def end_after(start: object) -> object:
        return conn.execute(ends[start is None], {} if start is None else {"lower": start}).scalar()

    try:  # closing it closes side_by_side first: the pages under way end before their connection
        yield from side_by_side(end_after, fetch, after, size, PAGES_IN_FLIGHT)
    finally:
        for connection in spare:
            connection.close()


def _copy(driver, query: str) -> tuple[bytearray, int, bytes]:
    """The output of a COPY ... TO STDOUT read straight from libpq: (bytes, rows, last row).

    psycopg's Copy iterator costs a generator round trip per row, as much time as the server
    spends on it; keeping a buffer object per row costs as much again (the garbage collector
    walks them). Here each row is one call appended to one bytearray: in C without the GIL
    (jobs._fastcsv.copy_out, a tenth of the time) where it was built, else in Python
    (`_copy_rows`). Either waits for the server without the GIL: the lease heartbeat runs
    through a slow page.
    """
    from psycopg import errors, pq  # lazily: see the module docstring

    pgconn = driver.pgconn
    result = pgconn.exec_(query.encode())
    if result.status != pq.ExecStatus.COPY_OUT:
        raise _database_error(query, errors.error_from_result(result))
    if _fastcsv is not None and _fastcsv.libpq():  # the same loop, in C without the GIL
        data, rows, last_row = _fastcsv.copy_out(pgconn.pgconn_ptr)
    else:
        data, rows, last_row = _copy_rows(pgconn)
    result = pgconn.get_result()
    while pgconn.get_result() is not None:  # the end of the command
        pass
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise _database_error(query, errors.error_from_result(result))
    return data, rows, last_row


def _copy_rows(pgconn) -> tuple[bytearray, int, bytes]:
    """The COPY's rows, their count and the last one, in Python: waits happen in select()."""
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
            return data, rows, bytes(row)


def _database_error(query: str, error: Exception) -> sa_exc.DBAPIError:
    """The error as SQLAlchemy would raise it, so the engine's retry policy applies."""
    import psycopg  # lazily: see the module docstring

    return sa_exc.DBAPIError.instance(query, None, error, psycopg.Error)
