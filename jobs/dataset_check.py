"""`flask datasets check`: each declared dataset held against the source database's schema.

The file itself was already checked when the app started (jobs.dataset_file); here every
identifier is looked up in the database, the key is shown unique and indexed, the source is
prepared read-only (a `sql` source doing anything but read is refused), and the rows are
estimated. Each problem is one line; any problem makes the command fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, TableClause, func, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError

from jobs.datasets import Dataset


@dataclass
class Report:
    dataset: Dataset
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check(dataset: Dataset, engine: Engine) -> Report:
    report = Report(dataset)
    referenced = {c.name for c in dataset.columns} | {dataset.key} | {
        p.column for p in dataset.params} | ({dataset.tenant} if dataset.tenant else set())
    with engine.connect() as conn:
        if isinstance(dataset.table, TableClause):
            _check_table(conn, dataset, referenced, report)
        if report.problems:
            return report
        try:  # prepared (SQLite, under the read-only authorizer) or run for no row (PostgreSQL)
            probe = select(dataset.table).limit(0)
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("EXPLAIN " + str(probe.compile(
                    conn, compile_kwargs={"literal_binds": True}))).close()
            else:
                conn.execute(probe).close()
        except SQLAlchemyError as exc:
            report.problems.append(f"the source cannot be read: {first_line(exc)}")
            return report
        if not isinstance(dataset.table, TableClause):
            _check_query(conn, dataset, report)
        report.lines.append(f"rows: {_estimate(conn, dataset)}")
    return report


def _check_table(conn: Connection, dataset: Dataset, referenced: set[str],
                 report: Report) -> None:
    table = dataset.table
    schema = inspect(conn)
    try:
        columns = {c["name"]: c for c in schema.get_columns(table.name, schema=table.schema)}
    except SQLAlchemyError:
        columns = {}
    if not columns:
        report.problems.append(f"table or view {table.fullname!r}: not found in the source "
                               "database")
        return
    for name in sorted(referenced - set(columns)):
        report.problems.append(f"column {name!r}: not in {table.fullname} (it has "
                               f"{', '.join(columns)})")
    report.lines.append("columns: " + ", ".join(
        f"{c.name} {c.kind} ({columns[c.name]['type']})" for c in dataset.columns
        if c.name in columns))
    key = [dataset.key]
    try:
        pk = schema.get_pk_constraint(table.name, schema=table.schema)["constrained_columns"]
        indexes = schema.get_indexes(table.name, schema=table.schema)
        uniques = schema.get_unique_constraints(table.name, schema=table.schema)
    except (SQLAlchemyError, NotImplementedError):  # a view has none of these
        pk, indexes, uniques = [], [], []
    rowid = conn.dialect.name == "sqlite" and _is_rowid(columns.get(dataset.key), pk)
    unique = rowid or pk == key or any(
        i["column_names"] == key and i["unique"] for i in indexes) or any(
        u["column_names"] == key for u in uniques)
    indexed = rowid or pk[:1] == key or any(i["column_names"][:1] == key for i in indexes)
    if not unique:
        report.problems.append(f"key {dataset.key!r}: not unique (declare a primary key or a "
                               "unique index on it alone)")
    elif not indexed:
        report.problems.append(f"key {dataset.key!r}: not indexed")
    else:
        report.lines.append(f"key {dataset.key}: unique, indexed")


def _is_rowid(column: dict | None, pk: list[str]) -> bool:
    return column is not None and len(pk) == 1 and pk[0] == column["name"] and str(
        column["type"]).upper() == "INTEGER"


def _check_query(conn: Connection, dataset: Dataset, report: Report) -> None:
    """A `sql` source has no schema to read: its key is counted unique instead."""
    key = dataset.table.c[dataset.key]
    try:
        total, distinct = conn.execute(select(func.count(), func.count(key.distinct()))).one()
    except SQLAlchemyError as exc:
        report.problems.append(f"key {dataset.key!r}: cannot be counted: {first_line(exc)}")
        return
    if total != distinct:
        report.problems.append(f"key {dataset.key!r}: not unique ({total:,} rows, "
                               f"{distinct:,} distinct keys)")
    else:
        report.lines.append(f"key {dataset.key}: unique over {total:,} rows (query)")


def _estimate(conn: Connection, dataset: Dataset) -> str:
    try:
        if conn.dialect.name == "postgresql" and isinstance(dataset.table, TableClause):
            rows = conn.execute(text("SELECT reltuples::bigint FROM pg_class "
                                     "WHERE oid = to_regclass(:name)"),
                                {"name": dataset.table.fullname}).scalar()
            if rows is not None and rows >= 0:
                return f"about {rows:,} (PostgreSQL's estimate)"
        rows = conn.execute(select(func.count()).select_from(dataset.table)).scalar()
        return f"{rows:,}"
    except SQLAlchemyError as exc:
        return f"unknown ({first_line(exc)})"


def first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]
