"""The fast paths of csv and csv.gz (issue 19): csv.gz deflated by zlib-ng in the threads that
read the pages, a gzip member a page, resumable byte for byte; the SQLite reader's cheap
checks before its text kernels give the bytes of the CSV contract (jobs.csvrows)."""

from __future__ import annotations

import csv
import gzip
import io
import threading
import time
import zlib

import pyarrow as pa
import pytest

from jobs import formats, pages, sqlite_reader
from jobs.checkpoints import Checkpoint
from jobs.csvrows import neutralise
from jobs.dataset_file import load as load_datasets
from jobs.models import db
from jobs.storage import LocalStorage, Part, Prefix
from webapp.auth import find_user

DATASETS = load_datasets()


def _stream(app, out: Part, start: Checkpoint, on_checkpoint, fmt: str,
            rows: int = 300) -> Checkpoint:
    with app.app_context(), db.engine.connect() as conn:
        org = find_user("alice@acme.test").org_id
        return formats.stream(conn, DATASETS["transactions"], org, {}, out, start,
                              on_checkpoint, rows, 0.0, fmt)


def test_every_checkpoint_of_a_csv_gz_is_whole_gzip_members_of_the_csv_so_far(app, tmp_path):
    """A resume keeps the first `bytes` of a checkpoint and appends: those bytes must be
    whole members that decompress to exactly the csv of the rows counted."""
    with Part.create(tmp_path / "plain") as out:
        _stream(app, out, Checkpoint(), lambda cp: None, "csv")
    plain = (tmp_path / "plain").read_bytes()
    seen: list[Checkpoint] = []
    with Part.create(tmp_path / "packed") as out:
        final = _stream(app, out, Checkpoint(), seen.append, "csv.gz")
    packed = (tmp_path / "packed").read_bytes()
    assert len(seen) > 3 and final.complete and final.bytes == len(packed)
    assert gzip.decompress(packed) == plain
    for cp in seen:
        so_far = gzip.decompress(packed[:cp.bytes])
        assert plain.startswith(so_far) and so_far.endswith(b"\n")
        assert len(list(csv.reader(io.StringIO(so_far.decode(), newline="")))) == cp.rows + 1
        assert packed[cp.bytes:cp.bytes + 2] in (b"", b"\x1f\x8b"), "a member starts there"


def test_csv_gz_is_a_member_a_page_deflated_by_zlib_ng_at_its_level(app, tmp_path):
    """The bytes are zlib-ng's (5x zlib's speed), not zlib's: the dependency is used; the
    header is a member of its own, then each page one, whatever the checkpoints."""
    from zlib_ng import zlib_ng

    with app.app_context(), db.engine.connect() as conn:  # as _stream reads them
        pages_of_csv = [batch.data for batch in pages.pages(
            conn, DATASETS["transactions"], find_user("alice@acme.test").org_id, {}, None, 300)]
    with Part.create(tmp_path / "packed") as out:
        _stream(app, out, Checkpoint(), lambda cp: None, "csv.gz")
    packed = (tmp_path / "packed").read_bytes()
    csv_bytes = gzip.decompress(packed)
    header_end = csv_bytes.index(b"\n") + 1
    assert len(pages_of_csv) > 3 and csv_bytes[header_end:] == b"".join(pages_of_csv)
    assert packed == b"".join(zlib_ng.compress(data, formats.GZIP_LEVEL, wbits=31)
                              for data in [csv_bytes[:header_end], *pages_of_csv])


