"""The database exports read: SOURCE_DATABASE_URL (the app's own database by default).

Every connection is read-only and every statement has a time limit (SOURCE_STATEMENT_TIMEOUT),
whatever user the URL names (docs still tell operators to give exportdesk a read-only user):

- PostgreSQL: `default_transaction_read_only` and `statement_timeout`, set for the session
  (with the styles it prints values in, `PRINT_STYLES`);
- SQLite: opened read-only (`mode=ro`), with an authorizer that allows reading and nothing
  else (no ATTACH, no writes, no PRAGMA but schema questions: refused when a statement is
  prepared) and a progress handler that interrupts a statement past its time limit. The
  Arrow reader process (jobs.sqlite_reader) opens the file read-only too; its SQL is
  prepared here first, under the authorizer (`check_sqlite`), and the parent kills it when a
  page takes too long.
"""

from __future__ import annotations

import sqlite3
import time

from flask import current_app
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

READ_ONLY_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                     getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


class StatementTimeout(Exception):
    """A statement of the source database ran past SOURCE_STATEMENT_TIMEOUT."""


# How a PostgreSQL session prints values, whatever the server's or the database's defaults:
# in UTF-8 (converted from the database's encoding; bytes an SQL_ASCII database holds that are
# not UTF-8 are refused), timestamptz as UTC, dates as ISO, floats as their shortest exact text,
# bytea as hex (the text COPY writes, docs/data-quality.md).
PRINT_STYLES = ("-c client_encoding=UTF8 -c TimeZone=UTC -c DateStyle=ISO "
                "-c extra_float_digits=1 -c bytea_output=hex")


def engine(key: str = "exportdesk.source", limit_setting: str = "SOURCE_STATEMENT_TIMEOUT"
           ) -> Engine:
    """The running app's source engine whose statements stop after `limit_setting` seconds,
    made once (kept in app.extensions[key])."""
    made = current_app.extensions.get(key)
    if made is None:
        config = current_app.config
        url = config.get("SOURCE_DATABASE_URL") or config["SQLALCHEMY_DATABASE_URI"]
        made = current_app.extensions[key] = make_engine(url, config[limit_setting])
    return made


def connect() -> Connection:
    return engine().connect()


def connect_briefly() -> Connection:
    """A source connection whose statements stop after ROW_ESTIMATE_TIMEOUT s (2 by default):
    for questions a page waits for, like the form's row estimate, which must not hold a web
    worker for the exports' own SOURCE_STATEMENT_TIMEOUT."""
    return engine("exportdesk.source.brief", "ROW_ESTIMATE_TIMEOUT").connect()


def timeout() -> float:
    return current_app.config["SOURCE_STATEMENT_TIMEOUT"]


def make_engine(url: str, limit: float) -> Engine:
    """An engine whose connections can only read, each statement for at most `limit` s."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        options = (f"-c default_transaction_read_only=on "
                   f"-c statement_timeout={max(1, round(limit * 1000))} {PRINT_STYLES}")
        return create_engine(parsed, connect_args={"options": options}, pool_pre_ping=True)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        raise ValueError(f"SOURCE_DATABASE_URL: {parsed.get_backend_name()} is not supported "
                         "(PostgreSQL or an SQLite file)")
    path = parsed.database

    def opened() -> sqlite3.Connection:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    made = create_engine(parsed, creator=opened)

    @event.listens_for(made, "before_cursor_execute")
    def _guard(conn, _cursor, _statement, _params, _context, _many) -> None:
        """Per statement (SQLAlchemy's own PRAGMAs when it connects run before this)."""
        driver = conn.connection.driver_connection
        driver.set_authorizer(_read_only)
        deadline = time.monotonic() + limit
        driver.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)

    return made


# Schema questions `flask datasets check` asks (reading a pragma: never setting one).
SCHEMA_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                  "foreign_key_list"}


# Functions that reach outside the database (some exist only in some builds).
OUTSIDE_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


def _read_only(action: int, arg1: str | None, arg2: str | None, *_where) -> int:
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in OUTSIDE_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if action in READ_ONLY_ACTIONS or (
            action == sqlite3.SQLITE_PRAGMA and arg1 in SCHEMA_PRAGMAS and arg2 is not None):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def check_sqlite(conn: Connection, sql: str) -> None:
    """Prepare `sql` under the read-only authorizer (EXPLAIN runs nothing): a statement that
    would do anything but read is refused before the reader process ever sees it."""
    conn.exec_driver_sql("EXPLAIN " + sql).close()


def timed_out(exc: BaseException) -> bool:
    """Whether exc is (or wraps) the source's statement timeout."""
    while exc is not None:
        if isinstance(exc, StatementTimeout):
            return True
        if getattr(exc, "sqlstate", None) == "57014":  # PostgreSQL query_canceled
            return "statement timeout" in str(exc)
        if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False
