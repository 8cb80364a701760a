"""Export formats: the list offered, their MIME types, and their writers (csv, csv.gz, xlsx)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Connection
from zlib_ng import zlib_ng

from jobs import pages
from jobs.checkpoints import Checkpoint, fault, record_checkpoint
from jobs.csvrows import Batch, header
from jobs.datasets import Dataset, InvalidParams
from jobs.storage import Part

FORMATS = {  # what the form, the API and `flask export` offer
    "csv": "CSV (UTF-8)",
    "csv.gz": "CSV, gzip-compressed",
    "xlsx": "Excel (.xlsx)",
}
MIME_TYPES = {
    "csv": "text/csv",  # Flask adds "; charset=utf-8" to text types
    "csv.gz": "application/gzip",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
XLSX_MAX_ROWS = 1_048_575  # Excel's sheet limit, less the header row
XLSX_MAX_TEXT = 32_767  # characters an xlsx cell holds
XLSX_CUT_MARK = "…[cut]"  # ends a text cut to fit a cell
RESUMABLE = {"csv", "csv.gz"}  # xlsx is one zip written at the end: it restarts from zero


def _xlsx_number(text: str) -> float | str:
    """A number where a double keeps every digit (15 significant) and Excel holds its size;
    else the text (a 30-digit numeric, NaN, Infinity)."""
    value = Decimal(text)
    if not value.is_finite() or len(value.normalize().as_tuple().digits) > 15:
        return text
    number = float(value)
    return number if number == 0 or 2.2251e-308 <= abs(number) < 1e308 else text


EXCEL_FIRST_DAY = datetime(1900, 3, 1)  # before it, Excel counts a 29 February 1900


def _xlsx_moment(text: str) -> datetime | str:
    """A date cell from 1 March 1900 to 9999 (earlier, Excel's calendar is a day off and other
    programs read it differently), else the text (year 1, a BC date, infinity, year 10000)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    return moment if moment >= EXCEL_FIRST_DAY else text


# Typed cells for xlsx from each kind's CSV text (never empty: that is an empty cell).
XLSX_CELLS: dict[str, Callable[[str], object]] = {
    "int": _xlsx_number,
    "decimal": _xlsx_number,
    "date": _xlsx_moment,
    "datetime": _xlsx_moment,
    "bool": lambda text: text == "true",
    "text": str,  # already neutralised
}


# Column widths (characters) wide enough for a typical value of each kind; a longer header
# widens its column. Set before any row: the sheet is written as it streams.
XLSX_WIDTHS = {"int": 10, "decimal": 14, "date": 11, "datetime": 20, "bool": 7, "text": 24}
XLSX_MAX_WIDTH = 60
XLSX_FILTER_BUTTON = 3  # the auto-filter's drop-down covers the end of the header


def xlsx_width(header_text: str, kind: str) -> int:
    """A column's width: its kind's usual value, or the header and its filter button."""
    return min(XLSX_MAX_WIDTH, max(XLSX_WIDTHS.get(kind, 12),
                                   len(header_text) + XLSX_FILTER_BUTTON))


class TooManyRows(ValueError):
    """The export does not fit the chosen format (xlsx holds about a million rows)."""


