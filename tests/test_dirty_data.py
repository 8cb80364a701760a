"""Dirty data (docs/data-quality.md), read from a team's own database on the suite's backend
(an SQLite file, or a fresh PostgreSQL database when TEST_DATABASE_URL is set): every kind of
column with NULLs, extremes, floats that are not numbers, 30-digit numerics, years 1 and 9999,
time zones, bytes, JSON and arrays, text too long for a cell, invalid UTF-8 and values that are
not what their column says. The same text comes from both databases, and csv, csv.gz and xlsx
hold the same values."""

from __future__ import annotations

import csv
import gzip
import io
import secrets
import sqlite3
from datetime import datetime
from pathlib import Path

import openpyxl
import pytest
from conftest import TEST_DATABASE_URL, create_database, drop_database, login, run_inline
from sources import KEYS, set_data_keys
from sqlalchemy import create_engine, make_url, text
from sqlalchemy import exc as sa_exc

from jobs import engine, formats, source
from jobs.checkpoints import Checkpoint
from jobs.dataset_file import load
from jobs.models import ExportJob, db
from jobs.storage import LocalStorage, Prefix
from webapp.auth import find_user

POSTGRES = bool(TEST_DATABASE_URL)
USER, TENANT = "alice@acme.test", KEYS["acme"]
LONG = "x" * 40_000  # more than the 32,767 characters of an xlsx cell
BIG = "123456789012345678901234567890"

# Each column of `dirty` as each database stores it: SQLite keeps exact decimals past 15 digits
# only as text (a NUMERIC column makes them floats); it has no time zone type, JSON or arrays.
SQLITE_TABLE = """CREATE TABLE dirty (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, i INTEGER,
    b BOOLEAN, d DATE, ts DATETIME, tz TEXT, f REAL, n NUMERIC, big TEXT, t TEXT, bin BLOB,
    js TEXT)"""
POSTGRES_TABLE = """CREATE TABLE dirty (id int PRIMARY KEY, tenant text NOT NULL, i bigint,
    b boolean, d date, ts timestamp, tz timestamptz, f double precision, n numeric, big numeric,
    t text, bin bytea, js json, jb jsonb, arr int[], tags text[])"""
POSTGRES_ONLY = {"jb", "arr", "tags"}

# The rows, by id: what each column stores, as SQL literals (`_literal` adds PostgreSQL's types).
ROWS = {
    1: dict(i="42", b="true", d="'2026-01-31'", ts="'2026-01-31 10:00:05.123456'",
            tz="'2026-03-29 01:30:00+02:00'", f="0.1 + 0.2", n="12.345", big=f"'{BIG}'",
            t="'plain'", bin="x'00ff10'", js="""'{"a": [1, 2]}'""", jb="""'{"a":[1,2]}'""",
            arr="'{1,2,3}'", tags="""'{"a b",c,NULL}'"""),
    2: {},  # every column NULL
    3: dict(i="-9223372036854775808", b="false", d="'0001-01-01'", ts="'0001-01-01 00:00:00'",
            tz="'0001-01-01 00:00:00Z'", f="1e300", n="-0.005",
            big="'-1234567890123456789012345678.905'", t=f"'{LONG}'", bin="x''", js="'[]'",
            arr="'{}'"),
    4: dict(i="9223372036854775807", b="true", d="'9999-12-31'",
            ts="'9999-12-31 23:59:59.999999'", tz="'9999-12-31 23:59:59+00:00'", f="9e999",
            n="2.675", big=f"'0.{'0' * 29}1'", t="'=1+2'", bin="x'3d78'", js="""'{"b": "=c"}'"""),
    5: dict(d="'1900-02-28'", ts="'1900-03-01 00:00:00'", tz="'2026-10-25 02:30:00+01:00'",
            f="-9e999", n="2.5", big="'12.50'", t="'-12.50'"),
    6: dict(f="9e999 - 9e999"),  # NaN: SQLite stores a NULL
    # integers among decimals: a page of them (7, 8), one past 2^53 among floats (9, 10)
    7: dict(f="1e14", n="7"), 8: dict(f="1e15", n="12345678901234567"),
    9: dict(f="1.5e-07", n="0.5"), 10: dict(f="123.456", n="9007199254740993"),
}
INVALID_UTF8 = {11: dict(t="CAST(x'636166e9' AS TEXT)", js="CAST(x'7b22ff7d' AS TEXT)"),
                12: dict(t="CAST(x'6f6b20e282' AS TEXT)")}  # SQLite only: 3 values
