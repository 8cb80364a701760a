"""Reads an SQLite export's pages as CSV in a process of its own (run by `jobs.sqlite_pages`).

ADBC reads each keyset page into Arrow columns and Arrow's C++ kernels format and join them,
while a second thread already reads the next page. ADBC links its own copy of SQLite, and two
copies of SQLite in one process undo each other's POSIX locks (sqlite.org/howtocorrupt.html,
2.2.1), so this never runs inside a worker that also writes the database: it only imports
Arrow, ADBC and the standard library, and opens the database read-only.

Protocol: a JSON spec on stdin; on stdout, per page, a header packed with the spec's `frame`
(rows, last key, bytes) followed by that many bytes of CSV rows. Exit status 0 after the last
page; the spec's `bad_value_status` when a stored value is not what its column's kind says
(docs/data-quality.md); otherwise the error is on stderr.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_UP, Context, Decimal

import adbc_driver_manager as adbc
import adbc_driver_sqlite
import pyarrow as pa
import pyarrow.compute as pc

from jobs.readahead import read_ahead

FORMULA_CHARS = b"=+-@\t\r"  # jobs.csvrows.FORMULA_PREFIXES
FORMULA_PREFIXES = pa.array([bytes([c]) for c in FORMULA_CHARS], pa.binary())
NEEDS_QUOTES = b'",\r\n'  # a field holding one of these is quoted
NEEDS_QUOTES_PATTERN = r'[",\r\n]'
# Arrow scalars made once: a kernel given a Python constant converts it at every call, looking
# for optional modules each time, which costs as much as the kernel on a page.
EMPTY, COMMA, LF, APOSTROPHE, QUOTE, ZERO_TEXT, TRUE, FALSE = (
    pa.scalar(text) for text in ("", ",", "\n", "'", '"', "0", "true", "false"))
ZERO, ONE, ZERO_FLOAT = pa.scalar(0), pa.scalar(1), pa.scalar(0.0)
PLAIN_FROM, PLAIN_TO = pa.scalar(1e-4), pa.scalar(1e15)  # PostgreSQL writes these floats plain
HALF, UNITS_TO, ERROR = pa.scalar(0.5), pa.scalar(1e14), pa.scalar(1e-14)  # rounding (_float)


def pages(spec: dict) -> Iterator[tuple[int, int, bytes]]:
    """(rows, last key, CSV bytes) per page. The spec holds the SQL of each read (`sql`: as
    stored, exact; each the first page's and a page's after the key bound to `?`), `columns`
    (kind, scale, name), `checked` (a last column describes each row's first badly stored
    value), the `key`'s name and `size`."""
    database = adbc_driver_sqlite.connect(spec["database"])  # a read-only URI
    connection = adbc.AdbcConnection(database)  # autocommit: no snapshot held between pages

    def read(sql: list[str], after: int | None) -> pa.Table:
        with adbc.AdbcStatement(connection) as statement:
            statement.set_options(**{"adbc.sqlite.query.batch_rows": str(spec["size"])})
            if after is None:
                statement.set_sql_query(sql[0])
            else:
                statement.set_sql_query(sql[1])
                statement.bind(pa.record_batch([pa.array([after], pa.int64())], ["after"]))
            stream, _ = statement.execute_query()
            return pa.RecordBatchReader._import_from_c(stream.address).read_all()

    def fetch(after: int | None) -> tuple[pa.Table, int] | None:
        page = read(spec["sql"]["as_stored"], after)
        if page.num_rows and not _stored_exactly(page, spec["columns"]):
            page = read(spec["sql"]["exact"], after)
        return (page, last_key(page)) if page.num_rows else None

    try:
        for page in read_ahead(fetch, spec["after"]):
            yield page.num_rows, last_key(page), to_csv(page, spec)
    finally:
        connection.close()
        database.close()


def _stored_exactly(page: pa.Table, columns: list[dict]) -> bool:
    """Whether each decimal of a page read as stored came exact: integers, or floats under
    2^53 (ADBC makes floats of the integers among floats); not text (it made the floats text)."""
    at = 1  # after the key
    for column in columns:
        if column["kind"] == "decimal":
            values = page.column(at)
            if pa.types.is_floating(values.type):
                if (pc.max(pc.abs(values)).as_py() or 0) >= 2 ** 53:
                    return False
            elif not pa.types.is_integer(values.type):
                return False
        at += 2 if column["kind"] == "decimal" else 1
    return True


def last_key(page: pa.Table) -> int:
    return page.column(0)[-1].as_py()


