"""Datasets: what can be exported, as the datasets file declares it (jobs.dataset_file).

A dataset is one source (a table, or one SELECT) read in pages on its ordered unique `key`,
always filtered on its tenant column by the value of the requesting user's organisation (set by
the server, never by the request), then by the fields of its parameters. Values reach the
database only as bound parameters; every identifier comes from the file.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from functools import cached_property
from zoneinfo import ZoneInfo

from flask import current_app
from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Select,
    bindparam,
    func,
    select,
    true,
)

KINDS = ("int", "decimal", "text", "date", "datetime", "bool")
FIELD_KINDS = ("date", "datetime", "number", "choice", "text", "bool")
ROLES = ("user", "viewer", "admin")
# The downloaded file's name, before its extension: {job} (the job id) keeps two exports of one
# day apart (docs/datasets.md).
DEFAULT_FILENAME = "{dataset}-{org}-{date}-{job}"


class InvalidParams(ValueError):
    """Parameters a user can correct; `errors` maps each parameter to its message."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class Column:
    """An exported column: `kind` (int, decimal, text, date, datetime, bool) decides how each
    value is written; `label` is its header (the name when None); a decimal has `scale` places
    (as stored when None)."""

    name: str
    kind: str | None  # None: not declared, read from the source database (registry())
    label: str | None = None
    scale: int | None = None

    @property
    def header(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Field:
    """One form field of a parameter: a range gives two (`<name>_from`, `<name>_to`).

    `test` says how its value filters `column`: ge / lt (datetime range), day_ge / day_lt
    (a day range: both days included, in `tz`), ge / le (number range), eq, prefix.
    """

    name: str
    kind: str  # date, datetime, number, choice, text or bool: the input and its validation
    column: str
    test: str
    label: str
    help: str = ""
    required: bool = False
    default: str | None = None
    choices: tuple[str, ...] = ()
    choices_from_column: bool = False
    tz: str = "UTC"
    after: str | None = None  # the field this one may not be before (a range's start)
    column_kind: str = "datetime"  # of `column`: a day range on a date column needs no time

    def clean(self, raw: object) -> str | None:
        """The canonical value as text, None when empty; ValueError with a message when bad."""
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raw = self.default
            if raw is None:
                if self.required:
                    raise ValueError("is required")
                return None
        if isinstance(raw, bool) and self.kind == "bool":
            return "true" if raw else "false"
        if isinstance(raw, int | float) and not isinstance(raw, bool) and self.kind == "number":
            raw = str(raw)
        if not isinstance(raw, str):
            raise ValueError("must be text")
        raw = raw.strip()
        if len(raw) > 200:
            raise ValueError("is too long (200 characters at most)")
        if self.kind == "date":
            try:
                return date.fromisoformat(raw).isoformat()
            except ValueError:
                raise ValueError("must be a date like 2026-01-31") from None
        if self.kind == "datetime":
            try:
                return datetime.fromisoformat(raw).replace(tzinfo=None).isoformat()
            except ValueError:
                raise ValueError("must be a date and time like 2026-01-31T08:00") from None
        if self.kind == "number":
            try:
                number = Decimal(raw)
            except InvalidOperation:
                raise ValueError("must be a number like 12.50") from None
            if not number.is_finite():
                raise ValueError("must be a finite number")
            if number and abs(number.adjusted()) > 30:
                raise ValueError("is out of range")
            return str(number)
        if self.kind == "bool":
            value = raw.lower()
            if value in ("true", "yes", "1", "on"):
                return "true"
            if value in ("false", "no", "0", "off"):
                return "false"
            raise ValueError("must be yes or no")
        if self.kind == "choice" and not self.choices_from_column and raw not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        if "\x00" in raw:
            raise ValueError("must not hold a NUL character")
        return raw

    def condition(self, col: ColumnElement, value: str) -> ColumnElement:
        """The filter for a cleaned value, bound with the column's type (never pasted in)."""
        bound = self._bound(value)
        if self.test == "prefix":
            escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return col.like(escaped + "%", escape="\\")
        return TESTS[self.test](col, bound)

    def _bound(self, value: str) -> object:
        if self.test in ("day_ge", "day_lt"):
            day = date.fromisoformat(value) + timedelta(days=self.test == "day_lt")
            if self.column_kind == "date":
                return day
            return _as_utc(datetime.combine(day, time.min), self.tz)
        if self.kind == "datetime":
            return _as_utc(datetime.fromisoformat(value), self.tz)
        if self.kind == "number":
            return Decimal(value)
        if self.kind == "bool":
            return value == "true"
        return value


TESTS = {"ge": operator.ge, "lt": operator.lt, "le": operator.le, "eq": operator.eq,
         "day_ge": operator.ge, "day_lt": operator.lt}


def _as_utc(moment: datetime, tz: str) -> datetime:
    """A wall-clock time in `tz` as the naive UTC time the database stores."""
    return moment.replace(tzinfo=ZoneInfo(tz)).astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Dataset:
    """A declared dataset. `table` is the source as SQLAlchemy sees it: a table or view, or a
    `sql` source as a subquery, paged on `key` alike."""

    name: str
    title: str
    description: str
    table: FromClause
    columns: tuple[Column, ...]
    key: str = "id"
    params: tuple[Field, ...] = field(default_factory=tuple)
    tenant: str | None = "org_id"  # None: scope "all", every row (admins only)
    tenant_kind: str = "int"
    roles: tuple[str, ...] = ROLES
    formats: tuple[str, ...] = ("csv", "csv.gz", "xlsx")
    max_rows: int | None = None
    filename: str = DEFAULT_FILENAME
    definition: dict = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def fingerprint(self) -> str:
        """The definition's SHA-256 (as the file declares it): a job records it, and never
        mixes two definitions."""
        declared = self.definition or {"name": self.name, "source": str(self.table),
                                       "columns": self.columns, "params": self.params}
        canonical = json.dumps(declared, sort_keys=True, default=repr)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def allows(self, role: str) -> bool:
        return role in self.roles and (self.tenant is not None or role == "admin")

    def clean_params(self, raw: dict | None) -> dict[str, str]:
        """Validate a request's parameters; unknown ones are refused, ranges must be in order."""
        raw = dict(raw or {})
        errors: dict[str, str] = {}
        cleaned: dict[str, str] = {}
        known = {f.name: f for f in self.params}
        for name in raw:
            if name not in known:
                errors[str(name)[:60]] = "is not a parameter of this dataset"
        for param in self.params:
            try:
                value = param.clean(raw.get(param.name))
            except ValueError as exc:
                errors[param.name] = str(exc)
                continue
            if value is not None:
                cleaned[param.name] = value
        for param in self.params:
            lo, hi = cleaned.get(param.after or ""), cleaned.get(param.name)
            if lo is not None and hi is not None and param.after not in errors and (
                    _order(param, lo) > _order(param, hi)):
                errors[param.name] = ("must not be less than the minimum"
                                      if param.kind == "number" else
                                      "must not be before the start date")
        if errors:
            raise InvalidParams(errors)
        return cleaned

    def tenant_value(self, org_key: str) -> object:
        """The organisation's key as the tenant column holds it."""
        return int(org_key) if self.tenant_kind == "int" else org_key

    def query(self, org_key: str | None, params: dict[str, str]) -> Select:
        """Every row the organisation may see, filtered; the server sets `org_key`."""
        t = self.table
        stmt = select(*(t.c[c.name] for c in self.columns))
        if self.tenant is not None:
            stmt = stmt.where(t.c[self.tenant] == self.tenant_value(org_key))
        for param in self.params:
            if param.name in params:
                stmt = stmt.where(param.condition(t.c[param.column], params[param.name]))
        return stmt

    def batch(self, org_key: str | None, params: dict[str, str], after: object,
              size: int | None) -> Select:
        """The next `size` rows after key `after` (keyset pagination: never OFFSET)."""
        key = self.table.c[self.key]
        stmt = self.query(org_key, params)
        if after is not None:
            stmt = stmt.where(key > after)
        return stmt.order_by(key).limit(size)

    def page_ends(self, conn: Connection, org_key: str | None, params: dict[str, str],
                  size: int) -> Callable[[object], object]:
        """`end_after(key)`: the key `size` rows after `key` (after none: from the first row),
        None when fewer are left; where a page read side by side ends (jobs.readahead), read
        from the key's index: `… AND key > :lower ORDER BY key OFFSET size - 1 LIMIT 1`."""
        lower = bindparam("lower", 0)
        ends = {first: self.batch(org_key, params, None if first else lower, 1)
                .with_only_columns(self.table.c[self.key]).offset(size - 1)
                for first in (True, False)}

        def end_after(start: object) -> object:
            return conn.execute(ends[start is None],
                                {} if start is None else {"lower": start}).scalar()

        return end_after

    def count(self, org_key: str | None, params: dict[str, str]) -> Select:
        """Its rows, counted in key order: PostgreSQL then reads the key's index (as the page
        ends do) in one process, where a count of the query alone is a parallel scan of the
        table, three processes taking the CPU the export's own pages need (issue 19)."""
        key = self.table.c[self.key]
        keys = self.query(org_key, params).with_only_columns(key).order_by(key)
        return select(func.count()).select_from(keys.subquery())

    def choices_query(self, param: Field, org_key: str | None) -> Select:
        """The distinct values a choice read from its column offers this organisation."""
        col = self.table.c[param.column]
        tenant = (self.table.c[self.tenant] == self.tenant_value(org_key)
                  if self.tenant is not None else true())
        return select(col).where(tenant, col.is_not(None)).distinct().order_by(col).limit(200)

    @property
    def undeclared(self) -> list[str]:
        """Columns the file gives no kind: the source database's schema will say."""
        return [c.name for c in self.columns if c.kind is None]

    @property
    def column_names(self) -> Sequence[str]:
        return [c.name for c in self.columns]

    @property
    def headers(self) -> Sequence[str]:
        return [c.header for c in self.columns]


def _order(param: Field, value: str) -> object:
    return Decimal(value) if param.kind == "number" else value


def declared() -> dict[str, Dataset]:
    """The datasets as the file declares them (read from DATASETS_FILE by webapp.create_app)."""
    return current_app.extensions["exportdesk.datasets"]


def registry() -> dict[str, Dataset]:
    """The datasets of the running app, each column with its kind: those the file left without
    one are read from the source database on first use, once per process. (The app hands over
    `jobs.dataset_file.with_schema_kinds` as "exportdesk.datasets.typing": that module builds
    datasets, so this one cannot import it.)"""
    extensions = current_app.extensions
    found = declared()
    cached = extensions.get("exportdesk.datasets.typed")
    if cached is None or cached[0] is not found:
        typing = extensions["exportdesk.datasets.typing"]
        typed = {name: typing(d) if d.undeclared else d for name, d in found.items()}
        cached = extensions["exportdesk.datasets.typed"] = (found, typed)
    return cached[1]


def get(name: object) -> Dataset | None:
    return registry().get(name) if isinstance(name, str) else None


def visible(user) -> dict[str, Dataset]:
    """The datasets `user` may export, by name."""
    return {name: d for name, d in registry().items() if d.allows(user.role)}