POSTGRES_CASTS = {"f": "::float8", "tz": "::timestamptz", "js": "::json", "jb": "::jsonb",
                  "big": "::numeric", "n": "::numeric"}
POSTGRES_FLOATS = {"9e999": "'Infinity'", "-9e999": "'-Infinity'", "9e999 - 9e999": "'NaN'"}

DATASETS = """
[[dataset]]
name = "dirty"
sql = '''SELECT id, tenant, i, b, d, ts, tz, f, f AS f2, n, n AS n0, n AS n2, n AS n12, big,
         big AS big2, t, bin, js{extra} FROM dirty'''
key = "id"
tenant = "tenant"
columns = [
  {{ name = "id", kind = "int" }},
  {{ name = "i", kind = "int" }},
  {{ name = "b", kind = "bool" }},
  {{ name = "d", kind = "date" }},
  {{ name = "ts", kind = "datetime" }},
  {{ name = "tz", kind = "datetime" }},
  {{ name = "f", kind = "decimal" }},
  {{ name = "f2", kind = "decimal", scale = 2 }},
  {{ name = "n", kind = "decimal" }},
  {{ name = "n0", kind = "decimal", scale = 0 }},
  {{ name = "n2", kind = "decimal", scale = 2 }},
  {{ name = "n12", kind = "decimal", scale = 12 }},
  {{ name = "big", kind = "decimal" }},
  {{ name = "big2", kind = "decimal", scale = 2 }},
  {{ name = "t", kind = "text" }},
  {{ name = "bin", kind = "text" }},
  {{ name = "js", kind = "text" }},{columns}
]

[[dataset]]
name = "text_as_int"
sql = "SELECT id, tenant, t FROM dirty"
key = "id"
tenant = "tenant"
columns = [{{ name = "id", kind = "int" }}, {{ name = "t", kind = "int" }}]

[[dataset]]
name = "text_as_date"
sql = "SELECT id, tenant, t FROM dirty WHERE id > 2"
key = "id"
tenant = "tenant"
columns = [{{ name = "id", kind = "int" }}, {{ name = "t", kind = "date" }}]
"""
PG_EXTRA = (", jb, arr, tags", """
  { name = "jb", kind = "text" },
  { name = "arr", kind = "text" },
  { name = "tags", kind = "text" },""")
HEADER = ["id", "i", "b", "d", "ts", "tz", "f", "f2", "n", "n0", "n2", "n12", "big", "big2", "t",
          "bin", "js"] + (["jb", "arr", "tags"] if POSTGRES else [])

# The CSV text of each row, the same from both databases but where a row says otherwise.
E300 = "1" + "0" * 300
EXPECTED = {
    1: dict(i="42", b="true", d="2026-01-31", ts="2026-01-31 10:00:05",
            tz="2026-03-28 23:30:00", f="0.30000000000000004", f2="0.30", n="12.345", n0="12",
            n2="12.35", n12="12.345000000000", big=BIG, big2=BIG + ".00", t="plain",
            bin="\\x00ff10", js='{"a": [1, 2]}', jb='{"a": [1, 2]}', arr="{1,2,3}",
            tags='{"a b",c,NULL}'),
    2: {},
    3: dict(i="-9223372036854775808", b="false", d="0001-01-01", ts="0001-01-01 00:00:00",
            tz="0001-01-01 00:00:00", f="1e+300", f2=E300 + ".00", n="-0.005", n0="0",
            n2="-0.01", n12="-0.005000000000", big="-1234567890123456789012345678.905",
            big2="-1234567890123456789012345678.91", t=LONG, bin="\\x", js="[]", arr="{}"),
    4: dict(i="9223372036854775807", b="true", d="9999-12-31", ts="9999-12-31 23:59:59",
            tz="9999-12-31 23:59:59", f="Infinity", f2="Infinity", n="2.675", n0="3", n2="2.68",
            n12="2.675000000000", big=f"0.{'0' * 29}1", big2="0.00", t="'=1+2", bin="\\x3d78",
            js='{"b": "=c"}'),
    5: dict(d="1900-02-28", ts="1900-03-01 00:00:00", tz="2026-10-25 01:30:00", f="-Infinity",
            f2="-Infinity", n="2.5", n0="3", n2="2.50", n12="2.500000000000", big="12.50",
            big2="12.50", t="'-12.50"),
    6: dict(f="NaN", f2="NaN") if POSTGRES else {},
    7: dict(f="100000000000000", f2="100000000000000.00", n="7", n0="7", n2="7.00",
            n12="7.000000000000"),
    8: dict(f="1e+15", f2="1000000000000000.00", n="12345678901234567", n0="12345678901234567",
            n2="12345678901234567.00", n12="12345678901234567.000000000000"),
    9: dict(f="1.5e-07", f2="0.00", n="0.5", n0="1", n2="0.50", n12="0.500000000000"),
    10: dict(f="123.456", f2="123.46", n="9007199254740993", n0="9007199254740993",
             n2="9007199254740993.00", n12="9007199254740993.000000000000"),
}
if not POSTGRES:
    EXPECTED |= {11: dict(t="caf\ufffd", js='{"\ufffd}'), 12: dict(t="ok \ufffd")}


