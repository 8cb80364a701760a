"""The C of issue 19 (jobs/_fastcsv.c). SQLite's fast path, canonical values as CSV straight from
SQLite's C API, must write the very bytes of the Arrow reader (jobs.sqlite_reader) for every
value it takes, hand every other page to that reader, and stop reading at once when closed.
PostgreSQL's COPY rows read in C must be the rows the Python loop reads, errors included, and
a binary COPY printed as CSV in C, the very bytes the server's own CSV formatting gives."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import TEST_DATABASE_URL, create_database, drop_database, require
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc

from jobs import postgres_pages, sqlite_pages
from jobs.dataset_file import load

COLUMNS = {"i": "int", "b": "bool", "d2": "decimal", "d0": "decimal", "d6": "decimal",
           "dn": "decimal", "t": "text", "dt": "datetime", "dd": "date"}
SCALES = {"d2": 2, "d0": 0, "d6": 6}
TEXTS = ["", "plain", "EUR", "a,b", 'said "hi"', "line\nbreak", "cr\rhere", "=1+2", "+1", "-12",
         "@SUM(A1)", "\tx", "\rx", "a=b", "x-y", "café", "😀 emoji", "naïve, \"quoted\"",
         '=HYPERLINK("http://evil.test","click")', "long text without anything to quote at all",
         "sixteen bytes!!,", "quote after eight bytes: \"", "ends in a newline\n", "€,€"]


@pytest.fixture(autouse=True)
def built():
    if sqlite_pages._fastcsv is None:
        require("jobs._fastcsv", "the C extension `pip install -e .` builds (a C compiler and "
                "SQLite's headers)")


def _canonical(rnd: random.Random) -> dict[str, object]:
    """A row of values the fast path writes: in their canonical form, none near a tie."""
    def maybe(value: object) -> object:
        return None if rnd.random() < 0.08 else value

    year = rnd.choice([1, 999, 1900, 2000, 2024, 2026, 9999])
    month, day = rnd.randint(1, 12), rnd.randint(1, 28)
    if rnd.random() < 0.05:
        year, month, day = 2024, 2, 29
    date = f"{year:04d}-{month:02d}-{day:02d}"
    clock = f"{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}"
    fraction = rnd.choice(["", ".5", ".000000", ".123456", ".999999", ".25"])
    return {
        "i": maybe(rnd.choice([0, -1, 7, 2**53 + 1, -2**63, 2**63 - 1,
                               rnd.randint(-10**9, 10**9)])),
        "b": maybe(rnd.choice([0, 1])),
        "d2": maybe(rnd.choice([round(rnd.uniform(-10**6, 10**6), 2), rnd.randint(-10**6, 10**6),
                                0.0, -0.0, 0.1, 12.3, -0.004, 1e-9, 99999999999.99])),
        "d0": maybe(rnd.choice([round(rnd.uniform(-1e9, 1e9)), 2.4, -2.6, 0.0, 7])),
        "d6": maybe(rnd.choice([round(rnd.uniform(-100, 100), 6), 0.000001, -1.25e-7, 3])),
        "dn": None,  # no scale: left to Arrow's shortest floats, so always NULL here
        "t": maybe(rnd.choice(TEXTS) + rnd.choice(["", "", " and more", ",", '"'])),
        "dt": maybe(date + rnd.choice([" ", "T"]) + clock + fraction),
        "dd": maybe(date),
    }


def _make(path: Path, rows: list[dict[str, object]]) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE v (id INTEGER PRIMARY KEY, tenant TEXT, "
                      + ", ".join(COLUMNS) + ")")
        conn.executemany(f"INSERT INTO v VALUES (?, 'T', {', '.join('?' * len(COLUMNS))})",
                         [(key, *row.values()) for key, row in enumerate(rows, 1)])


def _dataset(folder: Path):
    listed = ", ".join(
        f'{{ name = "{n}", kind = "{k}"' + (f", scale = {SCALES[n]}" if n in SCALES else "") + " }"
        for n, k in COLUMNS.items())
    path = folder / "v.toml"
    path.write_text('[[dataset]]\nname = "v"\ntable = "v"\nkey = "id"\ntenant = "tenant"\n'
                    'tenant_kind = "text"\n'
                    f'columns = [{{ name = "id", kind = "int" }}, {listed}]\n')
    return load(path)["v"]


def _export(app, folder: Path, monkeypatch, fast: bool, after: object = None) -> tuple[bytes, int]:
    """The CSV rows of `v`, 7 rows a page, and how many reader processes were started."""
    started = []
    popen = sqlite_pages.subprocess.Popen

    def remember(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    with monkeypatch.context() as patch:
        patch.setattr(sqlite_pages.subprocess, "Popen", remember)
        if not fast:
            patch.setattr(sqlite_pages, "_fastcsv", None)
        engine = create_engine(f"sqlite:///{folder / 'v.db'}")
        with app.app_context(), engine.connect() as conn:
            data = b"".join(batch.data for batch in sqlite_pages.pages(
                conn, _dataset(folder), "T", {}, after, 7))
        engine.dispose()
    return data, len(started)


def test_canonical_values_are_the_arrow_readers_bytes(app, tmp_path, monkeypatch):
    rnd = random.Random(19)
    _make(tmp_path / "v.db", [_canonical(rnd) for _ in range(3000)])
    fast, readers = _export(app, tmp_path, monkeypatch, fast=True)
    arrow, _ = _export(app, tmp_path, monkeypatch, fast=False)
    assert readers == 0, "every page was the fast path's"
    assert fast.count(b"\n") >= 3000 and fast == arrow
    resumed, _ = _export(app, tmp_path, monkeypatch, fast=True, after=1500)
    assert resumed == arrow[arrow.index(b"\n1501,"):][1:]


NOT_CANONICAL = {  # each refused by the fast path: the Arrow reader writes its page
    "t": ["x'ff3d'", "CAST(x'c328' AS TEXT)", "12", "1.5", "'a' || char(0) || 'b'"],
    "dt": ["'2026-01-10 17:07:01+02:00'", "'2026-01-10'", "'2026-01-10 17:07'",
           "'2026-01-10 17:07:01.1234567'", "'2026-01-10T17:07:01Z'"],
    "dd": ["'2026-01-10 00:00:00'", "'2024-02-29T00:00:00'"],
    "d2": ["0.125", "2.675", "'12.5'", "1e300", "9e99", "-0.005", "123456789012345"],
    "d6": ["0.0000005", "1e9"],
    "dn": ["1.5", "3"],
}


@pytest.mark.parametrize("column, stored", [(c, s) for c, values in NOT_CANONICAL.items()
                                            for s in values])
def test_a_page_with_another_value_goes_to_the_arrow_reader_with_the_same_bytes(
        app, tmp_path, monkeypatch, column, stored):
    rnd = random.Random(column + stored)
    _make(tmp_path / "v.db", [_canonical(rnd) for _ in range(40)])
    with sqlite3.connect(tmp_path / "v.db") as conn:  # in the third page (7 rows a page)
        conn.execute(f"UPDATE v SET {column} = {stored} WHERE id = 17")
    fast, readers = _export(app, tmp_path, monkeypatch, fast=True)
    arrow, _ = _export(app, tmp_path, monkeypatch, fast=False)
    assert readers == 1 and fast == arrow
    assert fast.startswith(arrow[:arrow.index(b"\n15,")]), "two pages by the fast path"


def test_closing_the_pages_early_stops_reading_at_once(app, tmp_path, monkeypatch):
    """A cancel closes the pages: the page read ahead is done, the database closed, and no
    reading thread is left."""
    rnd = random.Random(7)
    _make(tmp_path / "v.db", [_canonical(rnd) for _ in range(100)])
    engine = create_engine(f"sqlite:///{tmp_path / 'v.db'}")
    with app.app_context(), engine.connect() as conn:
        pages = sqlite_pages.pages(conn, _dataset(tmp_path), "T", {}, None, 7)
        assert next(pages).rows == 7
        pages.close()
    engine.dispose()
    assert not [t for t in threading.enumerate() if t.name.startswith("page")]


# PostgreSQL: a COPY's rows read in C (jobs._fastcsv.copy_out)

ROWS = ("COPY (SELECT g, repeat('é,\"', g % 7), CASE WHEN g % 5 = 0 THEN NULL ELSE g / 3.0 END "
        "FROM generate_series(1, {n}) g) TO STDOUT WITH (FORMAT csv)")


@pytest.fixture
def pg():
    psycopg = pytest.importorskip("psycopg")
    server = (TEST_DATABASE_URL or "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        conn = psycopg.connect(server.replace("+psycopg", ""))
    except psycopg.OperationalError as exc:
        require("PostgreSQL", str(exc).splitlines()[0])
    yield conn
    conn.close()


@pytest.mark.parametrize("rows", [0, 1, 30_000])
def test_copy_out_reads_the_rows_the_python_loop_reads(pg, monkeypatch, rows):
    assert postgres_pages._fastcsv.libpq(), "the libpq psycopg loaded is found"
    in_c = postgres_pages._copy(pg, ROWS.format(n=rows), in_c=True)
    in_python = postgres_pages._copy(pg, ROWS.format(n=rows), in_c=False)
    assert in_c == in_python and in_c[1] == rows
    assert in_c[0].endswith(in_c[2]) and (rows == 0 or in_c[2].startswith(f"{rows},".encode()))


def test_copy_out_ends_at_an_error_the_server_sends_midway(pg):
    """A COPY that fails after sending rows raises the server's error, as SQLAlchemy would,
    and leaves the connection ready for the next page."""
    failing = ("COPY (SELECT 1 / (20000 - g) FROM generate_series(1, 30000) g) "
               "TO STDOUT WITH (FORMAT csv)")
    with pytest.raises(sa_exc.DBAPIError, match="division by zero"):
        postgres_pages._copy(pg, failing, in_c=True)
    assert postgres_pages._copy(pg, ROWS.format(n=3), in_c=True)[1] == 3


# A PostgreSQL table of every type copy_out prints as stored, and some the server formats.
STORED = {"small": ("int2", "int"), "big": ("int8", "int"), "n2": ("numeric(12, 2)", "decimal"),
          "n": ("numeric", "decimal"), "nn": ("numeric", "decimal"), "f": ("float8", "decimal"),
          "d": ("date", "date"),
          "ts": ("timestamp", "datetime"), "tz": ("timestamptz", "datetime"),
          "t": ("text", "text"), "v": ("varchar(40)", "text"), "c": ("char(6)", "text"),
          "b": ("boolean", "bool"), "j": ("json", "text")}
FIXED = {"id", "small", "big", "n2", "nn", "d", "ts", "tz", "t", "v"}  # n: declared with scale 2


def _stored_row(rnd: random.Random, key: int) -> tuple:
    def maybe(value: object) -> object:
        return None if rnd.random() < 0.08 else value

    moment = (f"{rnd.choice([1, 44, 1999, 2026, 9999]):04d}-{rnd.randint(1, 12):02d}-"
              f"{rnd.randint(1, 28):02d} {rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:"
              f"{rnd.randint(0, 59):02d}{rnd.choice(['', '.5', '.123456', '.999999'])}")
    text = rnd.choice(TEXTS) + rnd.choice(["", "", " and more", ",", '"', '""'])
    return (key, maybe(rnd.randint(-2**15, 2**15 - 1)), maybe(rnd.choice([-2**63, 2**63 - 1, 0])),
            maybe(rnd.choice(["0", "-0.5", "12.345", "9999999999.99", "NaN"])),
            maybe(rnd.choice(["1.005", "-2.675", "7", "NaN", "0.1"])),
            maybe(rnd.choice(["0.000001", "-123456789.1234567890123", "1e-20", "-1e20", "0.0",
                              "10000", "99990000.0001", "NaN", "Infinity", "-Infinity"])),
            maybe(rnd.choice(["0.1", "1e300", "-0", "Infinity"])), maybe(moment[:10]),
            maybe(moment), maybe(moment + rnd.choice(["+00", "+05:30", "-11"])),
            maybe(text), maybe(text[:40]), maybe(text[:6]), maybe(rnd.choice([True, False])),
            maybe('{"a": "=1"}'))


@pytest.fixture
def stored(tmp_path):
    """A database holding `stored`: random rows of every type, then pages copy_out does not
    know (ids 1001-1003: a timestamp BC, infinity, a year past 9999); its dataset."""
    server = TEST_DATABASE_URL or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    try:
        url = create_database(server)
    except sa_exc.OperationalError as exc:
        require("PostgreSQL", str(exc).splitlines()[0])
    engine = create_engine(url)
    rnd = random.Random(19)
    columns = ", ".join(f"{name} {stored}" for name, (stored, _) in STORED.items())
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE stored (id int8 PRIMARY KEY, {columns})")
        conn.exec_driver_sql(f"INSERT INTO stored VALUES ({', '.join(['%s'] * (len(STORED) + 1))})",
                             [_stored_row(rnd, key) for key in range(1, 1001)])
        conn.exec_driver_sql("INSERT INTO stored (id, ts, tz) VALUES "
                             "(1001, '0044-03-15 12:00:00.5 BC', '2026-01-01 00:00:00.5+00'), "
                             "(1002, 'infinity', '-infinity'), "
                             "(1003, '12026-01-01 00:00:00.25', '12026-01-01 00:00:00+00')")
    engine.dispose()
    listed = ", ".join(f'{{ name = "{name}", kind = "{kind}"'
                       + (", scale = 2" if name in ("n2", "n") else "") + " }"
                       for name, (_, kind) in STORED.items())
    path = tmp_path / "stored.toml"
    path.write_text('[[dataset]]\nname = "stored"\ntable = "stored"\nkey = "id"\n'
                    'scope = "all"\n'
                    f'columns = [{{ name = "id", kind = "int" }}, {listed}]\n')
    yield url, load(path)["stored"]
    drop_database(server, url)


def test_a_binary_copy_printed_in_c_is_the_servers_own_csv(
        stored, monkeypatch):
    """The columns COPY prints as stored are the ones whose type prints as the server formats
    it but for what copy_out does; printed in C, every page is byte for byte the server's own
    CSV formatting; a page holding a value copy_out does not print (BC, infinity, a fifth digit of
    year) is formatted by the server, and only that page."""
    from jobs import source

    url, dataset = stored
    engine = source.make_engine(url, 30)  # the session's print styles: UTC, ISO
    copies = []
    real_copy = postgres_pages._copy

    def spy(driver, query, in_c, fields=None):
        got = real_copy(driver, query, in_c, fields)
        copies.append((fields is not None, got is not False))
        return got

    monkeypatch.setattr(postgres_pages, "_copy", spy)
    with engine.connect() as conn:
        assert postgres_pages.binary_fields(conn, dataset, None, {})[0] == FIXED
        fixed = b"".join(b.data for b in postgres_pages.pages(conn, dataset, None, {}, None, 7))
        past_c = {(key - 1) // 7 for key in (1001, 1002, 1003)}  # 7 rows a page
        assert copies.count((True, False)) == len(past_c) == 2  # and no other
        assert copies.count((True, True)) == -(-1003 // 7) - 2
        with monkeypatch.context() as patch:
            patch.setattr(postgres_pages._fastcsv, "libpq", lambda: False)
            formatted = b"".join(b.data for b in postgres_pages.pages(conn, dataset, None, {},
                                                                       None, 7))
    engine.dispose()
    assert formatted.count(b"\n") >= 1003 and b"'=" in formatted and b"BC" in formatted
    assert fixed == formatted
