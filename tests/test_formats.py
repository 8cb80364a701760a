"""Export formats: csv.gz is the csv gzipped, xlsx holds the same values with numbers as numbers,
the BOM setting, formula neutralising in SQL and in Python, MIME types, storage errors."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import tempfile
import zlib
from datetime import datetime
from pathlib import Path

import openpyxl
import pytest
from conftest import run_inline
from sqlalchemy import insert

from jobs import formats
from jobs.checkpoints import Checkpoint
from jobs.dataset_file import load as load_datasets
from jobs.models import ExportJob, Organisation, Transaction, User, db
from jobs.storage import LocalStorage, Part, Prefix
from webapp.auth import find_user

DATASETS = load_datasets()  # the shipped demo file


def parse(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def unescape(value):
    """openpyxl leaves the OOXML escape of a carriage return as is; Excel shows a CR."""
    return value.replace("_x000D_", "\r") if isinstance(value, str) else value


def run_job(app, email: str, fmt: str, dataset: str = "transactions") -> ExportJob:
    return run_inline(app, email, dataset, fmt=fmt)


def inline(app, email: str, fmt: str, dataset: str = "transactions", **kw) -> bytes:
    with tempfile.TemporaryDirectory() as tmp, app.app_context(), db.engine.connect() as conn:
        org = find_user(email).org_id
        path = Path(tmp) / "out"
        with Part.create(path) as out:
            formats.stream(conn, DATASETS[dataset], org, {}, out, Checkpoint(),
                           lambda cp: None, 300, 0.0, fmt, **kw)
        return path.read_bytes()


def test_csv_gz_decompresses_to_the_csv_export(app, instance):
    csv_job, gz_job = run_job(app, "bob@globex.test", "csv"), run_job(app, "bob@globex.test",
                                                                        "csv.gz")
    assert gz_job.state == "succeeded", gz_job.error
    assert gz_job.file_name.endswith(".csv.gz")
    data = (instance / "exports" / gz_job.file_name).read_bytes()
    assert gz_job.bytes == len(data) and gz_job.rows_done == csv_job.rows_done
    assert gzip.decompress(data) == (instance / "exports" / csv_job.file_name).read_bytes()
    # one gzip member per checkpoint (CHECKPOINT_INTERVAL is 0 in the tests): many members
    assert data.count(b"\x1f\x8b\x08") > 2


@pytest.mark.parametrize("fmt", ["csv", "csv.gz"])
def test_stream_resumes_from_a_checkpoint_byte_for_byte(app, tmp_path, fmt):
    """Crash after the fourth checkpoint, resume from the third (the last one recorded): the
    part file is cut back to it and the export continues to the same bytes."""
    dataset = DATASETS["transactions"]
    seen: list[Checkpoint] = []

    class Crash(Exception):
        pass

    def crash_on_fourth(cp):
        seen.append(cp)
        if len(seen) == 4:
            raise Crash

    files = LocalStorage(tmp_path)
    with app.app_context(), db.engine.connect() as conn:
        org = find_user("alice@acme.test").org_id
        with Part.create(tmp_path / "whole") as whole:
            formats.stream(conn, dataset, org, {}, whole, Checkpoint(), lambda c: None,
                           300, 0.0, fmt)
        first, _ = files.open_part(1, 1, fmt)
        with first, pytest.raises(Crash):
            formats.stream(conn, dataset, org, {}, first, Checkpoint(), crash_on_fourth,
                           300, 0.0, fmt)
        assert seen[2].part == first.name
        assert (tmp_path / first.name).stat().st_size > seen[2].bytes
        second, problem = files.open_part(1, 2, fmt, Prefix(first.name, seen[2].bytes,
                                                             seen[2].sha256))
        with second:
            assert problem is None
            final = formats.stream(conn, dataset, org, {}, second, seen[2], lambda c: None, 300,
                                   0.0, fmt)
    resumed = (tmp_path / second.name).read_bytes()
    assert resumed == (tmp_path / "whole").read_bytes()
    assert final.sha256 == hashlib.sha256(resumed).hexdigest() and final.complete
    assert (tmp_path / first.name).read_bytes()[:seen[2].bytes] == resumed[:seen[2].bytes], \
        "the first claim's part was only read"
    if fmt == "csv.gz":
        assert zlib.decompressobj(31).decompress(resumed[: seen[2].bytes])  # a whole member


def test_bom_setting_writes_one_bom_at_the_start_only(app):
    plain = inline(app, "alice@acme.test", "csv")
    with_bom = inline(app, "alice@acme.test", "csv", bom=True)
    assert with_bom == b"\xef\xbb\xbf" + plain
    assert gzip.decompress(inline(app, "alice@acme.test", "csv.gz", bom=True)) == with_bom
    app.config["CSV_BOM"] = True
    try:
        job = run_job(app, "alice@acme.test", "csv", dataset="orders")
    finally:
        app.config["CSV_BOM"] = False
    data = (app.config["EXPORT_DIR"] + "/" + job.file_name)
    assert open(data, "rb").read().startswith(b"\xef\xbb\xbfid,created_at,")


def test_xlsx_holds_the_same_values_with_numbers_as_numbers(app, instance):
    job = run_job(app, "alice@acme.test", "xlsx")
    assert job.state == "succeeded", job.error
    rows = parse(inline(app, "alice@acme.test", "csv"))
    book = openpyxl.load_workbook(instance / "exports" / job.file_name, read_only=True)
    sheet = book.worksheets[0]
    cells = list(sheet.iter_rows(values_only=True))
    assert list(cells[0]) == rows[0]
    assert len(cells) == len(rows) == job.rows_done + 1
    negative = 0
    for got, want in zip(cells[1:], rows[1:], strict=True):
        ident, created, amount, *text = got
        assert isinstance(ident, int) and str(ident) == want[0]
        assert isinstance(created, datetime) and str(created) == want[1]
        assert isinstance(amount, int | float) and f"{amount:.2f}" == want[2]
        negative += amount < 0
        assert [unescape(t) or "" for t in text] == want[3:]
    assert negative > 0, "negative amounts stay numbers"


def test_xlsx_refuses_more_rows_than_a_sheet_holds(app, monkeypatch):
    monkeypatch.setattr(formats, "XLSX_MAX_ROWS", 100)
    job = run_job(app, "alice@acme.test", "xlsx")
    assert job.state == "failed" and "at most 100 rows" in job.error


@pytest.fixture
def injected(app):
    """An organisation whose descriptions try every formula trick, and some that are safe."""
    texts = ["=1+2", "+SUM(A1)", "-2+3", "@cmd", "\tTAB", "\rCR", "-12.50", "a=b", "", "ok"]
    with app.app_context():
        org = Organisation(name="Injected", slug=f"inj{id(texts)}")
        user = User(email=f"{org.slug}@inj.test", organisation=org, role="user")
        user.set_password("exportdesk")
        db.session.add_all([org, user])
        db.session.flush()
        db.session.execute(insert(Transaction), [
            {"org_id": org.id, "created_at": datetime(2026, 5, 1, 12, 0, i), "amount": -i - 0.5,
             "currency": "EUR", "status": "=cmd" if i == 0 else "settled",
             "customer_email": "x@example.test", "description": t}
            for i, t in enumerate(texts)])
        db.session.commit()
        yield user.email, texts


def test_formula_injection_is_neutralised_in_csv_and_xlsx(app, instance, injected):
    email, texts = injected
    want = ["'" + t if t[:1] in ("=", "+", "-", "@", "\t", "\r") else t for t in texts]
    rows = parse(inline(app, email, "csv"))[1:]
    assert [r[6] for r in rows] == want
    assert rows[0][4] == "'=cmd"
    assert [r[2] for r in rows] == [f"{-i - 0.5:.2f}" for i in range(len(texts))]
    job = run_job(app, email, "xlsx")
    sheet = openpyxl.load_workbook(instance / "exports" / job.file_name).worksheets[0]
    got = [[c.value for c in row] for row in sheet.iter_rows(min_row=2)]
    assert [unescape(r[6]) or "" for r in got] == want
    assert all(sheet.cell(row=r, column=7).data_type == "s" for r in range(2, 12) if want[r - 2])
    assert [r[2] for r in got] == [-i - 0.5 for i in range(len(texts))]
    assert all(sheet.cell(row=r, column=3).data_type == "n" for r in range(2, 12))


@pytest.mark.parametrize("fmt, mime", [
    ("csv", "text/csv; charset=utf-8"), ("csv.gz", "application/gzip"),
    ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")])
def test_download_has_the_formats_type_and_name(app, alice, fmt, mime):
    job = run_job(app, "alice@acme.test", fmt, dataset="orders")
    response = alice.get(f"/exports/{job.id}/download")
    assert response.status_code == 200 and response.mimetype == mime.split(";")[0]
    assert response.headers["Content-Type"] == mime
    assert f'.{fmt}' in response.headers["Content-Disposition"]
    assert response.headers["Content-Disposition"].rstrip('"').endswith(f".{fmt}")
    response.close()


def test_api_and_form_accept_every_format(alice):
    page = alice.get("/").get_data(as_text=True)
    for fmt in ("csv", "csv.gz", "xlsx"):
        assert f'value="{fmt}"' in page
    bad = alice.post("/api/exports", json={"dataset": "orders", "format": "pdf"})
    assert bad.status_code in (400, 422)