def _literal(column: str, value: str) -> str:
    """SQLite's literal as is; PostgreSQL's with its type (and its bytea and float spelling)."""
    if not POSTGRES:
        return value
    if value.startswith("x'"):
        return f"'\\x{value[2:-1]}'::bytea"
    return POSTGRES_FLOATS.get(value, value) + POSTGRES_CASTS.get(column, "")


def make_dirty_source(folder: Path) -> str:
    """The team's database holding `dirty` with ROWS (and, on SQLite, INVALID_UTF8)."""
    url = (create_database(TEST_DATABASE_URL) if TEST_DATABASE_URL
           else f"sqlite:///{folder / 'dirty.db'}")
    rows = ROWS if POSTGRES else ROWS | INVALID_UTF8
    engine_ = create_engine(url)
    with engine_.begin() as conn:
        conn.exec_driver_sql(POSTGRES_TABLE if POSTGRES else SQLITE_TABLE)
        for key, values in rows.items():
            values = {k: v for k, v in values.items() if POSTGRES or k not in POSTGRES_ONLY}
            names = ", ".join(["id", "tenant", *values])
            literals = ", ".join([str(key), f"'{TENANT}'",
                                  *(_literal(k, v) for k, v in values.items())])
            conn.exec_driver_sql(f"INSERT INTO dirty ({names}) VALUES ({literals})")
        if POSTGRES:  # the session's styles, not these, decide what COPY prints
            name = engine_.url.database
            conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET timezone = 'Asia/Tokyo'")
            conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET datestyle = 'SQL, DMY'")
            conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET extra_float_digits = 0")
    engine_.dispose()
    return url


@pytest.fixture(scope="module")
def dirty_db(tmp_path_factory):
    url = make_dirty_source(tmp_path_factory.mktemp("dirty"))
    yield url
    if TEST_DATABASE_URL:
        drop_database(TEST_DATABASE_URL, url)


@pytest.fixture
def app(fresh, dirty_db, tmp_path):
    """Pages of two rows: a page may hold only NULLs or only floats of a column."""
    path = tmp_path / "datasets.toml"
    path.write_text(DATASETS.format(extra=PG_EXTRA[0] if POSTGRES else "",
                                    columns=PG_EXTRA[1] if POSTGRES else ""))
    fresh.app.config.update(DATASETS_FILE=str(path), SOURCE_DATABASE_URL=dirty_db,
                            EXPORT_BATCH_ROWS=2)
    fresh.app.extensions["exportdesk.datasets"] = load(path)
    set_data_keys(fresh.app)
    return fresh.app


def exported(app, fmt: str, dataset: str = "dirty") -> tuple[ExportJob, bytes]:
    job = run_inline(app, USER, dataset, fmt=fmt)
    assert job.state == "succeeded", job.error
    return job, (Path(app.config["EXPORT_DIR"]) / job.file_name).read_bytes()


def parse(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))  # strict UTF-8


def want_rows() -> list[list[str]]:
    return [[str(key), *(EXPECTED[key].get(c, "") for c in HEADER[1:])] for key in EXPECTED]


def sheet_rows(data: bytes) -> list[list]:
    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
    return [list(row) for row in book.worksheets[0].iter_rows(values_only=True)]


def test_csv_holds_the_documented_text_of_every_case(app, dirty_db):
    if POSTGRES:  # Tokyo time, day-first dates, 15-digit floats: the session's styles win
        engine_ = create_engine(dirty_db)
        with engine_.connect() as conn:
            assert conn.execute(text("SHOW timezone")).scalar() == "Asia/Tokyo"
        engine_.dispose()
    job, data = exported(app, "csv")
    rows = parse(data)
    assert rows[0] == HEADER
    for got, want in zip(rows[1:], want_rows(), strict=True):
        assert dict(zip(HEADER, got, strict=True)) == dict(zip(HEADER, want, strict=True))
    assert job.utf8_replaced == (0 if POSTGRES else 3)
    assert job.xlsx_truncated == 0, "csv keeps a long text whole"


