"""Export formats: the list offered, their MIME types, and their writers (csv, csv.gz, xlsx)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

from sqlalchemy import Connection

from jobs import pages
from jobs.checkpoints import Checkpoint, fault, record_checkpoint
from jobs.csvrows import header, neutralise
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
RESUMABLE = {"csv", "csv.gz"}  # xlsx is one zip written at the end: it restarts from zero


def _format_text(v) -> str:
    return neutralise(str(v))


# Typed cells for xlsx: numbers stay numbers (negative amounts included), dates stay dates.
XLSX_CELLS: dict[str, Callable] = {
    "int": int,
    "decimal": float,
    "datetime": lambda v: v,
    "text": _format_text,
}


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
    """Write the dataset in `fmt` to `out` from `start`; call on_checkpoint a few times a second.

    `out` must already hold exactly the `start.bytes` good bytes of `start`. A checkpoint is
    reported only after the bytes it counts are fsynced, so a resume from it is byte-identical;
    the last one is `complete`. csv.gz closes a gzip member at every checkpoint (concatenated
    members are one valid gzip stream), so it resumes like csv. xlsx always starts from zero.
    """
    if fmt == "xlsx":
        return _stream_xlsx(conn, dataset, org_key, params, out, on_checkpoint, batch_rows,
                            interval)
    if fmt not in RESUMABLE:
        raise InvalidParams({"format": f"unknown format {fmt!r}"})
    position = Checkpoint(start.last_key, start.rows)
    gzip_member: list = []  # the open member's compressor, if any

    def emit(data: bytes) -> None:
        if fmt == "csv.gz":
            if not gzip_member:
                gzip_member.append(zlib.compressobj(6, zlib.DEFLATED, 31))  # 31: gzip framing
            data = gzip_member[0].compress(data)
        out.write(data)

    def checkpoint(complete: bool = False) -> None:
        if gzip_member:
            out.write(gzip_member.pop().flush())
        record_checkpoint(out, position, on_checkpoint, complete)

    if out.size == 0:
        emit(("\ufeff".encode() if bom else b"") + header(dataset))
    last_checkpoint = time.monotonic()
    reader = pages.pages(conn, dataset, org_key, params, position.last_key, batch_rows)
    try:
        for batch in reader:
            emit(batch.data)
            position.rows += batch.rows
            position.last_key = batch.last_key
            if time.monotonic() - last_checkpoint >= interval:
                checkpoint()
                last_checkpoint = time.monotonic()
    finally:
        reader.close()  # also on cancel: stop reading ahead
    checkpoint(complete=True)
    return position


def _stream_xlsx(conn: Connection, dataset: Dataset, org_key: str | None, params: dict[str, str],
                 out: Part, on_checkpoint: Callable[[Checkpoint], None], batch_rows: int,
                 interval: float) -> Checkpoint:
    """One sheet with typed cells, in XlsxWriter's constant_memory mode (rows go to a temp
    file as they come; the zip is written at the end, streamed through `out`, which hashes it).
    Checkpoints report progress only, but the last, which records the finished file."""
    import xlsxwriter  # only where an xlsx is written: the web app imports this module too

    book = xlsxwriter.Workbook(out, {
        "constant_memory": True, "strings_to_formulas": False, "strings_to_numbers": False,
        "strings_to_urls": False, "default_date_format": "yyyy-mm-dd hh:mm:ss",
    })
    sheet = book.add_worksheet(dataset.name[:31])
    money = book.add_format({"num_format": "0.00"})
    for i, column in enumerate(dataset.columns):
        if column.kind == "decimal":
            sheet.set_column(i, i, 12, money)
        elif column.kind == "datetime":
            sheet.set_column(i, i, 19)
    sheet.write_row(0, 0, dataset.headers)
    cells = [XLSX_CELLS[c.kind] for c in dataset.columns]
    key_index = dataset.column_names.index(dataset.key)
    position = Checkpoint()
    last_checkpoint = time.monotonic()
    while True:
        rows = conn.execute(dataset.batch(org_key, params, position.last_key, batch_rows)).all()
        if not rows:
            break
        if position.rows + len(rows) > XLSX_MAX_ROWS:
            book.close()
            raise TooManyRows(f"An xlsx sheet holds at most {XLSX_MAX_ROWS:,} rows; "
                              "choose csv or csv.gz, or narrow the filters.")
        for n, row in enumerate(rows, start=position.rows + 1):
            sheet.write_row(n, 0, [cell(v) if v is not None else None
                                   for cell, v in zip(cells, row, strict=True)])
        position.rows += len(rows)
        position.last_key = rows[-1][key_index]
        if time.monotonic() - last_checkpoint >= interval:
            on_checkpoint(Checkpoint(position.last_key, position.rows))
            fault("checkpointed")
            last_checkpoint = time.monotonic()
    book.close()
    record_checkpoint(out, position, on_checkpoint, complete=True)
    return position

