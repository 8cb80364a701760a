"""What an export must contain, computed straight from SQL, independently of the engine."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

COLUMNS = {
    "transactions": ["id", "created_at", "amount", "currency", "status", "customer_email",
                     "description"],
    "orders": ["id", "created_at", "customer", "total", "status", "items"],
}
MONEY = {"amount", "total"}


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if column in MONEY:
        return str(Decimal(str(value)).quantize(Decimal("0.01")))
    if column == "created_at":
        return str(value)[:19]
    if column == "id":
        return str(value)
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def expected_rows(db_file: Path, dataset: str, org_slug: str, where: str = "",
                  args: tuple = ()) -> list[list[str]]:
    """Header plus rows, as strings, ordered by id, for one organisation."""
    columns = COLUMNS[dataset]
    with sqlite3.connect(db_file) as conn:
        org_id = conn.execute("select id from organisations where slug = ?",
                              (org_slug,)).fetchone()[0]
        rows = conn.execute(
            f"select {', '.join(columns)} from {dataset} where org_id = ? {where} order by id",
            (org_id, *args),
        ).fetchall()
    return [columns] + [[_cell(c, v) for c, v in zip(columns, row, strict=True)] for row in rows]