def test_csv_gz_is_the_csv_and_the_files_read_in_other_tools(app):
    job, data = exported(app, "csv")
    _, packed = exported(app, "csv.gz")
    assert gzip.decompress(packed) == data
    path = str(Path(app.config["EXPORT_DIR"]) / job.file_name)
    try:
        import duckdb
    except ImportError:
        pandas = pytest.importorskip(
            "pandas", reason="neither DuckDB nor pandas is installed to read the file with")
        table = pandas.read_csv(path, dtype=str, keep_default_na=False).values.tolist()
    else:
        table = [[value or "" for value in row]
                 for row in duckdb.read_csv(path, all_varchar=True).fetchall()]
    assert table == want_rows()


def test_xlsx_holds_the_same_values_typed_where_excel_can(app):
    job, data = exported(app, "xlsx")
    rows = sheet_rows(data)
    assert rows[0] == HEADER and len(rows) == len(EXPECTED) + 1
    cells = {int(row[0]): dict(zip(HEADER, row, strict=True)) for row in rows[1:]}
    # NULL in every kind of column: an empty cell
    assert all(v is None for k, v in cells[2].items() if k != "id")
    one = cells[1]
    assert (one["i"], one["b"], one["n"], one["f2"]) == (42, True, 12.345, 0.3)
    assert one["d"] == datetime(2026, 1, 31) and one["ts"] == datetime(2026, 1, 31, 10, 0, 5)
    assert one["tz"] == datetime(2026, 3, 28, 23, 30), "a time zone's moment as UTC"
    # more than 15 significant digits: the text, as a double would lose digits
    assert one["f"] == "0.30000000000000004" and one["big"] == BIG and one["big2"] == BIG + ".00"
    assert cells[3]["i"] == "-9223372036854775808"
    assert one["bin"] == "\\x00ff10" and one["js"] == '{"a": [1, 2]}'
    low, high, edge = cells[3], cells[4], cells[5]
    assert low["d"] == "0001-01-01" and low["ts"] == "0001-01-01 00:00:00", "before 1900: text"
    assert edge["d"] == "1900-02-28" and edge["ts"] == datetime(1900, 3, 1), "Excel's 1900 bug"
    assert high["d"] == datetime(9999, 12, 31) and high["ts"] == datetime(9999, 12, 31, 23, 59, 59)
    assert low["f"] == 1e300 and low["f2"] == 1e300, "a double Excel holds is a number"
    assert (high["f"], edge["f"]) == ("Infinity", "-Infinity")
    assert cells[6]["f"] == ("NaN" if POSTGRES else None)
    assert high["big"] == 1e-30 and edge["big2"] == 12.5
    assert high["t"] == "'=1+2" and edge["t"] == "'-12.50", "formulas neutralised as in csv"
    # longer than a cell: cut with a visible mark, and counted
    assert len(low["t"]) == formats.XLSX_MAX_TEXT and low["t"].endswith(formats.XLSX_CUT_MARK)
    assert job.xlsx_truncated == 1 and job.utf8_replaced == (0 if POSTGRES else 3)
    if not POSTGRES:
        assert (cells[11]["t"], cells[12]["t"]) == ("caf\ufffd", "ok \ufffd")
    # every other cell: the csv's number, date or text
    for csv_row, row in zip(parse(exported(app, "csv")[1])[1:], rows[1:], strict=True):
        for name, want, cell in zip(HEADER, csv_row, row, strict=True):
            if cell is None:
                assert want == "", name
            elif isinstance(cell, bool):
                assert want == str(cell).lower(), name
            elif isinstance(cell, int | float):
                assert float(want) == cell, name
            elif isinstance(cell, datetime):
                assert want == (str(cell.date()) if name == "d" else str(cell)), name
            else:
                assert want == cell or cell.endswith(formats.XLSX_CUT_MARK), name


