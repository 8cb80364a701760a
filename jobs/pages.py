"""An export's rows as pages of CSV, read by the fastest correct path of its database."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection

from jobs import postgres_pages, sqlite_pages
from jobs.csvrows import Batch
from jobs.datasets import Dataset


def pages(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
          after: object, batch_rows: int) -> Iterator[Batch]:
    """The dataset's rows after key `after` as CSV, `batch_rows` rows per batch, in key order:
    the same bytes from every database (jobs.csvrows)."""
    if conn.dialect.name == "postgresql":
        return postgres_pages.pages(conn, dataset, org_key, params, after, batch_rows)
    if conn.dialect.name == "sqlite":
        return sqlite_pages.pages(conn, dataset, org_key, params, after, batch_rows)
    raise NotImplementedError(f"no CSV path for {conn.dialect.name}")
