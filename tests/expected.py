"""What an export must contain, computed straight from SQL, independently of the engine."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

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


def expected_rows(database_url: str, dataset: str, org_slug: str, where: str = "",
                  args: tuple = ()) -> list[list[str]]:
    """Header plus rows, as strings, ordered by id, for one organisation.

    `where` uses ? placeholders for `args`; works on SQLite and PostgreSQL alike.
    """
    columns = COLUMNS[dataset]
    parts = where.split("?")
    assert len(parts) == len(args) + 1, "one argument per ?"
    where = "".join(p + (f":a{i}" if i < len(args) else "") for i, p in enumerate(parts))
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as conn:
        org_id = conn.execute(text("select id from organisations where slug = :slug"),
                              {"slug": org_slug}).scalar_one()
        rows = conn.execute(
            text(f"select {', '.join(columns)} from {dataset} where org_id = :org {where} "
                 "order by id"),
            {"org": org_id, **{f"a{i}": a for i, a in enumerate(args)}},
        ).all()
    engine.dispose()
    return [columns] + [[_cell(c, v) for c, v in zip(columns, row, strict=True)] for row in rows]
