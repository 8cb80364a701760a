"""PostgreSQL's pages as CSV, by COPY: a binary COPY that jobs._fastcsv.copy_out writes as CSV in
C, the server formatting only the columns whose stored type does not print as an export
formats it (`binary_fields`); else (no C extension, or a value copy_out does not write) a CSV
COPY of the query that has the server format every value (`_pg_text`).

Literal values in the SQL are validated server-side parameters (integers, ISO dates, fixed
choices), rendered by SQLAlchemy: COPY cannot take bind parameters. psycopg is imported where it
is used, not here: it is the `postgres` extra, and SQLite-only installs import this module too
(through `jobs.pages`).
"""

from __future__ import annotations

import csv
import queue
import select
from collections.abc import Container, Iterator

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

from jobs.csvrows import FORMULA_PREFIXES, Batch, Finish, valid_utf8
from jobs.datasets import Column, Dataset
from jobs.readahead import side_by_side

try:
    from jobs import _fastcsv  # its copy_out (pyproject.toml: optional)
except ImportError:
    _fastcsv = None

FORMULA_CODES = [ord(prefix) for prefix in FORMULA_PREFIXES]


def copy_query(dataset: Dataset, org_key: str | None, params: dict[str, str], after: object,
               size: int | None, as_stored: Container[str] = ()) -> Select:
    """The page as PostgreSQL text columns, ready for COPY (also the benchmark's psql query);
    the columns named in `as_stored` as stored (read by a binary COPY: binary_fields)."""
    stmt = dataset.batch(org_key, params, after, size)
    return stmt.with_only_columns(
        *(dataset.table.c[c.name].label(c.name) if c.name in as_stored
          else _pg_text(dataset.table.c[c.name], c) for c in dataset.columns),
        maintain_column_froms=True,
    )


# How jobs._fastcsv.copy_out writes a field of a binary COPY (its enum field), by the type the
# query gives it: a text (as _pg_text formats it), a text column as stored, or a value as stored.
TEXT, STORED_TEXT, INT2, INT4, INT8, NUMERIC, DATE, TIMESTAMP = range(8)
STORED = {"int2": INT2, "int4": INT4, "int8": INT8, "numeric": NUMERIC, "date": DATE,
          "timestamp": TIMESTAMP, "timestamptz": TIMESTAMP, "text": STORED_TEXT,
          "varchar": STORED_TEXT}


def binary_fields(conn: Connection, dataset: Dataset, org_key: str | None,
                  params: dict[str, str]) -> tuple[set[str], bytes]:
    """The columns a binary COPY reads as stored, and how copy_out writes each column (its
    enum field, in the dataset's order). As stored where the stored type prints as `_pg_text`
    formats it but for what copy_out does in C (a fraction of a second, a formula prefix, an
    empty text), else formatted by the server (text, or int8 for an int): printing values
    costs the server a third of a page's time, a binary COPY next to nothing. The stored types
    are the query's result types. A value copy_out does not write (a timestamp BC, infinity)
    has the server format the page after all."""
    stmt = dataset.batch(org_key, params, None, 0).with_only_columns(
        *(dataset.table.c[c.name] for c in dataset.columns), maintain_column_froms=True)
    result = conn.execute(stmt)
    types = conn.connection.dbapi_connection.adapters.types
    as_stored, fields = set(), []
    for column, described in zip(dataset.columns, result.cursor.description, strict=True):
        stored = types.get(described.type_code)
        if _as_stored(column, stored.name if stored else "", described.scale):
            as_stored.add(column.name)
            fields.append(STORED[stored.name])
        else:  # _pg_text's type
            fields.append(INT8 if column.kind == "int" else TEXT)
    result.close()
    return as_stored, bytes(fields)


def _as_stored(column: Column, stored: str, scale: int | None) -> bool:
    """Whether a column of this kind stored as this type prints as `_pg_text` formats it, but
    for what copy_out does."""
    kind = column.kind
    return ((kind == "int" and stored in ("int2", "int4", "int8"))
            # a numeric(p, s) prints s places: round(x, s) prints the same
            or (kind == "decimal" and stored == "numeric" and column.scale in (None, scale))
            or (kind == "date" and stored == "date")
            or (kind == "datetime" and stored in ("timestamp", "timestamptz"))
            or (kind == "text" and stored in ("text", "varchar")))


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


