"""An export's rows as pages of CSV, read by the fastest correct path of its database."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection

from jobs import postgres_pages, sqlite_pages
from jobs.csvrows import Batch, valid_utf8
from jobs.datasets import Dataset


def pages(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
          after: object, batch_rows: int) -> Iterator[Batch]:
    """The dataset's rows after key `after` as CSV, `batch_rows` rows per batch, in key order:
    the same bytes from every database (jobs.csvrows), always valid UTF-8."""
    if conn.dialect.name == "postgresql":
        reader = postgres_pages.pages(conn, dataset, org_key, params, after, batch_rows)
    elif conn.dialect.name == "sqlite":
        reader = sqlite_pages.pages(conn, dataset, org_key, params, after, batch_rows)
    else:
        raise NotImplementedError(f"no CSV path for {conn.dialect.name}")
    try:
        for batch in reader:
            yield valid_utf8(batch)
    finally:
        reader.close()  # also when closed early: stop the reader (and its process)