class FullDisk(Part):
    """A part whose writes fail after `room` bytes, as on a full disk, having written a
    piece of the failing write (a member cut in the middle)."""

    def __init__(self, part: Part, room: int):
        super().__init__(part._fh, part.name, part._hasher, part.size)
        self.room = room

    def write(self, data: bytes) -> int:
        if self.size + len(data) > self.room:
            super().write(bytes(data[:max(0, self.room - self.size)]))
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_a_write_failing_in_the_deflate_fails_the_export_and_it_resumes_byte_for_byte(
        app, tmp_path):
    """A full disk under the deflate fails the export; the part then ends inside a member, and
    a resume from the last checkpoint gives the same file as an uninterrupted export."""
    with Part.create(tmp_path / "whole") as out:
        _stream(app, out, Checkpoint(), lambda cp: None, "csv.gz")
    whole = (tmp_path / "whole").read_bytes()
    files = LocalStorage(tmp_path)
    first, _ = files.open_part(1, 1, "csv.gz")
    seen: list[Checkpoint] = []
    with first, pytest.raises(OSError, match="No space left"):
        _stream(app, FullDisk(first, len(whole) // 2), Checkpoint(), seen.append, "csv.gz")
    cut = (tmp_path / first.name).read_bytes()
    last = seen[-1]
    assert last.bytes < len(cut) == len(whole) // 2, "the failed write left half a member"
    with pytest.raises((EOFError, zlib.error)):
        gzip.decompress(cut)
    second, problem = files.open_part(1, 2, "csv.gz", Prefix(first.name, last.bytes,
                                                             last.sha256))
    with second:
        assert problem is None
        final = _stream(app, second, last, lambda cp: None, "csv.gz")
    resumed = (tmp_path / second.name).read_bytes()
    assert resumed == whole and final.complete


def _reference(value: bytes | None) -> bytes:
    """The CSV field jobs.csvrows describes, in Python: neutralised, then quoted if needed."""
    if value is None:
        return b""
    text = neutralise(value.decode(errors="surrogateescape"))
    if any(c in text for c in ',"\r\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text.encode(errors="surrogateescape")


PAGES = {
    "plain": [b"EUR", b"USD", b"settled", b""],
    "prefixes, each": [b"=1+2", b"+1", b"-12", b"@SUM", b"\tx", b"\rx", b"a=b", b"x-y", b"a@b"],
    "prefixes inside only": [b"a=b", b"x-y", b"a@b.c", b"1+1"],
    "quotes": [b'said "hi"', b"a,b", b"line\nbreak", b"cr\rhere", b"plain"],
    "both": [b'=HYPERLINK("x")', b"-1,5", b'@"', b"ok"],
    "not UTF-8": [b"\xff=a", b"=\xff", b"\xc3,", b"\xe2\x82\xac"],
    "nulls": [None, b"=x", None, b'"', None],
}


@pytest.mark.parametrize("name", PAGES)
def test_the_readers_text_fields_are_the_csv_contract(name):
    """The reader skips its kernels on pages without the bytes they look for: every kind of
    page gives the fields the contract says, prefixes and quotes alone or together."""
    values = PAGES[name]
    strings = pa.array(values, pa.binary()).view(pa.string())
    fields = sqlite_reader._text(strings).view(pa.binary()).to_pylist()
    assert [field or b"" for field in fields] == [_reference(value) for value in values]


def test_the_readers_prefixes_are_the_contracts():
    from jobs.csvrows import FORMULA_PREFIXES

    assert sqlite_reader.FORMULA_CHARS == "".join(FORMULA_PREFIXES).encode()


def test_closing_sqlite_pages_early_stops_the_reader_at_once(app, monkeypatch):
    """Pages are received in a thread; a cancel (closing the pages) must not wait for the
    page under way: the reader is killed first, and nothing reads its pipe afterwards."""
    from jobs import sqlite_pages

    monkeypatch.setattr(sqlite_pages, "_fastcsv", None)  # the Arrow reader's process
    started = []
    popen = sqlite_pages.subprocess.Popen

    def remember(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(sqlite_pages.subprocess, "Popen", remember)
    with app.app_context(), db.engine.connect() as conn:
        if conn.dialect.name != "sqlite":
            pytest.skip("the reader process is SQLite's")
        org = find_user("alice@acme.test").org_id
        reader = pages.pages(conn, DATASETS["transactions"], org, {}, None, 5)
        assert next(reader).rows == 5
        began = time.monotonic()
        reader.close()
        assert time.monotonic() - began < 1
    assert started and started[0].poll() is not None and started[0].stdout.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("read-ahead")]
