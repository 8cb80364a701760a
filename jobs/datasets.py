"""Datasets: what can be exported, declared once (query, typed parameters, columns, ordered key)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

from sqlalchemy import Select, Table, func, select

from jobs.models import Order, Transaction


class InvalidParams(ValueError):
    """Parameters a user can correct; `errors` maps each parameter to its message."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class Param:
    name: str
    label: str
    kind: str  # "date" or "choice"
    choices: tuple[str, ...] = ()

    def clean(self, raw: object) -> str | None:
        """The canonical value (ISO date or a choice), None when empty; ValueError when bad."""
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str):
            raise ValueError("must be text")
        raw = raw.strip()
        if self.kind == "date":
            try:
                return date.fromisoformat(raw).isoformat()
            except ValueError:
                raise ValueError("must be a date like 2026-01-31") from None
        if raw not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return raw


@dataclass(frozen=True)
class Column:
    """An exported column: `kind` (int, decimal, text, date, datetime, bool) decides how each
    value is written; `label` is its header (the name when None); a decimal has `scale` places
    (as stored when None)."""

    name: str
    kind: str
    label: str | None = None
    scale: int | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    description: str
    table: Table
    columns: tuple[Column, ...]
    key: str = "id"
    params: tuple[Param, ...] = field(default_factory=tuple)

    def clean_params(self, raw: dict | None) -> dict[str, str]:
        """Validate a request's parameters; unknown ones are refused, bounds must be in order."""
        raw = dict(raw or {})
        errors: dict[str, str] = {}
        cleaned: dict[str, str] = {}
        known = {p.name: p for p in self.params}
        for name in raw:
            if name not in known:
                errors[name] = "is not a parameter of this dataset"
        for param in self.params:
            try:
                value = param.clean(raw.get(param.name))
            except ValueError as exc:
                errors[param.name] = str(exc)
                continue
            if value is not None:
                cleaned[param.name] = value
        lo, hi = cleaned.get("date_from"), cleaned.get("date_to")
        if lo and hi and lo > hi:
            errors["date_to"] = "must not be before the start date"
        if errors:
            raise InvalidParams(errors)
        return cleaned

    def query(self, org_id: int, params: dict[str, str]) -> Select:
        """Every row of this dataset the organisation may see, filtered; the server sets org_id."""
        t = self.table
        stmt = select(*(t.c[c.name] for c in self.columns)).where(t.c.org_id == org_id)
        if "date_from" in params:
            lo = datetime.combine(date.fromisoformat(params["date_from"]), time.min)
            stmt = stmt.where(t.c.created_at >= lo)
        if "date_to" in params:
            hi = datetime.combine(date.fromisoformat(params["date_to"]) + timedelta(1), time.min)
            stmt = stmt.where(t.c.created_at < hi)
        if "status" in params:
            stmt = stmt.where(t.c.status == params["status"])
        return stmt

    def batch(self, org_id: int, params: dict[str, str], after: object,
              size: int | None) -> Select:
        """The next `size` rows after key `after` (keyset pagination: never OFFSET)."""
        key = self.table.c[self.key]
        stmt = self.query(org_id, params)
        if after is not None:
            stmt = stmt.where(key > after)
        return stmt.order_by(key).limit(size)

    def count(self, org_id: int, params: dict[str, str]) -> Select:
        return select(func.count()).select_from(self.query(org_id, params).subquery())

    @property
    def column_names(self) -> Sequence[str]:
        return [c.name for c in self.columns]


def _date_range_and_status(statuses: tuple[str, ...]) -> tuple[Param, ...]:
    return (
        Param("date_from", "From", "date"),
        Param("date_to", "To", "date"),
        Param("status", "Status", "choice", statuses),
    )


TRANSACTION_STATUSES = ("pending", "settled", "refunded", "failed")
ORDER_STATUSES = ("open", "shipped", "delivered", "cancelled")

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="transactions",
            title="Transactions",
            description="Payments with amount, currency, status and customer.",
            table=Transaction.__table__,
            columns=(
                Column("id", "int"),
                Column("created_at", "datetime"),
                Column("amount", "decimal", scale=2),
                Column("currency", "text"),
                Column("status", "text"),
                Column("customer_email", "text"),
                Column("description", "text"),
            ),
            params=_date_range_and_status(TRANSACTION_STATUSES),
        ),
        Dataset(
            name="orders",
            title="Orders",
            description="Orders with customer, total, status and line items.",
            table=Order.__table__,
            columns=(
                Column("id", "int"),
                Column("created_at", "datetime"),
                Column("customer", "text"),
                Column("total", "decimal", scale=2),
                Column("status", "text"),
                Column("items", "text"),
            ),
            params=_date_range_and_status(ORDER_STATUSES),
        ),
    )
}