def stream(
    conn: Connection,
    dataset: Dataset,
    org_key: str | None,
    params: dict[str, str],
    out: Part,
    start: Checkpoint,
    on_checkpoint: Callable[[Checkpoint], None],
    batch_rows: int = 5000,
    interval: float = 0.5,
    fmt: str = "csv",
    bom: bool = False,
) -> Checkpoint:
    """Write the dataset in `fmt` to `out` from `start`; checkpoint when `out` says (a file: a
    few times a second; a bucket's upload: at its part boundaries).

    `out` must already hold exactly the `start.bytes` good bytes of `start`. A checkpoint is
    reported only after the bytes it counts are fsynced, so a resume from it is byte-identical;
    the last one is `complete`. csv.gz is a gzip member a page (the header one of its own), so
    it resumes like csv. xlsx always starts from zero.
    """
    if fmt == "xlsx":
        return _stream_xlsx(conn, dataset, org_key, params, out, on_checkpoint, batch_rows,
                            interval)
    if fmt not in RESUMABLE:
        raise InvalidParams({"format": f"must be one of {', '.join(FORMATS)}."})
    position = Checkpoint(start.last_key, start.rows, replaced=start.replaced)
    finish = _gzip_page if fmt == "csv.gz" else None

    def checkpoint(complete: bool = False) -> None:
        record_checkpoint(out, position, on_checkpoint, complete)

    if out.size == 0:
        head = ("\ufeff".encode() if bom else b"") + header(dataset)
        out.write(gzip_member(head) if finish else head)
    last_checkpoint = time.monotonic()
    reader = pages.pages(conn, dataset, org_key, params, position.last_key, batch_rows, finish)
    try:
        for batch in reader:
            out.write(batch.data)
            position.rows += batch.rows
            position.replaced += batch.replaced
            position.last_key = batch.last_key
            if out.checkpoint_due(time.monotonic() - last_checkpoint, interval):
                checkpoint()
                last_checkpoint = time.monotonic()
    finally:
        reader.close()  # also on cancel: stop reading ahead
    checkpoint(complete=True)
    return position


# zlib-ng's level 3: 1.06x the size of `psql \copy | gzip -6` (issue 19 allows 1.1x), at 5x its
# speed in one thread; ISA-L's level 3, faster still, is 1.105x (bench/export.py, docs/engine.md).
GZIP_LEVEL = 3


def gzip_member(data: bytes | bytearray) -> bytes:
    """`data` as a gzip member of its own (concatenated members are one gzip stream, RFC 1952).
    csv.gz is a member a page, deflated in the thread that read the page, beside the next one
    (jobs.pages), and the same bytes whenever the page is written again (a resume, a bucket's
    part)."""
    return zlib_ng.compress(data, GZIP_LEVEL, wbits=31)


def _gzip_page(batch: Batch) -> Batch:
    return replace(batch, data=gzip_member(batch.data))


def _stream_xlsx(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
                 out: Part, on_checkpoint: Callable[[Checkpoint], None], batch_rows: int,
                 interval: float) -> Checkpoint:
    """One sheet with typed cells made from the CSV pages (so every format holds the same
    values), by our own streaming writer (`jobs.xlsx`: Arrow builds each page's cells, ISA-L
    deflates them into the zip written through `out`, which hashes it). Checkpoints report
    progress only, but the last, which records the finished file."""
    from jobs.xlsx import SheetWriter  # only where an xlsx is written: Arrow, ISA-L

    sheet = SheetWriter(out, dataset.name[:31], [
        (dataset.headers[i], column.kind, column.scale, xlsx_width(dataset.headers[i], column.kind))
        for i, column in enumerate(dataset.columns)])
    position = Checkpoint()
    last_checkpoint = time.monotonic()
    reader = pages.pages(conn, dataset, org_key, params, None, batch_rows)
    try:
        for batch in reader:
            if position.rows + batch.rows > XLSX_MAX_ROWS:
                raise TooManyRows(f"An xlsx sheet holds at most {XLSX_MAX_ROWS:,} rows; "
                                  "choose csv or csv.gz, or narrow the filters.")
            position.truncated += sheet.write_page(batch.data)
            position.rows += batch.rows
            position.replaced += batch.replaced
            position.last_key = batch.last_key
            if time.monotonic() - last_checkpoint >= interval:
                on_checkpoint(replace(position))
                fault("checkpointed")
                last_checkpoint = time.monotonic()
    finally:
        reader.close()
        sheet.stop()  # its page in flight written (also on cancel or failure)
    sheet.close()  # the filter over the header and every row: known only now
    record_checkpoint(out, position, on_checkpoint, complete=True)
    return position
