"""SQLite's pages as CSV: by jobs._fastcsv in C while their values are canonical, else read and
formatted with Arrow by a reader process (jobs.sqlite_reader), which knows every other value.

jobs._fastcsv links the SQLite library this process already uses and runs here, in a thread,
without the GIL. The Arrow reader is a process of its own because ADBC links its own copy of
SQLite, and two copies in one process undo each other's POSIX locks (see jobs.sqlite_reader).
Both write the same bytes for a canonical value (tests/test_fast_csv.py). Literal values in the
SQL are validated server-side parameters (integers, ISO dates, fixed choices), rendered by
SQLAlchemy; the key after which a page starts is bound by the reader (`?`).
"""

from __future__ import annotations

import json
import os
import queue
import select
import struct
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Text,
    case,
    cast,
    func,
    literal,
    literal_column,
    null,
)

from jobs import source
from jobs.csvrows import BadValue, Batch, Finish, valid_utf8
from jobs.datasets import Dataset
from jobs.readahead import read_ahead, side_by_side

try:
    from jobs import _fastcsv
except ImportError:  # built without a C compiler or SQLite's headers (pyproject.toml)
    _fastcsv = None

FRAME = struct.Struct("<qqq")  # the reader's header before each page: rows, last key, bytes
BAD_VALUE = 3  # the reader's exit status when a stored value is not what its kind says


class ReadFailed(RuntimeError):
    """The SQLite reader process stopped with an error."""


def _sqlite_columns(col: ColumnElement, kind: str, exact: bool) -> list[ColumnElement]:
    """A column as the reader formats it, with one type per page (ADBC infers a column's type
    from its values, and makes a page of floats and text all text, floats in 7 digits).
    A decimal is two columns: as stored and NULL; or, read `exact`, its floats and its other
    values (integers, text) as text: the reader reads a page again so when one read as stored
    held text (or integers past 2^53 among floats). A blob in a text column is PostgreSQL's
    hex text (a blob sorts after every number and text: `>= x''` is true for blobs only)."""
    if kind == "decimal":
        if not exact:
            return [col, null()]
        return [case((func.typeof(col) == "real", col)),
                case((func.typeof(col) != "real", cast(col, Text)))]
    if kind == "text":
        hexed = literal("\\x") + func.lower(func.hex(col))
        return [case((col >= literal_column("x''"), hexed),
                     else_=func.coalesce(cast(col, Text), ""))]
    return [col]


def _bad_value(dataset: Dataset) -> ColumnElement | None:
    """Per row, the first int or bool value not stored as an integer, described (NULL when
    none): the reader fails the page on it, naming the row's key. Values of the other kinds
    fail when the reader parses them; the key is not checked (pages are read after it)."""
    whens = []
    for c in dataset.columns:
        if c.kind in ("int", "bool") and c.name != dataset.key:
            col = dataset.table.c[c.name]
            whens.append((func.typeof(col).not_in(["null", "integer"]),
                          literal(f"{c.name} holds ") + func.substr(func.quote(col), 1, 60)
                          + literal(f", not a value of kind {c.kind}")))
    return case(*whens) if whens else None


def pages(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
          after: object, size: int, finish: Finish = valid_utf8) -> Iterator[Batch]:
    """The pages from jobs._fastcsv, and from the first it cannot write on, from the Arrow
    reader process; each `finish`ed in the thread that read it."""
    if _fastcsv is not None:
        done, after = yield from _fast_pages(conn, dataset, org_key, params, after, size, finish)
        if done:
            return
    yield from _arrow_pages(conn, dataset, org_key, params, after, size, finish)


PAGES_IN_FLIGHT = 2  # pages jobs._fastcsv reads side by side, each with a connection of its own


class _NotCanonical(Exception):
    """The page after `after` holds a value jobs._fastcsv does not write."""

    def __init__(self, after: object):
        self.after = after


