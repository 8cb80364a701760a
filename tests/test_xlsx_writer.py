"""Our streaming xlsx writer (jobs/xlsx.py): every cell kind alone; its fast paths against the
rule that decides every cell (jobs.formats.XLSX_CELLS) on many values; the dirty data read back
by openpyxl and by LibreOffice with each cell's value and type the database's; the header bold,
frozen and filtered; a well-formed, deterministic zip."""

from __future__ import annotations

import csv
import io
import os
import random
import re
import shutil
import subprocess
import zipfile
from datetime import datetime, timedelta
from xml.etree import ElementTree

import openpyxl
import pyarrow as pa
import test_dirty_data as dirty
from conftest import require
from test_dirty_data import EXPECTED, HEADER, exported

from jobs import formats
from jobs.xlsx import Column, SheetWriter, escape_text, slow_cell

SOFFICE = shutil.which("soffice") or shutil.which("libreoffice")
dirty_db, dirty_app = dirty.dirty_db, dirty.app  # test_dirty_data's fixtures, by these names


def sheet_of(columns: list[tuple[str, str, int | None]], page: str, pages: int = 1):
    """The worksheet our writer makes of CSV `page` (written `pages` times), read by openpyxl."""
    out = io.BytesIO()
    writer = SheetWriter(out, "s", [(name, kind, scale, 10) for name, kind, scale in columns])
    cut = sum(writer.write_page(page.encode()) for _ in range(pages))
    writer.close()
    book = openpyxl.load_workbook(io.BytesIO(out.getvalue()))
    return book.worksheets[0], cut, out.getvalue()


def cells(sheet) -> list[list[tuple]]:
    """Each data row's (value, openpyxl data type, number format) per column; None if empty."""
    return [[None if c.value is None else (c.value, c.data_type, c.number_format) for c in row]
            for row in sheet.iter_rows(min_row=2)]


def unescape(value):
    """A text as Excel and LibreOffice read it: each _xHHHH_ escape its character."""
    if not isinstance(value, str):
        return value
    return re.sub(r"_x([0-9A-F]{4})_", lambda m: chr(int(m.group(1), 16)), value)


def test_int_cells():
    sheet, _, _ = sheet_of([("v", "int", None)], "42\n-7\n\n-9223372036854775808\n"
                           "100000000000000000000\n123456789012345\n1234567890123456\n")
    assert [row[0] for row in cells(sheet)] == [
        (42, "n", "General"), (-7, "n", "General"), None,
        ("-9223372036854775808", "s", "General"), (1e20, "n", "General"),
        (123456789012345, "n", "General"), ("1234567890123456", "s", "General")]


def test_decimal_cells_with_and_without_a_scale():
    page = ("12.35,12.35\n-0.01,0.30000000000000004\nNaN,Infinity\n1" + "0" * 300 + ".00,1e+300\n"
            "123456789012345678901234567890.00,1.5e-07\n7.00,-0\n,\n")
    sheet, _, _ = sheet_of([("a", "decimal", 2), ("b", "decimal", None)], page)
    assert cells(sheet) == [
        [(12.35, "n", "0.00"), (12.35, "n", "General")],
        [(-0.01, "n", "0.00"), ("0.30000000000000004", "s", "General")],
        [("NaN", "s", "0.00"), ("Infinity", "s", "General")],
        [(1e300, "n", "0.00"), (1e300, "n", "General")],
        [("123456789012345678901234567890.00", "s", "0.00"), (1.5e-07, "n", "General")],
        [(7, "n", "0.00"), (0, "n", "General")],
        [None, None]]
    scale0, _, _ = sheet_of([("a", "decimal", 0), ("b", "decimal", 12)], "3,2.675000000000\n")
    assert cells(scale0) == [[(3, "n", "0"), (2.675, "n", "0.000000000000")]]


def test_date_and_datetime_cells_from_march_1900():
    page = ("2026-01-31,2026-01-31 10:00:05\n1900-03-01,1900-03-01 00:00:00\n"
            "1900-02-28,1900-02-28 23:59:59\n0001-01-01,0001-01-01 00:00:00\n"
            "9999-12-31,9999-12-31 23:59:59\n0044-03-15 BC,infinity\n,\n")
    sheet, _, _ = sheet_of([("d", "date", None), ("ts", "datetime", None)], page)
    day, moment = "yyyy-mm-dd", "yyyy-mm-dd hh:mm:ss"
    assert cells(sheet) == [
        [(datetime(2026, 1, 31), "d", day), (datetime(2026, 1, 31, 10, 0, 5), "d", moment)],
        [(datetime(1900, 3, 1), "d", day), (datetime(1900, 3, 1), "d", moment)],
        [("1900-02-28", "s", day), ("1900-02-28 23:59:59", "s", moment)],
        [("0001-01-01", "s", day), ("0001-01-01 00:00:00", "s", moment)],
        [(datetime(9999, 12, 31), "d", day), (datetime(9999, 12, 31, 23, 59, 59), "d", moment)],
        [("0044-03-15 BC", "s", day), ("infinity", "s", moment)],
        [None, None]]