PAGES_IN_FLIGHT = 3  # the server reads a page slower than we do: three backends at once (issue 19)


def pages(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
          after: object, size: int, finish: Finish = valid_utf8) -> Iterator[Batch]:
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

    in_c = _fastcsv is not None and _fastcsv.libpq()  # copy_out can read the rows
    as_stored, fields = binary_fields(conn, dataset, org_key, params) if in_c else ((), None)
    queries = {(first, last, binary): compiled(copy_query(dataset, org_key, params,
                                                          None if first else lower,
                                                          size if last else None,
                                                          as_stored if binary else ())
                                               .where(*([] if last else [key <= upper])))
               for first in (True, False) for last in (True, False)
               for binary in {False, in_c}}
    spare = [conn.engine.raw_connection() for _ in range(PAGES_IN_FLIGHT)]
    free: queue.SimpleQueue = queue.SimpleQueue()
    for connection in spare:
        free.put(connection.driver_connection)

    def copy(driver, start: object, end: object, binary: bool) -> tuple | bool:
        page = queries[start is None, end is None, binary]
        values = {**page.params, **{k: v for k, v in (("lower", start), ("upper", end))
                                    if k in page.params}}
        # values merged client-side by psycopg: COPY takes no bind parameters
        sql = psycopg.ClientCursor(driver).mogrify(str(page), values)
        return _copy(driver, f"COPY ({sql}) TO STDOUT WITH (FORMAT "
                             f"{'binary' if binary else 'csv'})", in_c, fields if binary else None)

    def fetch(start: object, end: object) -> Batch | None:
        driver = free.get()
        try:
            got = copy(driver, start, end, binary=in_c)
            if got is False:  # a value only the server formats
                got = copy(driver, start, end, binary=False)
        finally:
            free.put(driver)
        data, rows, last_row = got
        if not rows:
            return None
        # the page's last row holds its last key
        last = next(csv.reader([last_row.decode(errors="replace")]))[key_index]
        # utf8: the session's encoding (jobs.source); finished in this thread
        return finish(Batch(data, rows, int(last), utf8=True))

    try:  # closing it closes side_by_side first: the pages under way end before their connection
        yield from side_by_side(dataset.page_ends(conn, org_key, params, size), fetch, after,
                                size, PAGES_IN_FLIGHT)
    finally:
        for connection in spare:
            connection.close()


def _copy(driver, query: str, in_c: bool, fields: bytes | None = None
          ) -> tuple[bytearray, int, bytes] | bool:
    """The output of a COPY ... TO STDOUT read straight from libpq: (bytes, rows, last row);
    with `fields` (jobs._fastcsv.copy_out's, one a column) a binary COPY written as CSV, or
    False when it holds a value copy_out does not write.

    psycopg's Copy iterator costs a generator round trip per row, as much time as the server
    spends on it; keeping a buffer object per row costs as much again (the garbage collector
    walks them). Here each row is one call appended to one bytearray: in C without the GIL
    (`in_c`: jobs._fastcsv.copy_out, a tenth of the time) where it was built, else in Python
    (`_copy_rows`). Either waits for the server without the GIL: the lease heartbeat runs
    through a slow page.
    """
    from psycopg import errors, pq  # lazily: see the module docstring

    pgconn = driver.pgconn
    result = pgconn.exec_(query.encode())
    if result.status != pq.ExecStatus.COPY_OUT:
        raise _database_error(query, errors.error_from_result(result))
    if in_c:  # the same loop, in C without the GIL
        got = _fastcsv.copy_out(pgconn.pgconn_ptr, fields)
    else:
        got = _copy_rows(pgconn)
    result = pgconn.get_result()
    while pgconn.get_result() is not None:  # the end of the command
        pass
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise _database_error(query, errors.error_from_result(result))
    return got


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
