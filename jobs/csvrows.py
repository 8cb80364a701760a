"""The CSV rows every database's reader produces, and the rule against formula injection.

Every reader writes PostgreSQL's COPY CSV format: a field is quoted only when it holds a comma,
a double quote, CR or LF (quotes doubled inside); NULL and empty text are both an empty field;
LF ends a row. Text a spreadsheet would run as a formula gets a leading apostrophe (also in xlsx
cells, `jobs.formats`). Each batch is one keyset page (`Dataset.batch`), so an export can
checkpoint after any batch and resume after its last key.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.datasets import Dataset

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # also in jobs.sqlite_reader, as a regex


@dataclass(frozen=True)
class Batch:
    data: bytes | bytearray  # whole CSV rows, each ending in LF
    rows: int
    last_key: int


def neutralise(text: str) -> str:
    """Stop spreadsheets from running a text cell as a formula (OWASP CSV injection)."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def header(dataset: Dataset) -> bytes:
    return (",".join(map(_header_cell, dataset.headers)) + "\n").encode()


def _header_cell(label: str) -> str:
    """A header as a CSV field: neutralised and quoted like any text cell."""
    label = neutralise(label)
    if any(c in label for c in ',"\r\n'):
        return '"' + label.replace('"', '""') + '"'
    return label