class BadValue(ValueError):
    """A value its column's kind cannot be, at `index` of its batch (jobs.csvrows.BadValue)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def to_csv(page: pa.Table, spec: dict) -> bytes:
    """A page (the key, each column's parts, maybe the bad-value column) as CSV rows ending in
    LF; BadValue names the row's key and the column of a value that cannot be exported."""
    out, done = [], 0
    for batch in page.to_batches():
        try:
            cells = _cells(batch, spec)
        except BadValue as exc:
            key = page.column(0)[done + exc.index].as_py()
            raise BadValue(done + exc.index, f"The row with {spec['key']} {key}: {exc}") from None
        cells[-1] = pc.binary_join_element_wise(cells[-1], LF, EMPTY)
        out.append(_values(pc.binary_join_element_wise(*cells, COMMA)))
        done += batch.num_rows
    return b"".join(out)


def _cells(batch: pa.RecordBatch, spec: dict) -> list[pa.Array]:
    """Each exported column of a batch as CSV fields; BadValue names the column."""
    if spec["checked"]:
        _fail_on(_binary(batch.column(batch.num_columns - 1)))
    arrays, cells = iter(batch.columns[1:]), []
    for column in spec["columns"]:
        try:
            if column["kind"] == "decimal":
                cells.append(_decimal(next(arrays), next(arrays), column["scale"]))
            else:
                cells.append(FORMAT[column["kind"]](next(arrays)))
        except BadValue as exc:
            raise BadValue(exc.index, f"{column['name']} {exc}") from None
    return cells


def _fail_on(problems: pa.Array) -> None:
    """Fail at the first row the SQL found a badly stored value in (its description)."""
    if problems.null_count < len(problems):
        index = pc.index(pc.is_valid(problems), True).as_py()
        raise BadValue(index, problems[index].as_py().decode(errors="replace"))


def _values(strings: pa.StringArray) -> memoryview:
    """The concatenated values of a string array, straight from its data buffer (no copy)."""
    _, offsets, data = strings.buffers()
    if data is None:
        return memoryview(b"")
    at = memoryview(offsets).cast("i")
    return memoryview(data)[at[strings.offset]:at[strings.offset + len(strings)]]


def _binary(values: pa.Array) -> pa.Array:
    """Strings as bytes, so Python reads a value that is not UTF-8 without failing."""
    return pc.cast(values, pa.binary()) if pa.types.is_string(values.type) else values


def _holds(strings: pa.Array, chars: bytes) -> bool:
    """Whether any value holds one of `chars`: a memchr each over the page's text, much
    cheaper than a kernel's look at each value, which then runs only where this says so."""
    data = _values(strings).tobytes()
    return any(data.find(char) >= 0 for char in chars)


def _where(strings: pa.Array, mask: pa.Array, change: Callable) -> pa.Array:
    """`strings` with `change` applied to the values `mask` selects (usually none)."""
    if not pc.any(mask).as_py():
        return strings
    return pc.replace_with_mask(strings, mask, change(strings.filter(mask)))


def _python(fast: pa.Array, slow: pa.Array, values: pa.Array, kind: str,
            convert: Callable[[object], str]) -> pa.Array:
    """`fast` (Arrow's text), but where `slow` is true `convert` each of `values` in Python:
    the few values the kernels do not cover. One that does not convert is a BadValue."""
    slow = slow.fill_null(False)
    if not pc.any(slow).as_py():
        return fast
    texts = []
    for index, value in zip(pc.indices_nonzero(slow).to_pylist(),
                            _binary(values).filter(slow).to_pylist(), strict=True):
        try:
            texts.append(convert(value.decode() if isinstance(value, bytes) else value))
        except (ValueError, ArithmeticError):
            shown = value.decode(errors="replace") if isinstance(value, bytes) else value
            raise BadValue(index, f"holds {str(shown)[:60]!r}, not a value of kind {kind}") \
                from None
    return pc.replace_with_mask(fast, slow, pa.array(texts, pa.string()))


def _text(strings: pa.Array) -> pa.Array:
    """Formulas neutralised, then quoted where CSV needs it (as PostgreSQL's COPY does). Each
    value's first character is looked up only in a page holding one of the prefixes, and
    values are matched for quoting only in a page holding a character that needs it: these
    kernels were most of a page's formatting, and most text columns need neither."""
    if _holds(strings, FORMULA_CHARS):
        # Bytes, not characters: a value that is not UTF-8 (SQLite keeps what it is given)
        # must not fail the page, and every prefix is one byte.
        first = pc.binary_slice(strings.view(pa.binary()), 0, 1)
        first = pc.is_in(first, value_set=FORMULA_PREFIXES)
        strings = _where(strings, first,
                         lambda s: pc.binary_join_element_wise(APOSTROPHE, s, EMPTY))
    if not _holds(strings, NEEDS_QUOTES):
        return strings
    return _where(strings, pc.match_substring_regex(strings, NEEDS_QUOTES_PATTERN),
                  lambda s: pc.binary_join_element_wise(
                      QUOTE, pc.replace_substring(s, '"', '""'), QUOTE, EMPTY))


def _int(numbers: pa.Array) -> pa.Array:
    return pc.cast(numbers, pa.string()).fill_null(EMPTY)


def _bool(numbers: pa.Array) -> pa.Array:
    """SQLite's 1 and 0 (SQLAlchemy's Boolean) as true and false; any other number is bad."""
    numbers = pc.cast(numbers, pa.int64())
    text = pc.if_else(pc.equal(numbers, ONE), TRUE, FALSE)
    other = pc.and_(pc.not_equal(numbers, ZERO), pc.not_equal(numbers, ONE))
    return _python(text, other, numbers, "bool", _refuse).fill_null(EMPTY)


def _refuse(_value: object) -> str:
    """For values that are all bad: each one sent to Python fails."""
    raise ValueError


def _decimal(stored: pa.Array, exact: pa.Array, scale: int | None) -> pa.Array:
    """A decimal as PostgreSQL prints a numeric (`decimal_text`), from its two parts
    (`jobs.sqlite_pages`): floats (exact as ADBC read them), or integers only, read as stored;
    and the page's integers and text as text, read exact (the floats then in the first)."""
    exact = pc.cast(exact, pa.string())
    if pa.types.is_integer(stored.type):  # integers (or no value at all): as text
        return _exact(pc.coalesce(exact, pc.cast(stored, pa.string())), scale).fill_null(EMPTY)
    text = _float(stored, scale)
    if exact.null_count == len(exact):  # the usual page
        return text.fill_null(EMPTY)
    return pc.coalesce(_exact(exact, scale), text, EMPTY)


def _float(floats: pa.Array, scale: int | None) -> pa.Array:
    """Without a scale, Arrow's shortest text where it is PostgreSQL's too, else `float_text`.
    With one, PostgreSQL rounds the float's first 15 digits half away from zero, and Arrow
    rounds the float to the nearest: the same, but near a tie or past 15 digits (the error of
    either, a few units in 10^15, could cross it), where Python rounds as PostgreSQL does."""
    numbers = pc.cast(floats, pa.float64())  # a page of NULLs arrives as int64
    if scale is None:
        size = pc.abs(numbers)
        text = pc.cast(numbers, pa.string())
        plain = pc.or_(pc.equal(size, ZERO_FLOAT), pc.and_(pc.greater_equal(size, PLAIN_FROM),
                                                            pc.less(size, PLAIN_TO)))
        fast = pc.and_(plain, pc.invert(pc.match_substring(text, "e")))
        return _python(text, pc.invert(fast), numbers, "decimal", float_text)
    units = pc.abs(pc.multiply(numbers, _power(scale)))  # in its last place: NaN, inf are slow
    from_tie = pc.abs(pc.subtract(pc.subtract(units, pc.floor(units)), HALF))
    fast = pc.and_(pc.less(units, UNITS_TO), pc.greater(from_tie, pc.multiply(units, ERROR)))
    text = pc.cast(pc.cast(numbers, pa.decimal128(38, scale), safe=False), pa.string())
    return _python(text, _or_exponent(pc.invert(fast), text, scale), numbers, "decimal",
                   lambda number: decimal_text(Decimal(f"{number:.15g}"), scale))


def _exact(texts: pa.Array, scale: int | None) -> pa.Array:
    """Integers and decimal text, exactly: Arrow's decimals where the text is plain digits,
    Python's for the rest (an exponent, NaN, more digits than Arrow holds)."""
    texts = pc.cast(texts, pa.string())
    if texts.null_count == len(texts):
        return texts
    if scale is None:  # as stored, if it is already PostgreSQL's text
        return _python(texts, pc.invert(pc.match_substring_regex(texts, CANONICAL_DECIMAL)),
                       texts, "decimal", lambda text: decimal_text(Decimal(text), None))
    plain = pc.match_substring_regex(texts, PLAIN_DECIMAL)
    # Cut to one more place, then round half away from zero: the same as rounding it all.
    cut = pc.cast(pc.if_else(plain, texts, ZERO_TEXT), pa.decimal256(76, scale + 1), safe=False)
    rounded = pc.cast(pc.round(cut, scale, "half_towards_infinity"), pa.decimal256(76, scale))
    text = pc.cast(rounded, pa.string())
    return _python(text, _or_exponent(pc.invert(plain), text, scale), texts, "decimal",
                   lambda text: decimal_text(Decimal(text), scale))


@functools.cache
def _power(scale: int) -> pa.Scalar:
    return pa.scalar(10.0 ** scale)


def _or_exponent(slow: pa.Array, text: pa.Array, scale: int) -> pa.Array:
    """`slow`, and where Arrow wrote a decimal with an exponent (under 1e-6: past 6 places)."""
    return pc.or_(slow, pc.match_substring(text, "E")) if scale > 6 else slow


def decimal_text(value: Decimal, scale: int | None) -> str:
    """A numeric as PostgreSQL prints it: rounded half away from zero to `scale` places, all
    its digits, no exponent, no negative zero; NaN, Infinity and -Infinity by name."""
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "-Infinity" if value < 0 else "Infinity"
    if scale is not None:
        value = value.quantize(Decimal(1).scaleb(-scale), ROUND_HALF_UP, NUMERIC)
    text = format(value, "f")
    return text.lstrip("-") if value.is_zero() else text


def float_text(number: float) -> str:
    """A float as PostgreSQL prints it: the shortest text that reads back as the same float,
    plain from 1e-4 up to 1e15, else with an exponent (1e+300, 1.5e-07); NaN, ±Infinity."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    shortest = Decimal(repr(number)).normalize()  # repr: Python's shortest round trip
    if number == 0 or -4 <= shortest.adjusted() < 15:
        return format(shortest, "f")
    sign, digits, _ = shortest.as_tuple()
    mantissa = "".join(map(str, digits))
    mantissa = mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
    return f"{'-' * sign}{mantissa}e{shortest.adjusted():+03d}"


def _moments(values: pa.Array, kind: str) -> pa.Array:
    """Dates (date) or dates and times (datetime) stored as ISO 8601 text, as PostgreSQL
    prints them: Arrow reads a page of them (checking the calendar; a T; a datetime cut to the
    second), Python a page Arrow cannot read whole (an offset: converted to UTC) or fails."""
    if pa.types.is_binary(values.type):  # a blob among them: not Arrow's text
        return _every_value(values, kind)
    texts = pc.cast(values, pa.string())
    try:
        moments = pc.cast(texts, pa.date32() if kind == "date" else pa.timestamp("us"))
    except pa.ArrowInvalid:
        return _every_value(texts, kind)
    if kind == "datetime":
        moments = pc.cast(pc.floor_temporal(moments, unit="second"), pa.timestamp("s"))
    year_0 = pc.less(moments, YEAR_1[kind])  # Arrow's, which is no year of Python's
    return _python(pc.cast(moments, pa.string()), year_0, texts, kind,
                   lambda text: _iso(text, kind)).fill_null(EMPTY)


def _every_value(values: pa.Array, kind: str) -> pa.Array:
    return _python(pa.nulls(len(values), pa.string()), pc.is_valid(values), values, kind,
                   lambda text: _iso(text, kind)).fill_null(EMPTY)


def _iso(text: str, kind: str) -> str:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.date().isoformat() if kind == "date" else moment.isoformat(" ", "seconds")


NUMERIC = Context(prec=150_000, Emax=MAX_EMAX, Emin=MIN_EMIN)  # PostgreSQL's numeric and more
CANONICAL_DECIMAL = r"^(0|-?[1-9][0-9]*)(\.[0-9]+)?$"
PLAIN_DECIMAL = r"^-?[0-9]{1,60}(\.[0-9]{1,15})?$"  # fits decimal256(76, scale + 1)
YEAR_1 = {"date": pa.scalar(date(1, 1, 1), pa.date32()),
          "datetime": pa.scalar(datetime(1, 1, 1), pa.timestamp("s"))}

FORMAT: dict[str, Callable[[pa.Array], pa.Array]] = {
    "int": _int,
    "text": _text,
    "date": lambda values: _moments(values, "date"),
    "datetime": lambda values: _moments(values, "datetime"),
    "bool": _bool,
}  # decimal: _decimal, from two parts


def main() -> None:
    spec = json.load(sys.stdin)
    pa.set_memory_pool(pa.system_memory_pool())  # freed pages go back: flat, smaller RSS
    frame = struct.Struct(spec["frame"])
    out = sys.stdout.buffer
    try:
        for rows, last, data in pages(spec):
            out.write(frame.pack(rows, last, len(data)))
            out.write(data)
    except BadValue as exc:
        out.flush()
        sys.stderr.write(f"{exc}\n")
        sys.exit(spec["bad_value_status"])
    out.flush()


if __name__ == "__main__":
    main()