def _fast_pages(conn: Connection, dataset: Dataset, org_key: str | None,
                params: dict[str, str], after: object, size: int,
                finish: Finish) -> Generator[Batch, None, tuple[bool, object]]:
    """Pages written by jobs._fastcsv, two read side by side as key ranges, as PostgreSQL's
    are (jobs.readahead.side_by_side); returns (True, None) after the last, or (False, key)
    when the page after `key` holds a value it does not write."""
    key = dataset.table.c[dataset.key]
    columns = [key, *(dataset.table.c[c.name] for c in dataset.columns)]

    def page(starts_after: bool, ends_at: bool) -> str:
        """A page's SQL: after the key bound to ?1 (or from the start), up to the key bound
        to ?2 (or `size` rows)."""
        stmt = dataset.batch(org_key, params, literal_column("?1") if starts_after else None,
                             None if ends_at else size)
        stmt = stmt.with_only_columns(*columns, maintain_column_froms=True)
        return _sql(conn, stmt.where(key <= literal_column("?2")) if ends_at else stmt)

    sql = tuple(page(starts_after, ends_at) for starts_after in (False, True)
                for ends_at in (False, True))  # jobs._fastcsv's order
    # Refused here if it would do more than read (the others add key bounds only).
    source.check_sqlite(conn, sql[0])
    limit = source.timeout()
    readers = []
    try:
        for _ in range(PAGES_IN_FLIGHT):
            readers.append(_fastcsv.Reader(_uri(conn), sql, tuple(c.kind for c in dataset.columns),
                                           tuple(c.scale for c in dataset.columns), limit))
    except RuntimeError as exc:  # SQLite's error
        for reader in readers:
            reader.close()
        raise ReadFailed(str(exc)) from None
    free: queue.SimpleQueue = queue.SimpleQueue()
    for reader in readers:
        free.put(reader)

    def fetch(start: object, end: object) -> Batch | None:
        reader = free.get()
        try:
            got = reader.page(start, end)
        except TimeoutError:
            raise source.StatementTimeout(_too_long(limit)) from None
        except RuntimeError as exc:
            raise ReadFailed(str(exc)) from None
        finally:
            free.put(reader)
        if got is False:
            raise _NotCanonical(start)
        if got is None:
            return None
        data, rows, last_key = got
        return finish(Batch(data, rows, last_key, utf8=True))

    try:  # closing it closes side_by_side first: the pages under way end before their reader
        yield from side_by_side(dataset.page_ends(conn, org_key, params, size), fetch, after,
                                size, PAGES_IN_FLIGHT)
    except _NotCanonical as stop:
        return False, stop.after
    finally:
        for reader in readers:
            reader.close()
    return True, None


def _uri(conn: Connection) -> str:
    """The source database, read-only."""
    return f"file:{quote(conn.engine.url.database)}?mode=ro"


def _too_long(limit: float) -> str:
    return f"A page took longer than the source database's statement timeout ({limit:g} s)"


def _arrow_pages(conn: Connection, dataset: Dataset, org_key: str | None,
                 params: dict[str, str], after: object, size: int,
                 finish: Finish) -> Iterator[Batch]:
    """The pages as the reader process sends them; ReadFailed with its last line of error
    when it stops with one. Closing the iterator early kills the reader."""
    table = dataset.table
    bad = _bad_value(dataset)

    def page(after: object, exact: bool) -> str:
        columns = [table.c[dataset.key], *(part for c in dataset.columns for part in
                                           _sqlite_columns(table.c[c.name], c.kind, exact))]
        stmt = dataset.batch(org_key, params, after, size).with_only_columns(
            *columns, *([] if bad is None else [bad]), maintain_column_froms=True)
        return _sql(conn, stmt)

    # Each read, as stored and exact: the first page's SQL and a page's after the key bound to ?
    sql = {read: [page(None, exact), page(literal_column("?"), exact)]
           for read, exact in (("as_stored", False), ("exact", True))}
    for first, _ in sql.values():
        source.check_sqlite(conn, first)  # refused here if it would do more than read
    spec = {"database": _uri(conn), "size": size, "after": after,
            "frame": FRAME.format, "sql": sql,
            "columns": [{"kind": c.kind, "scale": c.scale, "name": c.name}
                        for c in dataset.columns],
            "checked": bad is not None, "key": dataset.key, "bad_value_status": BAD_VALUE}
    reader = subprocess.Popen([sys.executable, "-m", "jobs.sqlite_reader"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent,
                              bufsize=0)
    limit = source.timeout()

    def receive(_: object) -> tuple[Batch, None] | None:
        """The next page from the pipe, None at its end."""
        if not (header := _read(reader.stdout, FRAME.size, limit)):
            return None
        rows, last_key, length = FRAME.unpack(header)
        return finish(Batch(_read(reader.stdout, length, limit), rows, last_key)), None

    # Received in a thread: the reader writes on while the caller writes a page or fsyncs a
    # checkpoint (a pipe holds 64 KiB; a page is about 1 MB).
    received = read_ahead(receive, None)
    try:
        reader.stdin.write(json.dumps(spec).encode())
        reader.stdin.close()
        # Not `yield from`: closing it early would wait for the page under way first.
        for batch in received:  # noqa: UP028
            yield batch
        if reader.wait() != 0:
            error = reader.stderr.read().decode(errors="replace").strip().splitlines()
            if reader.returncode == BAD_VALUE:
                raise BadValue(error[-1])
            raise ReadFailed(error[-1] if error else f"exit status {reader.returncode}")
    finally:
        if reader.poll() is None:  # closed early (cancel, shutdown, timeout): stop reading
            reader.kill()
            reader.wait()
        received.close()  # the page being received ends at the pipe's end, now
        reader.stdout.close()
        reader.stderr.close()


def _read(pipe, size: int, limit: float) -> bytes:
    """`size` bytes from the reader (fewer only at its end); StatementTimeout when a page
    takes longer than the source's statement time limit."""
    chunks, wanted = [], size
    while wanted:
        if not select.select([pipe], [], [], limit)[0]:
            raise source.StatementTimeout(_too_long(limit))
        chunk = os.read(pipe.fileno(), min(wanted, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


def _sql(conn: Connection, stmt: Select) -> str:
    return str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
