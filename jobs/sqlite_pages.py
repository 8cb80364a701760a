"""SQLite's pages as CSV, read and formatted with Arrow by a reader process (jobs.sqlite_reader).

The reader is a process of its own because ADBC links its own copy of SQLite, and two copies in
one process undo each other's POSIX locks (see jobs.sqlite_reader). Literal values in the SQL
are validated server-side parameters (integers, ISO dates, fixed choices), rendered by
SQLAlchemy; the key after which a page starts is bound by the reader (`?`).
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    Integer,
    Select,
    Text,
    cast,
    func,
    literal_column,
)

from jobs import source
from jobs.csvrows import Batch
from jobs.datasets import Dataset

FRAME = struct.Struct("<qqq")  # the reader's header before each page: rows, last key, bytes


class ReadFailed(RuntimeError):
    """The SQLite reader process stopped with an error."""


def _sqlite_column(col: ColumnElement, kind: str) -> ColumnElement:
    """A column with one type per page, as ADBC infers each column's type from its values:
    numbers as numbers (Arrow formats them), text never NULL (NULL and '' are both empty)."""
    if kind == "int":
        return cast(col, Integer)
    if kind == "decimal":
        return cast(col, Float)
    return func.coalesce(cast(col, Text), "")


def pages(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
          after: object, size: int) -> Iterator[Batch]:
    """The pages as the reader process sends them; ReadFailed with its last line of error
    when it stops with one. Closing the iterator early kills the reader."""
    table = dataset.table
    columns = [table.c[dataset.key],
               *(_sqlite_column(table.c[c.name], c.kind) for c in dataset.columns)]

    def page(after: object) -> str:
        stmt = dataset.batch(org_key, params, after, size)
        return _sql(conn, stmt.with_only_columns(*columns, maintain_column_froms=True))

    source.check_sqlite(conn, page(None))  # refused here if it would do more than read
    spec = {"database": conn.engine.url.database, "size": size, "after": after,
            "frame": FRAME.format,
            "kinds": [c.kind for c in dataset.columns],
            "from_start": page(None), "after_key": page(literal_column("?"))}  # ?: bound per page
    reader = subprocess.Popen([sys.executable, "-m", "jobs.sqlite_reader"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent,
                              bufsize=0)
    limit = source.timeout()
    try:
        reader.stdin.write(json.dumps(spec).encode())
        reader.stdin.close()
        while header := _read(reader.stdout, FRAME.size, limit):
            rows, last_key, length = FRAME.unpack(header)
            yield Batch(_read(reader.stdout, length, limit), rows, last_key)
        if reader.wait() != 0:
            error = reader.stderr.read().decode(errors="replace").strip().splitlines()
            raise ReadFailed(error[-1] if error else f"exit status {reader.returncode}")
    finally:
        if reader.poll() is None:  # closed early (cancel, shutdown, timeout): stop reading
            reader.kill()
            reader.wait()
        reader.stdout.close()
        reader.stderr.close()


def _read(pipe, size: int, limit: float) -> bytes:
    """`size` bytes from the reader (fewer only at its end); StatementTimeout when a page
    takes longer than the source's statement time limit."""
    chunks, wanted = [], size
    while wanted:
        if not select.select([pipe], [], [], limit)[0]:
            raise source.StatementTimeout(
                f"A page took longer than the source database's statement timeout ({limit:g} s)")
        chunk = os.read(pipe.fileno(), min(wanted, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


def _sql(conn: Connection, stmt: Select) -> str:
    return str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
