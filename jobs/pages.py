"""An export's rows as pages of CSV, read by the fastest correct path of its database."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection

from jobs import postgres_pages, sqlite_pages
from jobs.csvrows import Batch, Finish, valid_utf8
from jobs.datasets import Dataset


def pages(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
          after: object, batch_rows: int, finish: Finish | None = None) -> Iterator[Batch]:
    """The dataset's rows after key `after` as CSV, `batch_rows` rows per batch, in key order:
    the same bytes from every database (jobs.csvrows), always valid UTF-8, then `finish`ed
    (csv.gz deflates them) in the thread that read them: pages are read side by side."""
    done = valid_utf8 if finish is None else lambda batch: finish(valid_utf8(batch))
    if conn.dialect.name == "postgresql":
        reader = postgres_pages.pages(conn, dataset, org_key, params, after, batch_rows, done)
    elif conn.dialect.name == "sqlite":
        reader = sqlite_pages.pages(conn, dataset, org_key, params, after, batch_rows, done)
    else:
        raise NotImplementedError(f"no CSV path for {conn.dialect.name}")
    try:
        yield from reader
    finally:
        reader.close()  # also when closed early: stop the reader (and its process)
