"""The datasets file (DATASETS_FILE, TOML): read, checked field by field, turned into Datasets.

Every problem names the file, the dataset and the field, and all of them are reported at once
(`DatasetFileError`), so the app and the workers refuse to start with one clear message. What
needs the database (tables, columns, key uniqueness) is `flask datasets check`'s job
(jobs.dataset_check). The reference for every field is docs/datasets.md.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import current_app
from sqlalchemy import (
    Boolean,
    Connection,
    Date,
    DateTime,
    Float,
    Integer,
    Numeric,
    TableClause,
    Text,
    column,
    inspect,
    select,
    table,
    text,
)
from sqlalchemy.types import TypeEngine

from jobs import source
from jobs.datasets import DEFAULT_FILENAME, KINDS, ROLES, Column, Dataset, Field

DEMO_FILE = Path(__file__).with_name("demo_datasets.toml")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")  # dataset and parameter names: safe in a URL
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
TYPES = {"int": Integer, "decimal": Numeric, "text": Text, "date": Date, "datetime": DateTime,
         "bool": Boolean}
PARAM_KINDS = ("date_range", "datetime_range", "number_range", "choice", "text", "bool")
FORMATS = ("csv", "csv.gz", "xlsx")  # jobs.formats.FORMATS (not imported: it imports us)


class DatasetFileError(ValueError):
    """A datasets file that cannot be used; `problems` lists each, located."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: {len(problems)} problem(s) in the datasets file:\n  "
                         + "\n  ".join(problems))