def test_bool_cells():
    sheet, _, _ = sheet_of([("b", "bool", None)], "true\nfalse\n\n")
    assert [row[0] for row in cells(sheet)] == [(True, "b", "General"), (False, "b", "General"),
                                               None]


def test_text_cells_escaped_cut_and_counted():
    long, wide = "y" * 40_000, "\U0001f600" * 20_000  # wide: 20,000 characters, 40,000 units
    page = ('plain\n"a,""b"""\n"line\r\nbreak"\n\'=1+2\n<&>\n" lead "\n_x0041_\n'
            f'"bell\x07"\n{long}\n{wide}\n"tab\tend\t"\n""\n')
    sheet, cut, data = sheet_of([("t", "text", None)], page)
    got = [row[0] and (unescape(row[0][0]), row[0][1]) for row in cells(sheet)]
    short = long[:formats.XLSX_MAX_TEXT - len(formats.XLSX_CUT_MARK)] + formats.XLSX_CUT_MARK
    assert got == [("plain", "s"), ('a,"b"', "s"), ("line\r\nbreak", "s"), ("'=1+2", "s"),
                   ("<&>", "s"), (" lead ", "s"), ("_x0041_", "s"), ("bell\x07", "s"),
                   (short, "s"), ("\U0001f600" * (formats.XLSX_MAX_TEXT // 2), "s"),
                   ("tab\tend\t", "s"), None]
    assert cut == 1, "only a text over 32,767 characters is cut with the mark and counted"
    xml = zipfile.ZipFile(io.BytesIO(data)).read("xl/worksheets/sheet1.xml").decode()
    assert "line_x000D_\nbreak" in xml and "_x005F_x0041_" in xml and "bell_x0007_" in xml
    assert '<t xml:space="preserve"> lead </t>' in xml and "&lt;&amp;&gt;" in xml


def test_escape_text_is_what_xlsxwriter_wrote():
    assert escape_text(" a\r\nb_x0041_\x01<&>\ufffe") == (
        '<t xml:space="preserve"> a_x000D_\nb_x005F_x0041__x0001_&lt;&amp;&gt;_xFFFE_</t>')
    assert escape_text("x") == "<t>x</t>" and escape_text("\u3000x") == (
        '<t xml:space="preserve">\u3000x</t>')


def test_an_empty_cell_is_no_cell_and_a_row_is_as_wide_as_the_header():
    kinds = [("a", "int", None), ("b", "text", None), ("c", "int", None)]
    sheet, _, data = sheet_of(kinds, "1,,3\n,x,\n,,\n4,y,5\n")
    xml = zipfile.ZipFile(io.BytesIO(data)).read("xl/worksheets/sheet1.xml").decode()
    rows = re.findall(r"<row>(.*?)</row>", xml)[1:]
    assert rows[0] == '<c><v>1</v></c><c r="C2"><v>3</v></c>', "after a gap: its reference"
    assert rows[1] == '<c r="B3" t="inlineStr"><is><t>x</t></is></c><c r="C3"/>'
    assert rows[2] == '<c r="C4"/>', "an empty row still ends at the last column"
    assert "r=" not in rows[3]
    assert [[c.value for c in row] for row in sheet.iter_rows(min_row=2)] == [
        [1, None, 3], [None, "x", None], [None, None, None], [4, "y", 5]]
    read_only = openpyxl.load_workbook(io.BytesIO(data), read_only=True).worksheets[0]
    assert [len(row) for row in read_only.iter_rows(values_only=True)] == [3] * 5


def _decoded(xml: str):
    """A cell's XML as (type, value): numbers as floats, texts unescaped."""
    cell = ElementTree.fromstring(xml)
    kind = cell.get("t", "n")
    if kind == "inlineStr":
        return "s", unescape("".join(cell.find("is").itertext()))
    return kind, float(cell.findtext("v"))


def test_the_fast_paths_decide_as_the_rule_on_many_values():
    """Arrow's fast paths and `slow_cell` (XLSX_CELLS, one value at a time) give the same cell
    for random values of every kind, shapes the fast paths take and shapes they leave."""
    rnd = random.Random(19)
    numbers = [str(rnd.randint(-10 ** d, 10 ** d)) for d in range(1, 22) for _ in range(20)]
    numbers += [f"{rnd.uniform(-1e6, 1e6):.{rnd.randint(0, 14)}f}" for _ in range(500)]
    numbers += [repr(float(f"{rnd.uniform(-1, 1)}e{rnd.randint(-330, 330)}"))
                for _ in range(500)]
    numbers += ["0", "-0", "0.00", "-0.005", "1" + "0" * 25, "0." + "0" * 25 + "1", "NaN",
                "Infinity", "-Infinity", "1e+15", "100000000000000", "9007199254740993"]
    start = datetime(1, 1, 1)
    moments = [start + timedelta(seconds=rnd.randint(0, 315_537_897_599)) for _ in range(2000)]
    moments += [datetime(1900, 2, 28, 23, 59, 59), datetime(1900, 3, 1), datetime(1970, 1, 1)]
    texts = ["".join(rnd.choice("ab <&>\"'_x0D\r\n\t\x01\x1f\u3000\ufffe\U0001f600")
                     for _ in range(rnd.randint(1, 12))) for _ in range(2000)]
    texts += ["_x0041_", " ", "\t", "\n"]
    cases = {"int": [n for n in numbers if re.fullmatch(r"-?\d+", n)], "decimal": numbers,
             "date": [str(m.date()) for m in moments], "datetime": [str(m) for m in moments],
             "bool": ["true", "false"], "text": texts}
    for kind, values in cases.items():
        made, _ = Column(kind, ' s="9"').cells(pa.array(values, pa.string()))
        for value, fast in zip(values, made.to_pylist(), strict=True):
            slow, _ = slow_cell(value, kind, ' s="9"')
            assert _decoded(fast) == _decoded("<c" + slow), (kind, value, fast, slow)
            assert fast.startswith('<c s="9"'), "every cell of a column has its style"


def want_cell(kind: str, text: str):
    """What the database's CSV text of a `kind` column becomes (docs/data-quality.md)."""
    if not text:
        return None
    if kind == "text" and len(text) > formats.XLSX_MAX_TEXT:
        return text[:formats.XLSX_MAX_TEXT - len(formats.XLSX_CUT_MARK)] + formats.XLSX_CUT_MARK
    return formats.XLSX_CELLS[kind](text)


def dirty_kinds(app) -> list[str]:
    return [c.kind for c in app.extensions["exportdesk.datasets"]["dirty"].columns]


def want_rows() -> list[list[str]]:
    return [[str(key), *(EXPECTED[key].get(c, "") for c in HEADER[1:])] for key in EXPECTED]


def test_openpyxl_reads_every_dirty_value_and_type_as_the_database_holds_it(dirty_app):
    job, data = exported(dirty_app, "xlsx")
    sheet = openpyxl.load_workbook(io.BytesIO(data)).worksheets[0]
    kinds = dirty_kinds(dirty_app)
    types = {bool: "b", float: "n", datetime: "d", str: "s"}
    rows = list(sheet.iter_rows(min_row=2))
    assert len(rows) == len(EXPECTED) == job.rows_done
    for texts, row in zip(want_rows(), rows, strict=True):
        for name, kind, text, cell in zip(HEADER, kinds, texts, row, strict=True):
            want = want_cell(kind, text)
            assert unescape(cell.value) == want, (texts[0], name)
            if want is not None:
                assert cell.data_type == types[type(want)], (texts[0], name, cell.data_type)
    assert job.xlsx_truncated == 1


def test_the_header_is_bold_frozen_and_filters_every_row(dirty_app):
    job, data = exported(dirty_app, "xlsx")
    book = openpyxl.load_workbook(io.BytesIO(data))
    sheet = book.worksheets[0]
    header = next(sheet.iter_rows(max_row=1))
    assert [c.value for c in header] == HEADER and all(c.font.b for c in header)
    assert not any(c.font.b for c in next(sheet.iter_rows(min_row=2, max_row=2)))
    assert sheet.freeze_panes == "A2" and sheet.title == "dirty"
    last = openpyxl.utils.get_column_letter(len(HEADER))
    assert sheet.auto_filter.ref == f"A1:{last}{job.rows_done + 1}"
    workbook = zipfile.ZipFile(io.BytesIO(data)).read("xl/workbook.xml").decode()
    assert (f'<definedName name="_xlnm._FilterDatabase" localSheetId="0" hidden="1">'
            f"'dirty'!$A$1:${last}${job.rows_done + 1}</definedName>") in workbook
    for i, (name, kind) in enumerate(zip(HEADER, dirty_kinds(dirty_app), strict=True), start=1):
        width = sheet.column_dimensions[openpyxl.utils.get_column_letter(i)].width
        assert width >= formats.xlsx_width(name, kind)


def test_the_file_is_a_well_formed_zip_and_the_same_bytes_for_the_same_rows():
    columns = [("id", "int", None), ("t", "text", None)]
    page = "".join(f"{i},text {i} & more\n" for i in range(5000))
    _, _, first = sheet_of(columns, page, pages=3)
    _, _, second = sheet_of(columns, page, pages=3)
    assert first == second
    archive = zipfile.ZipFile(io.BytesIO(first))
    assert archive.testzip() is None
    for name in archive.namelist():
        ElementTree.fromstring(archive.read(name))  # well-formed XML
    assert "xl/worksheets/sheet1.xml" in archive.namelist()


def lo_fields(text: str) -> list[list[tuple[str, bool]]]:
    """LibreOffice's CSV, each field with whether it was quoted (a text cell: every text cell
    is quoted, numbers, dates and booleans are not)."""
    rows, row = [], []
    for match in re.finditer(r'("(?:[^"]|"")*"|[^,\n]*)(,|\n|$)', text):
        field, end = match.groups()
        quoted = field.startswith('"')
        row.append((field[1:-1].replace('""', '"') if quoted else field, quoted))
        if end != ",":
            rows.append(row)
            row = []
        if not end:
            break
    return [r for r in rows if r != [("", False)]]


def test_libreoffice_reads_every_dirty_value_and_type(dirty_app, tmp_path):
    """LibreOffice opens the xlsx and saves it as CSV (every text cell quoted, the rest as
    their values; dates and times in the columns' formats, which are the csv's own)."""
    if not SOFFICE:
        require("soffice", "LibreOffice is not installed "
                "(apt-get install libreoffice-calc-nogui)")
    _, data = exported(dirty_app, "xlsx")
    (tmp_path / "dirty.xlsx").write_bytes(data)
    options = "44,34,76,1,,0,true,true,false,false,false"  # UTF-8, quote text, values as stored
    subprocess.run([SOFFICE, f"-env:UserInstallation={(tmp_path / 'profile').as_uri()}",
                    "--headless", "--convert-to", f"csv:Text - txt - csv (StarCalc):{options}",
                    "--outdir", str(tmp_path / "out"), str(tmp_path / "dirty.xlsx")],
                   check=True, capture_output=True, timeout=180,
                   env={**os.environ, "HOME": str(tmp_path)})
    rows = lo_fields((tmp_path / "out" / "dirty.csv").read_text(encoding="utf-8"))
    assert [field for field, _ in rows[0]] == HEADER
    assert len(rows) == len(EXPECTED) + 1
    kinds = dirty_kinds(dirty_app)
    for texts, row in zip(want_rows(), rows[1:], strict=True):
        for name, kind, text, (field, quoted) in zip(HEADER, kinds, texts, row, strict=True):
            want, where = want_cell(kind, text), (texts[0], name, field)
            if want is None:
                assert field == "" and not quoted, where
            elif isinstance(want, str):  # LibreOffice writes a line break in a cell as LF
                assert quoted and field == re.sub("\r\n?", "\n", want), where
            elif isinstance(want, bool):
                assert not quoted and field == str(want).upper(), where
            elif isinstance(want, datetime):
                shown = str(want.date()) if kind == "date" else str(want)
                assert not quoted and field == shown, where
            else:
                assert not quoted and float(field) == want, where


def test_a_header_and_text_as_csv_reads_them(tmp_path):
    """A header row of odd names and one text per row survive a round trip through csv."""
    columns = [("a & <b>", "text", None), ("'=c", "int", None)]
    sheet, _, _ = sheet_of(columns, '"x\r\ny",1\n')
    assert [c.value for c in next(sheet.iter_rows(max_row=1))] == ["a & <b>", "'=c"]
    out = io.StringIO()
    csv.writer(out).writerow([unescape(c.value) for c in next(sheet.iter_rows(min_row=2))])
    assert out.getvalue() == '"x\r\ny",1\r\n'


def test_a_failed_write_in_the_deflate_thread_fails_the_export():
    """The sheet is deflated in a thread of its own: its error (a full disk) is raised in the
    export's thread, at the next write or at the end, never lost."""

    class Full(io.BytesIO):
        def write(self, data) -> int:
            if self.tell() > 100:
                raise OSError(28, "No space left on device")
            return super().write(data)

    writer = SheetWriter(Full(), "s", [("t", "text", None, 10)])
    try:
        for _ in range(3):
            writer.write_page(b"some text\n" * 1000)
        writer.close()
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("the full disk went unnoticed")
    writer.stop()  # and nothing is left running