def test_the_counts_show_on_the_job_pages_and_in_the_api(app):
    job, _ = exported(app, "xlsx")
    replaced = 0 if POSTGRES else 3
    client = app.test_client()
    login(client, USER)
    page = client.get(f"/exports/{job.id}").get_data(as_text=True)
    assert "1 text was longer than an xlsx cell holds" in page
    assert (f"{replaced} values held bytes that are not UTF-8" in page) == bool(replaced)
    body = client.get(f"/api/jobs/{job.id}").get_json()
    assert (body["utf8_replaced"], body["xlsx_truncated"]) == (replaced, 1)
    admin = app.test_client()
    login(admin, "admin@exportdesk.test")
    page = admin.get(f"/admin/jobs/{job.id}").get_data(as_text=True)
    assert "Changed values" in page and "1 text was longer" in page


@pytest.mark.skipif(POSTGRES, reason="a PostgreSQL UTF8 database holds no invalid UTF-8 "
                    "(test_postgresql_refuses_invalid_utf8)")
def test_a_resume_counts_the_replaced_values_once(app, tmp_path):
    """Crash after the third checkpoint (rows 1 to 3 of pages of one row), resume from the
    second: the count is the uninterrupted export's, though rows 11 and 12 come after it."""
    dataset = app.extensions["exportdesk.datasets"]["dirty"]
    seen: list[Checkpoint] = []

    class Crash(Exception):
        pass

    def crash_on_third(cp: Checkpoint) -> None:
        seen.append(cp)
        if len(seen) == 3:
            raise Crash

    files = LocalStorage(tmp_path)
    with app.app_context():
        org = find_user(USER).organisation.data_key_or_id
        with source.connect() as conn:
            first, _ = files.open_part(1, 1, "csv")
            with first, pytest.raises(Crash):
                formats.stream(conn, dataset, org, {}, first, Checkpoint(), crash_on_third,
                               1, 0.0, "csv")
            second, problem = files.open_part(1, 2, "csv", Prefix(first.name, seen[1].bytes,
                                                                  seen[1].sha256))
            with second:
                assert problem is None
                final = formats.stream(conn, dataset, org, {}, second, seen[1], lambda c: None,
                                       1, 0.0, "csv")
    assert final.replaced == 3 and final.rows == len(EXPECTED)
    assert parse((tmp_path / second.name).read_bytes())[1:] == want_rows()


@pytest.mark.skipif(not POSTGRES, reason="SQLite stores any bytes (the tests above)")
def test_postgresql_refuses_invalid_utf8(dirty_db):
    engine_ = create_engine(dirty_db)
    with pytest.raises(sa_exc.DataError, match="invalid byte sequence for encoding"), \
            engine_.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO dirty (id, tenant, t) VALUES (99, '{TENANT}', E'caf\\xe9')")
    engine_.dispose()


def run_once(app, dataset: str, fmt: str) -> tuple[ExportJob, list]:
    """An export run as a worker would, allowed three attempts; the job and its attempts."""
    with app.app_context():
        user = find_user(USER)
        job = ExportJob(user=user, org_id=user.org_id, dataset=dataset, params={}, format=fmt)
        db.session.add(job)
        db.session.commit()
        with pytest.raises(engine.AttemptFailed) as failed:
            engine.run(job.id, max_attempts=3)
        assert not failed.value.retry, "a data error is permanent"
        db.session.refresh(job)
        attempts = list(job.attempts)
        db.session.expunge(job)
        return job, attempts


@pytest.mark.parametrize("fmt", ["csv", "xlsx"])
def test_text_in_an_int_column_fails_at_once_naming_the_row(app, fmt):
    job, attempts = run_once(app, "text_as_int", fmt)
    assert job.state == "failed" and len(attempts) == 1
    assert job.error.startswith("A value cannot be exported: ")
    if POSTGRES:  # PostgreSQL's message names the value, not the row
        assert 'invalid input syntax for type bigint: "plain"' in job.error
    else:
        assert "The row with id 1: t holds 'plain', not a value of kind int" in job.error


@pytest.mark.parametrize("fmt", ["csv", "csv.gz"])
def test_a_date_that_is_no_date_fails_at_once(app, fmt):
    job, attempts = run_once(app, "text_as_date", fmt)
    assert job.state == "failed" and len(attempts) == 1
    if POSTGRES:
        assert 'invalid input syntax for type date: "' in job.error
    else:
        assert f"The row with id 3: t holds '{'x' * 20}" in job.error
        assert "not a value of kind date" in job.error