def load(path: str | Path | None = None) -> dict[str, Dataset]:
    """The datasets of `path` (the shipped demo file when None), by name."""
    path = Path(path) if path else DEMO_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetFileError(path, [f"cannot be read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise DatasetFileError(path, ["is not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise DatasetFileError(path, [f"is not valid TOML: {exc}"]) from None
    problems: list[str] = []
    datasets: dict[str, Dataset] = {}
    entries = raw.get("dataset")
    extra = set(raw) - {"dataset"}
    if extra:
        problems.append(f"unknown top-level key(s) {', '.join(sorted(extra))} (only [[dataset]])")
    if not isinstance(entries, list) or not entries:
        problems.append("declares no dataset (add a [[dataset]] table)")
        entries = []
    for n, entry in enumerate(entries, start=1):
        where = _Where(problems, f"dataset #{n}")
        dataset = _dataset(entry, where) if isinstance(entry, dict) else None
        if dataset is None:
            continue
        if dataset.name in datasets:
            problems.append(f"dataset {dataset.name!r}: field 'name': declared twice")
        datasets[dataset.name] = dataset
    if problems:
        raise DatasetFileError(path, problems)
    return datasets


class _Where:
    """Collects problems for one dataset, each prefixed with where it is."""

    def __init__(self, problems: list[str], name: str):
        self.problems, self.name = problems, name

    def __call__(self, field: str, message: str) -> None:
        self.problems.append(f"{self.name}: field {field!r}: {message}")

    def take(self, entry: dict, field: str, kind: type | tuple, default: object = None,
             required: bool = False) -> object:
        if field not in entry:
            if required:
                self(field, "is required")
            return default
        value = entry[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            self(field, f"must be {names.replace('str', 'text').replace('int', 'an integer')}")
            return default
        return value


DATASET_FIELDS = {"name", "title", "description", "table", "sql", "key", "tenant",
                  "tenant_kind", "scope", "columns", "params", "roles", "formats", "max_rows",
                  "filename"}


def _dataset(entry: dict, where: _Where) -> Dataset | None:
    count = len(where.problems)
    name = where.take(entry, "name", str, required=True)
    if isinstance(name, str):
        where.name = f"dataset {name!r}"
        if not NAME.match(name):
            where("name", "must be lowercase letters, digits and _ (starting with a letter)")
    for unknown in sorted(set(entry) - DATASET_FIELDS):
        where(unknown, "is not a dataset field (see docs/datasets.md)")
    title = where.take(entry, "title", str, default=name)
    description = where.take(entry, "description", str, default="")
    source_table = where.take(entry, "table", str)
    sql = where.take(entry, "sql", str)
    if (source_table is None) == (sql is None):
        where("table", "give exactly one source: `table` (a table or view) or `sql` (a SELECT)")
    if source_table is not None and not IDENTIFIER.match(source_table):
        where("table", "must be a table or view name (schema.name at most)")
    if sql is not None and not re.match(r"^\s*(select|with)\b", sql, re.I):
        where("sql", "must be one SELECT statement")
    if sql is not None and ";" in sql.rstrip().rstrip(";"):
        where("sql", "must be one statement (no ';' inside)")
    key = where.take(entry, "key", str, required=True)
    scope = where.take(entry, "scope", str, default="organisation")
    tenant = where.take(entry, "tenant", str)
    if scope not in ("organisation", "all"):
        where("scope", "must be \"organisation\" or \"all\"")
    elif scope == "organisation" and tenant is None:
        where("tenant", "is required: the column holding each row's organisation key "
              "(or say scope = \"all\": then only admins may export it)")
    elif scope == "all" and tenant is not None:
        where("tenant", "must not be given with scope = \"all\"")
    tenant_kind = where.take(entry, "tenant_kind", str, default="text")
    if tenant_kind not in ("int", "text"):
        where("tenant_kind", "must be \"int\" or \"text\"")
    columns = _columns(where.take(entry, "columns", list, required=True) or [], where,
                       sql is not None)
    names = [c.name for c in columns]
    if key is not None and columns and key not in names:
        where("key", f"must be one of the exported columns ({', '.join(names)})")
    if key is not None and any(c.name == key and c.kind not in ("int", None) for c in columns):
        where("key", "must be an integer column (pages are read after its last value)")
    kinds = {c.name: c.kind for c in columns}
    params = _params(where.take(entry, "params", list, default=[]), where, kinds)
    roles = where.take(entry, "roles", list, default=list(ROLES))
    if any(role not in ROLES for role in roles):
        where("roles", f"each must be one of {', '.join(ROLES)}")
    formats = where.take(entry, "formats", list, default=list(FORMATS))
    if not formats or any(f not in FORMATS for f in formats):
        where("formats", f"each must be one of {', '.join(FORMATS)}")
    max_rows = where.take(entry, "max_rows", int)
    if max_rows is not None and max_rows < 1:
        where("max_rows", "must be at least 1")
    filename = where.take(entry, "filename", str, default=DEFAULT_FILENAME)
    try:
        stem = filename.format(dataset="d", org="o", date="2026-01-01", job=1)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,120}", stem):
            where("filename", "may hold only letters, digits, . _ - and {dataset} {org} {date} "
                  "{job}")
    except (KeyError, IndexError, ValueError):
        where("filename", "may only use {dataset}, {org}, {date} and {job}")
    for field in (key, tenant, *(p.column for p in params)):
        if isinstance(field, str) and not IDENTIFIER.match(field):
            where("key", f"{field!r} is not a column name")
    if len(where.problems) > count:
        return None
    typed = dict(kinds)
    if tenant:
        typed.setdefault(tenant, tenant_kind)
    for param in params:
        typed.setdefault(param.column, param.column_kind)
    cols = [column(n, TYPES[k]) if k else column(n) for n, k in typed.items()]
    if sql is not None:
        source = text(sql.strip().rstrip(";")).columns(*cols).subquery("source")
    else:
        schema, _, bare = source_table.rpartition(".")
        source = table(bare, *cols, schema=schema or None)
    return Dataset(name=name, title=title, description=description, table=source,
                   columns=tuple(columns), key=key, params=tuple(params), tenant=tenant,
                   tenant_kind=tenant_kind, roles=tuple(roles), formats=tuple(formats),
                   max_rows=max_rows, filename=filename, definition=entry)


def _columns(entries: list, where: _Where, kind_required: bool) -> list[Column]:
    if not entries:
        where("columns", "must list at least one column")
    columns: list[Column] = []
    for n, item in enumerate(entries, start=1):
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            where(f"columns[{n}]", "must be a name or a table {name, label, kind, scale}")
            continue
        for unknown in sorted(set(item) - {"name", "label", "kind", "scale"}):
            where(f"columns[{n}].{unknown}", "is not a column field")
        name = where.take(item, "name", str, required=True)
        if name is None:
            continue
        if not IDENTIFIER.match(name) or "." in name:
            where(f"columns[{n}].name", f"{name!r} is not a column name")
            continue
        kind = where.take(item, "kind", str)  # None: read from the source (`with_schema_kinds`)
        if kind is not None and kind not in KINDS:
            where(f"columns[{n}].kind", f"must be one of {', '.join(KINDS)}")
        scale = where.take(item, "scale", int)
        if scale is not None and (kind not in ("decimal", None) or not 0 <= scale <= 12):
            where(f"columns[{n}].scale", "is for decimal columns, 0 to 12 places")
        if name in (c.name for c in columns):
            where(f"columns[{n}].name", f"{name!r} is listed twice")
        columns.append(Column(name, kind, where.take(item, "label", str), scale))
    return columns


PARAM_FIELDS = {"name", "kind", "column", "column_kind", "label", "help", "required",
                "default", "values", "values_from_column", "match", "timezone", "from_label",
                "to_label"}


def _params(entries: list, where: _Where, kinds: dict[str, str]) -> list[Field]:
    fields: list[Field] = []
    for n, item in enumerate(entries, start=1):
        at = f"params[{n}]"
        if not isinstance(item, dict):
            where(at, "must be a table {name, kind, column, ...}")
            continue
        for unknown in sorted(set(item) - PARAM_FIELDS):
            where(f"{at}.{unknown}", "is not a parameter field")
        name = where.take(item, "name", str, required=True)
        kind = where.take(item, "kind", str, required=True)
        col = where.take(item, "column", str, required=True)
        if name is None or kind is None or col is None:
            continue
        if not NAME.match(name):
            where(f"{at}.name", "must be lowercase letters, digits and _")
        if kind not in PARAM_KINDS:
            where(f"{at}.kind", f"must be one of {', '.join(PARAM_KINDS)}")
            continue
        column_kind = where.take(item, "column_kind", str, default=kinds.get(col))
        if column_kind is None:
            column_kind = {"date_range": "datetime", "datetime_range": "datetime",
                           "number_range": "decimal", "bool": "bool"}.get(kind, "text")
        label = where.take(item, "label", str, default=name.replace("_", " ").capitalize())
        common = dict(column=col, help=where.take(item, "help", str, default=""),
                      required=where.take(item, "required", bool, default=False),
                      column_kind=column_kind)
        tz = where.take(item, "timezone", str, default="UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            where(f"{at}.timezone", f"{tz!r} is not a time zone (e.g. Europe/Paris)")
            tz = "UTC"
        default = where.take(item, "default", (str, int, float, bool))
        if kind.endswith("_range"):
            if default is not None:
                where(f"{at}.default", "ranges take no default")
            field_kind = kind.removesuffix("_range")
            field_kind = "number" if field_kind == "number" else field_kind
            low, high = (("day_ge", "day_lt") if kind == "date_range" else
                         ("ge", "le") if kind == "number_range" else ("ge", "lt"))
            suffixes = ("min", "max") if kind == "number_range" else ("from", "to")
            start = Field(f"{name}_{suffixes[0]}", field_kind, test=low, tz=tz,
                          label=where.take(item, "from_label", str,
                                           default=suffixes[0].capitalize()), **common)
            fields += [start, Field(f"{name}_{suffixes[1]}", field_kind, test=high, tz=tz,
                                    after=start.name,
                                    label=where.take(item, "to_label", str,
                                                     default=suffixes[1].capitalize()),
                                    **common)]
            continue
        values = where.take(item, "values", list, default=[])
        from_column = where.take(item, "values_from_column", bool, default=False)
        if kind == "choice" and not values and not from_column:
            where(f"{at}.values", "a choice lists its values, or says values_from_column = true")
        if any(not isinstance(v, str) for v in values):
            where(f"{at}.values", "must be text values")
        match = where.take(item, "match", str, default="exact")
        if match not in ("exact", "prefix") or (match == "prefix" and kind != "text"):
            where(f"{at}.match", "is \"exact\" or (for text) \"prefix\"")
        fields.append(Field(name, kind, test="prefix" if match == "prefix" else "eq",
                            label=label, choices=tuple(values), choices_from_column=from_column,
                            default=None if default is None else str(default).lower()
                            if isinstance(default, bool) else str(default), **common))
    names = [f.name for f in fields]
    for name in {n for n in names if names.count(n) > 1}:
        where("params", f"the field {name!r} is declared twice")
    return fields


# Kinds read from the source database, for the columns the file declares without one


def with_schema_kinds(dataset: Dataset) -> Dataset:
    """`dataset` with every column the file left without a kind typed from the source database
    (its decimal scale too), checked again as if the file had said so. Its definition, and so
    its fingerprint, holds the kinds read: a column whose type changes under a job is a changed
    definition (docs/datasets.md)."""
    with source.connect() as conn:
        kinds = schema_kinds(dataset, conn)
    entry = dict(dataset.definition)
    columns = []
    for item in entry["columns"]:
        item = {"name": item} if isinstance(item, str) else dict(item)
        if "kind" not in item:
            item["kind"], scale = kinds.get(item["name"], ("text", None))
            if item["kind"] == "decimal" and scale is not None:
                item.setdefault("scale", scale)
        columns.append(item)
    entry["columns"] = columns
    problems: list[str] = []
    typed = _dataset(entry, _Where(problems, f"dataset {dataset.name!r}"))
    if typed is None:
        raise DatasetFileError(Path(current_app.config["DATASETS_FILE"] or DEMO_FILE), [
            f"{p} (with the kinds read from the source database)" for p in problems])
    return typed


def schema_kinds(dataset: Dataset, conn: Connection) -> dict[str, tuple[str, int | None]]:
    """Each source column's kind and decimal scale: a table's or view's reflected types; a `sql`
    source's result types on PostgreSQL. SQLite cannot tell a query's types: none (text)."""
    source_table = dataset.table
    if isinstance(source_table, TableClause):
        return {c["name"]: kind_of(c["type"]) for c in inspect(conn).get_columns(
            source_table.name, schema=source_table.schema)}
    if conn.dialect.name != "postgresql":
        return {}
    result = conn.execute(select(source_table).limit(0))
    types = conn.connection.dbapi_connection.adapters.types
    kinds = {}
    for described in result.cursor.description:
        info = types.get(described.type_code)
        kind = POSTGRES_KINDS.get(info.name if info else "", "text")
        kinds[described.name] = (kind, _scale(described.scale) if kind == "decimal" else None)
    result.close()
    return kinds


POSTGRES_KINDS = {"int2": "int", "int4": "int", "int8": "int", "numeric": "decimal",
                  "float4": "decimal", "float8": "decimal", "bool": "bool", "date": "date",
                  "timestamp": "datetime", "timestamptz": "datetime"}


def kind_of(sql_type: TypeEngine) -> tuple[str, int | None]:
    """The kind (and decimal scale) a reflected column type is written as."""
    for sa_type, kind in ((Boolean, "bool"), (Integer, "int"), (DateTime, "datetime"),
                          (Date, "date"), (Float, "decimal")):
        if isinstance(sql_type, sa_type):
            return kind, None
    if isinstance(sql_type, Numeric):
        return "decimal", _scale(sql_type.scale)
    return "text", None


def _scale(scale: int | None) -> int | None:
    """A declared scale we write as such; any other, as stored."""
    return scale if scale is not None and 0 <= scale <= 12 else None
