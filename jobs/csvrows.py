"""The CSV rows every database's reader produces, and the rule against formula injection.

Every reader writes PostgreSQL's COPY CSV format: a field is quoted only when it holds a comma,
a double quote, CR or LF (quotes doubled inside); NULL and empty text are both an empty field;
LF ends a row. Text a spreadsheet would run as a formula gets a leading apostrophe (also in xlsx
cells, `jobs.formats`). Each batch is one keyset page (`Dataset.batch`), so an export can
checkpoint after any batch and resume after its last key. What each kind of value becomes is
docs/data-quality.md.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from jobs.datasets import Dataset

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # also in jobs.sqlite_reader, as a regex
ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # an undecodable byte, as surrogateescape keeps it


@dataclass(frozen=True)
class Batch:
    data: bytes | bytearray  # whole CSV rows, each ending in LF
    rows: int
    last_key: int
    replaced: int = 0  # values whose invalid UTF-8 bytes became U+FFFD
    utf8: bool = False  # known to be valid UTF-8 (jobs._fastcsv checks every value it writes)


Finish = Callable[[Batch], Batch]  # done to a page in the thread that read it (jobs.pages)


class BadValue(ValueError):
    """A stored value its column's kind cannot be (text in an int column, a date that is no
    date): the same rows would fail again, so the export fails at once and says where."""


def neutralise(text: str) -> str:
    """Stop spreadsheets from running a text cell as a formula (OWASP CSV injection)."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def valid_utf8(batch: Batch) -> Batch:
    """The batch as valid UTF-8: each invalid byte sequence becomes U+FFFD and every value that
    held one is counted. SQLite stores whatever bytes it is given (PostgreSQL sends UTF-8 only,
    jobs.source); a file that is not UTF-8 breaks the programs that read it. The check is one
    decode; only a page that fails it is parsed, to count its values."""
    if batch.utf8:
        return batch
    try:
        batch.data.decode()
        return batch
    except UnicodeDecodeError:
        pass
    raw = io.StringIO(batch.data.decode(errors="surrogateescape"), newline="")
    replaced = sum(1 for row in csv.reader(raw) for value in row if ESCAPED_BYTE.search(value))
    # Invalid sequences are bytes >= 0x80: commas, quotes and newlines stay where they were.
    data = batch.data.decode(errors="replace").encode()
    return replace(batch, data=data, replaced=batch.replaced + replaced)


def header(dataset: Dataset) -> bytes:
    return (",".join(map(_header_cell, dataset.headers)) + "\n").encode()


def _header_cell(label: str) -> str:
    """A header as a CSV field: neutralised and quoted like any text cell."""
    label = neutralise(label)
    if any(c in label for c in ',"\r\n'):
        return '"' + label.replace('"', '""') + '"'
    return label
