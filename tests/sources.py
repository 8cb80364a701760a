"""A team's own database for the datasets tests: separate from the app's, on the suite's
backend (an SQLite file, or a fresh PostgreSQL database when TEST_DATABASE_URL is set), with a
`ledger` table whose rows belong to tenants by a text key, and a datasets file declaring it."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from conftest import TEST_DATABASE_URL, create_database, drop_database
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    create_engine,
    insert,
)

KEYS = {"acme": "ACME-7", "globex": "GLOBEX-9"}  # each demo organisation's data key
KINDS = ("card", "transfer", "refund")
metadata = MetaData()
ledger = Table(
    "ledger", metadata,
    Column("id", Integer, primary_key=True),
    Column("tenant", String(40), nullable=False, index=True),
    Column("booked_at", DateTime, nullable=False),
    Column("amount", Numeric(14, 2), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("memo", Text),
    Column("flagged", Boolean, nullable=False),
)

DATASETS_TOML = '''
[[dataset]]
name = "ledger"
title = "Ledger"
description = "Bookings of the team's own ledger."
table = "ledger"
key = "id"
tenant = "tenant"
columns = [
  { name = "id", kind = "int", label = "Booking" },
  { name = "booked_at", kind = "datetime", label = "Booked at" },
  { name = "amount", kind = "decimal", scale = 2 },
  { name = "kind", kind = "text" },
  { name = "memo", kind = "text" },
]
params = [
  { name = "booked", kind = "date_range", column = "booked_at", timezone = "Europe/Paris" },
  { name = "at", kind = "datetime_range", column = "booked_at" },
  { name = "amount", kind = "number_range", column = "amount" },
  { name = "kind", kind = "choice", column = "kind", values_from_column = true },
  { name = "memo", kind = "text", column = "memo", match = "prefix" },
  { name = "flagged", kind = "bool", column = "flagged" },
]

[[dataset]]
name = "refunds"
title = "Refunds"
description = "A SELECT written by an admin."
sql = "SELECT id, tenant, booked_at, amount, memo FROM ledger WHERE kind = 'refund'"
key = "id"
tenant = "tenant"
columns = [
  { name = "id", kind = "int" },
  { name = "booked_at", kind = "datetime" },
  { name = "amount", kind = "decimal", scale = 2 },
  { name = "memo", kind = "text" },
]
'''


def make_source(folder: Path, rows: int = 3_000) -> str:
    """A source database with `rows` ledger rows spread over both tenants; returns its URL."""
    url = (create_database(TEST_DATABASE_URL) if TEST_DATABASE_URL
           else f"sqlite:///{folder / 'team.db'}")
    engine = create_engine(url)
    metadata.create_all(engine)
    start = datetime(2026, 1, 1)
    tenants = list(KEYS.values())
    with engine.begin() as conn:
        conn.execute(insert(ledger), [
            {"id": n, "tenant": tenants[n % 2], "booked_at": start + timedelta(hours=7 * n),
             "amount": Decimal(n % 997) + Decimal("0.25"), "kind": KINDS[n % 3],
             "memo": f"memo {n}" if n % 5 else None, "flagged": n % 4 == 0}
            for n in range(1, rows + 1)])
    engine.dispose()
    return url


def drop_source(url: str) -> None:
    if TEST_DATABASE_URL:
        drop_database(TEST_DATABASE_URL, url)


def write_datasets(folder: Path, text: str = DATASETS_TOML) -> Path:
    path = folder / "datasets.toml"
    path.write_text(text)
    return path


def set_data_keys(app) -> None:
    """Give the demo organisations the keys their rows carry in the ledger."""
    from jobs.models import Organisation, db

    with app.app_context():
        for org in db.session.query(Organisation):
            org.data_key = KEYS.get(org.slug)
        db.session.commit()