def declare(app, folder: Path, url: str, table: str, columns: dict[str, str]) -> None:
    """Export `table` of the database at `url`, with these columns (name: kind) after `id`."""
    listed = ", ".join(f'{{ name = "{n}", kind = "{k}" }}' for n, k in
                       {"id": "int", **columns}.items())
    path = folder / f"{table}.toml"
    path.write_text(f'[[dataset]]\nname = "{table}"\ntable = "{table}"\nkey = "id"\n'
                    f'tenant = "tenant"\ncolumns = [{listed}]\n')
    app.config["SOURCE_DATABASE_URL"] = url
    app.extensions.pop("exportdesk.source", None)  # made again on the new URL
    app.extensions["exportdesk.datasets"] = load(path)


@pytest.mark.skipif(POSTGRES, reason="PostgreSQL's types hold only valid dates and numbers")
@pytest.mark.parametrize("stored, kind, shown", [
    ("'2026-02-30'", "date", "'2026-02-30'"),
    ("'2026-01-31 24:00:00'", "datetime", "'2026-01-31 24:00:00'"),
    ("'12,5'", "decimal", "'12,5'"),
    ("x'00'", "decimal", "'\\x00'"),
    ("2", "bool", "'2'"),
    ("2.5", "int", "2.5"),
])
def test_sqlite_values_that_are_not_their_kind_fail_naming_the_row(app, tmp_path, stored, kind,
                                                                  shown):
    path = tmp_path / "bad.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE bad (id INTEGER PRIMARY KEY, tenant TEXT, v)")
        conn.execute(f"INSERT INTO bad VALUES (1, '{TENANT}', NULL), (7, '{TENANT}', {stored})")
    declare(app, tmp_path, f"sqlite:///{path}", "bad", {"v": kind})
    job, attempts = run_once(app, "bad", "csv")
    assert len(attempts) == 1
    assert f"The row with id 7: v holds {shown}" in job.error, job.error


@pytest.mark.skipif(not POSTGRES, reason="SQLite holds no dates outside years 1 to 9999")
def test_postgresql_dates_before_year_1_or_after_9999_are_its_text(app, dirty_db, tmp_path):
    engine_ = create_engine(dirty_db)
    with engine_.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE far (id int PRIMARY KEY, tenant text, d date, "
                             "ts timestamp)")
        conn.exec_driver_sql(f"INSERT INTO far VALUES (1, '{TENANT}', '0044-03-15 BC', "
                             f"'0044-03-15 12:00:00.5 BC'), (2, '{TENANT}', '10000-01-01', "
                             f"'10000-01-01'), (3, '{TENANT}', 'infinity', '-infinity')")
    engine_.dispose()
    declare(app, tmp_path, dirty_db, "far", {"d": "date", "ts": "datetime"})
    want = [["0044-03-15 BC", "0044-03-15 12:00:00 BC"], ["10000-01-01", "10000-01-01 00:00:00"],
            ["infinity", "-infinity"]]
    assert [r[1:] for r in parse(exported(app, "csv", "far")[1])[1:]] == want
    assert [r[1:] for r in sheet_rows(exported(app, "xlsx", "far")[1])[1:]] == want


@pytest.mark.skipif(not POSTGRES, reason="database encodings are PostgreSQL's")
@pytest.mark.parametrize("encoding, stored", [("LATIN1", "'café'"),
                                              ("SQL_ASCII", "E'caf\\xe9'")])
def test_a_postgresql_database_in_another_encoding(app, tmp_path, encoding, stored):
    """The export's session asks for UTF-8: the server converts LATIN1; SQL_ASCII sends the
    bytes it holds, and refuses to send ones that are not UTF-8: the export fails at once."""
    server = create_engine(TEST_DATABASE_URL, isolation_level="AUTOCOMMIT")
    name = f"exportdesk_test_{encoding.lower()}_{secrets.token_hex(6)}"
    with server.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' "
                             "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    server.dispose()
    url = make_url(TEST_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    try:
        engine_ = create_engine(url, connect_args={"options": "-c client_encoding=UTF8"})
        with engine_.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE notes (id int PRIMARY KEY, tenant text, t text)")
            conn.exec_driver_sql(f"INSERT INTO notes VALUES (1, '{TENANT}', {stored})")
        engine_.dispose()
        declare(app, tmp_path, url, "notes", {"t": "text"})
        if encoding == "LATIN1":
            assert parse(exported(app, "csv", "notes")[1])[1:] == [["1", "café"]]
        else:
            job, attempts = run_once(app, "notes", "csv")
            assert len(attempts) == 1
            assert 'invalid byte sequence for encoding "UTF8": 0xe9' in job.error
    finally:
        with app.app_context():
            source.engine().dispose()
        drop_database(TEST_DATABASE_URL, url)
