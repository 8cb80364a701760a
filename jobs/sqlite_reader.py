"""Reads an SQLite export's pages as CSV in a process of its own (run by `jobs.sqlite_pages`).

ADBC reads each keyset page into Arrow columns and Arrow's C++ kernels format and join them,
while a second thread already reads the next page. ADBC links its own copy of SQLite, and two
copies of SQLite in one process undo each other's POSIX locks (sqlite.org/howtocorrupt.html,
2.2.1), so this never runs inside a worker that also writes the database: it only imports
Arrow, ADBC and the standard library, and opens the database read-only.

Protocol: a JSON spec on stdin; on stdout, per page, a header packed with the spec's `frame`
(rows, last key, bytes) followed by that many bytes of CSV rows. Exit status 0 after the last
page; otherwise the error is on stderr.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterator
from urllib.parse import quote

import adbc_driver_manager as adbc
import adbc_driver_sqlite
import pyarrow as pa
import pyarrow.compute as pc

from jobs.readahead import read_ahead

FORMULA_PATTERN = r"^[=+\-@\t\r]"  # jobs.csvrows.FORMULA_PREFIXES, as a regex
NEEDS_QUOTES_PATTERN = r'[",\r\n]'


def pages(spec: dict) -> Iterator[tuple[int, int, bytes]]:
    """(rows, last key, CSV bytes) per page. The spec holds the SQL of the first page
    (`from_start`) and of a page after the key bound to `?` (`after_key`), `kinds` and `size`."""
    database = adbc_driver_sqlite.connect(f"file:{quote(spec['database'])}?mode=ro")
    connection = adbc.AdbcConnection(database)  # autocommit: no snapshot held between pages

    def fetch(after: int | None) -> tuple[pa.Table, int] | None:
        with adbc.AdbcStatement(connection) as statement:
            statement.set_options(**{"adbc.sqlite.query.batch_rows": str(spec["size"])})
            if after is None:
                statement.set_sql_query(spec["from_start"])
            else:
                statement.set_sql_query(spec["after_key"])
                statement.bind(pa.record_batch([pa.array([after], pa.int64())], ["after"]))
            stream, _ = statement.execute_query()
            page = pa.RecordBatchReader._import_from_c(stream.address).read_all()
        return (page, last_key(page)) if page.num_rows else None

    try:
        for page in read_ahead(fetch, spec["after"]):
            yield page.num_rows, last_key(page), to_csv(page, spec["kinds"])
    finally:
        connection.close()
        database.close()


def last_key(page: pa.Table) -> int:
    return page.column(0)[-1].as_py()


def to_csv(page: pa.Table, kinds: list[str]) -> bytes:
    """A page (the key, then every column) as CSV rows ending in LF."""
    out = []
    for batch in page.to_batches():
        cells = [FORMAT[kind](batch.column(i + 1)) for i, kind in enumerate(kinds)]
        cells[-1] = pc.binary_join_element_wise(cells[-1], "\n", "")
        out.append(_values(pc.binary_join_element_wise(*cells, ",")))
    return b"".join(out)


def _values(strings: pa.StringArray) -> memoryview:
    """The concatenated values of a string array, straight from its data buffer (no copy)."""
    _, offsets, data = strings.buffers()
    if data is None:
        return memoryview(b"")
    at = memoryview(offsets).cast("i")
    return memoryview(data)[at[strings.offset]:at[strings.offset + len(strings)]]


def _where(strings: pa.Array, pattern: str, change: Callable) -> pa.Array:
    """`strings` with `change` applied to the values matching `pattern` (usually none)."""
    mask = pc.match_substring_regex(strings, pattern)
    if not pc.any(mask).as_py():
        return strings
    return pc.replace_with_mask(strings, mask, change(strings.filter(mask)))


def _text(strings: pa.Array) -> pa.Array:
    """Formulas neutralised, then quoted where CSV needs it (as PostgreSQL's COPY does)."""
    strings = _where(strings, FORMULA_PATTERN,
                     lambda s: pc.binary_join_element_wise("'", s, ""))
    return _where(strings, NEEDS_QUOTES_PATTERN,
                  lambda s: pc.binary_join_element_wise(
                      '"', pc.replace_substring(s, '"', '""'), '"', ""))


def _int(numbers: pa.Array) -> pa.Array:
    return pc.cast(numbers, pa.string()).fill_null("")


def _decimal(numbers: pa.Array) -> pa.Array:
    """Two decimals, rounded from the stored double like printf('%.2f'). A page of NULLs
    arrives as int64 (ADBC's default), hence the cast to float64 first."""
    cents = pc.cast(pc.cast(numbers, pa.float64()), pa.decimal128(38, 2), safe=False)
    return pc.cast(cents, pa.string()).fill_null("")


def _datetime(strings: pa.Array) -> pa.Array:
    """SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff': keep the seconds."""
    return pc.utf8_slice_codeunits(strings, 0, 19)


FORMAT: dict[str, Callable[[pa.Array], pa.Array]] = {
    "int": _int,
    "decimal": _decimal,
    "datetime": _datetime,
    "text": _text,
}


def main() -> None:
    spec = json.load(sys.stdin)
    pa.set_memory_pool(pa.system_memory_pool())  # freed pages go back: flat, smaller RSS
    frame = struct.Struct(spec["frame"])
    out = sys.stdout.buffer
    for rows, last, data in pages(spec):
        out.write(frame.pack(rows, last, len(data)))
        out.write(data)
    out.flush()


if __name__ == "__main__":
    main()
