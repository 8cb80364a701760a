"""A minimal streaming xlsx writer: one sheet, made from the CSV pages every reader writes.

XlsxWriter builds every cell as a Python object and writes it through a temp file: about 115,000
cells a second. Here Arrow parses each page (`batch.data`, PostgreSQL's COPY CSV) into columns
and its kernels build each column's cell XML at once; only values outside the usual shapes (a
NaN, a 1e+300, a control character, a text too long for a cell) go one by one through the rule
that decides every cell, `jobs.formats.XLSX_CELLS`, so the fast paths never decide a value
differently. The sheet XML goes through a fast deflate (ISA-L) into a zip entry whose sizes
follow its data (a data descriptor), so nothing seeks back and memory stays flat: a page at a
time. The other parts of the package are small constant strings; the workbook, which names the
filter's range, is written after the sheet, once the number of rows is known.

A cell's `r` (its reference) is optional: it is written only on a cell after an empty one in
its row, where a reader could not otherwise tell its column. The sheet has no `<dimension>`
(its row count is known only at the end): a row whose last column is empty ends in a blank
cell (`<c r="G7"/>`, no value), so readers that size rows by their last cell (openpyxl's
read-only mode) see every row as wide as the header. The file is the same bytes for
the same rows (no time stamps), so a finished export's SHA-256 depends only on its data.
"""

from __future__ import annotations

import re
import struct
from datetime import datetime
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from isal import isal_zlib

from jobs.behind import OneBehind
from jobs.formats import EXCEL_FIRST_DAY as FIRST_MOMENT
from jobs.formats import XLSX_CELLS, XLSX_CUT_MARK, XLSX_MAX_TEXT, TooManyRows

# Arrow's default allocator (mimalloc) keeps what the pages freed: the system's gives it back,
# a million rows then peak at 150 MB in the worker instead of 195 MB, at the same speed. Only
# the processes that write an xlsx import this module (it is Arrow's only user in a worker).
pa.set_memory_pool(pa.system_memory_pool())
# ISA-L's level 2 deflates a million rows' sheet (296 MB of XML) in 0.23 s to 31 MB; zlib's
# level 1 takes 2.0 s (34 MB), its level 6 3.0 s (25 MB); zlib-ng's level 1 0.37 s (40 MB),
# level 2 0.55 s (31 MB).
DEFLATE_LEVEL = 2
XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
RELS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG = "http://schemas.openxmlformats.org/package/2006"
OOXML = "application/vnd.openxmlformats-officedocument"
CONTENT_TYPES = (
    f'{XML}<Types xmlns="{PKG}/content-types">'
    f'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
    f'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
    f'<Override PartName="/docProps/app.xml" ContentType="{OOXML}.extended-properties+xml"/>'
    f'<Override PartName="/docProps/core.xml" ContentType="application/'
    f'vnd.openxmlformats-package.core-properties+xml"/>'
    f'<Override PartName="/xl/styles.xml" ContentType="{OOXML}.spreadsheetml.styles+xml"/>'
    f'<Override PartName="/xl/workbook.xml" ContentType="{OOXML}.spreadsheetml.sheet.main+xml"/>'
    f'<Override PartName="/xl/worksheets/sheet1.xml" '
    f'ContentType="{OOXML}.spreadsheetml.worksheet+xml"/></Types>')
ROOT_RELS = (
    f'{XML}<Relationships xmlns="{PKG}/relationships">'
    f'<Relationship Id="rId1" Type="{RELS}/officeDocument" Target="xl/workbook.xml"/>'
    f'<Relationship Id="rId2" Type="{PKG}/relationships/metadata/core-properties" '
    f'Target="docProps/core.xml"/>'
    f'<Relationship Id="rId3" Type="{RELS}/extended-properties" Target="docProps/app.xml"/>'
    f'</Relationships>')
WORKBOOK_RELS = (
    f'{XML}<Relationships xmlns="{PKG}/relationships">'
    f'<Relationship Id="rId1" Type="{RELS}/worksheet" Target="worksheets/sheet1.xml"/>'
    f'<Relationship Id="rId2" Type="{RELS}/styles" Target="styles.xml"/></Relationships>')
APP = (f'{XML}<Properties xmlns="http://schemas.openxmlformats.org/officeDocument/2006/'
       'extended-properties"><Application>exportdesk</Application></Properties>')
CORE = (f'{XML}<cp:coreProperties xmlns:cp="{PKG}/metadata/core-properties" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>exportdesk</dc:creator>'
        '</cp:coreProperties>')
# Cell styles (`s`): 0 plain, 1 the header's bold, 2 a date, 3 a date and time, 4 on: a decimal
# column's places, one per scale in the sheet.
BOLD, DATE, DATETIME, FIRST_SCALE = 1, 2, 3, 4
WORKSHEET_NS = f'<worksheet xmlns="{MAIN}" xmlns:r="{RELS}">'
FROZEN_HEADER = ('<sheetViews><sheetView tabSelected="1" workbookViewId="0"><pane ySplit="1" '
                 'topLeftCell="A2" activePane="bottomLeft" state="frozen"/>'
                 '<selection pane="bottomLeft"/></sheetView></sheetViews>'
                 '<sheetFormatPr defaultRowHeight="15"/>')
SHEET_END = ('<pageMargins left="0.7" right="0.7" top="0.75" bottom="0.75" header="0.3" '
             'footer="0.3"/></worksheet>')

# The usual shapes of each kind's CSV text, decided by Arrow (RE2 patterns). A plain decimal
# of at most 20 digits each side (SHORT_NUMBER) is well inside a double's range.
FEW_DIGITS = "^-?([0-9]{1,15}|" + "|".join(  # at most 15 digits: a double holds them exactly
    f"[0-9]{{{i}}}\\.[0-9]{{1,{15 - i}}}" for i in range(1, 15)) + ")$"
PLAIN_NUMBER = r"^-?[0-9]+(\.[0-9]+)?$"
SHORT_NUMBER = r"^-?[0-9]{1,20}(\.[0-9]{1,20})?$"
MOMENT_SHAPE = {"date": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
                "datetime": r"^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$"}
MOMENT_FORMAT = {"date": "%Y-%m-%d", "datetime": "%Y-%m-%d %H:%M:%S"}
# Text the slow path escapes: characters XML 1.0 cannot hold, and text that reads as an escape.
SLOW_TEXT = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x{fffe}\x{ffff}]|_x[0-9a-fA-F]{4}_"  # CR: a kernel
# Whitespace at either end (Python's str.isspace, less what becomes _xHHHH_): its
# cell keeps it with xml:space="preserve".
SPACE = r"[\t\n \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
EDGE_SPACE = f"^{SPACE}|{SPACE}$"
# A text that needs more than `<t>` and itself, looked for in one pass.
SPECIAL_TEXT = f"[\\x00-\\x1f&<>\\x{{fffe}}\\x{{ffff}}]|_x[0-9a-fA-F]{{4}}_|{EDGE_SPACE}"
# Longer texts go one by one: a cell holds 32,767 UTF-16 units, two per character at most.
LONG_TEXT = pa.scalar(XLSX_MAX_TEXT // 2)  # UTF-8 bytes: at least as many as characters
EXCEL_EPOCH_SECONDS = 25_569 * 86_400  # 1899-12-30 (day 0 from March 1900) to 1970-01-01
EXCEL_EPOCH = datetime(1899, 12, 30)
EXCEL_FIRST_DAY = FIRST_MOMENT.date().isoformat()  # as ISO text, which the CSV's moments are

# Arrow scalars made once: a kernel given a Python constant converts it at every call.
EMPTY, NULL_TEXT = pa.scalar(""), pa.scalar(None, pa.string())
T_OPEN, T_PRESERVE = pa.scalar("<t>"), pa.scalar('<t xml:space="preserve">')
ROW_OPEN, ROW_CLOSE, R_OPEN, QUOTE, BLANK_END = (
    pa.scalar(s) for s in ("<row>", "</row>", '<c r="', '"', '"/>'))
DAY, DAY_FLOAT = pa.scalar(86_400), pa.scalar(86_400.0)
EPOCH_SECONDS, FIRST_DAY, TRUE, FIFTEEN = (
    pa.scalar(EXCEL_EPOCH_SECONDS), pa.scalar(EXCEL_FIRST_DAY), pa.scalar("true"), pa.scalar(15))
RE_CONTROL = re.compile("[\x00-\x08\x0b-\x1f]")
RE_ESCAPE = re.compile("(_x[0-9a-fA-F]{4}_)")
RE_EDGE_SPACE = re.compile(r"^\s|\s$")
# XML's escapes, "&" first (an entity's own "&" is not escaped again): `escape_xml` and the
# Arrow kernels of the fast path (Column._texts) apply the same ones.
XML_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))


def column_letter(index: int) -> str:
    """A, B, …, Z, AA, … for the 0-based column `index`."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def escape_xml(text: str) -> str:
    """`text` as XML character data; also inside an attribute's double quotes once `"` is
    escaped too."""
    for char, entity in XML_ESCAPES:
        text = text.replace(char, entity)
    return text


def escape_text(text: str) -> str:
    """A text cell's `<t>` element, escaped as XlsxWriter did: a character XML 1.0 cannot hold
    as `_xHHHH_` (which Excel and LibreOffice read back), a text that looks like such an escape
    with its underscore escaped (`_x005F_`), whitespace at either end kept."""
    text = RE_ESCAPE.sub(r"_x005F\1", text)
    text = RE_CONTROL.sub(lambda m: f"_x{ord(m.group()):04X}_", text)
    text = text.replace("\ufffe", "_xFFFE_").replace("\uffff", "_xFFFF_")
    tag = '<t xml:space="preserve">' if RE_EDGE_SPACE.search(text) else "<t>"
    return tag + escape_xml(text) + "</t>"


def cut_text(text: str) -> tuple[str, bool]:
    """A text that fits a cell: cut to XLSX_MAX_TEXT characters ending in XLSX_CUT_MARK (and
    counted); then, as XlsxWriter did, to 32,767 UTF-16 units (characters past U+FFFF are two)."""
    cut = len(text) > XLSX_MAX_TEXT
    if cut:
        text = text[:XLSX_MAX_TEXT - len(XLSX_CUT_MARK)] + XLSX_CUT_MARK
    if len(text.encode("utf-16-le")) > 2 * XLSX_MAX_TEXT:
        units = 0
        for end, char in enumerate(text):
            units += 2 if ord(char) > 0xFFFF else 1
            if units > XLSX_MAX_TEXT:
                text = text[:end]
                break
    return text, cut


def text_cell(text: str, style: str = "") -> str:
    """An inline string cell, after `<c` (and its `r`)."""
    return f'{style} t="inlineStr"><is>{escape_text(text)}</is></c>'


def slow_cell(text: str, kind: str, style: str) -> tuple[str, bool]:
    """One value by the rule itself (`XLSX_CELLS`): the cell after `<c`, and whether a text
    was cut."""
    if kind == "text":
        text, cut = cut_text(text)
        return text_cell(text, style), cut
    value = XLSX_CELLS[kind](text)
    if isinstance(value, bool):
        return f'{style} t="b"><v>{int(value)}</v></c>', False
    if isinstance(value, datetime):
        delta = value - EXCEL_EPOCH
        value = delta.days + (delta.seconds + delta.microseconds / 1e6) / 86_400
    if isinstance(value, float | int):  # the shortest text that reads back as this double
        number = repr(float(value)).removesuffix(".0")
        return f"{style}><v>{number}</v></c>", False
    return text_cell(str(value), style), False


def _join(*parts) -> pa.Array:
    """Element-wise concatenation; null where any part is null (an empty cell)."""
    return pc.binary_join_element_wise(*parts, EMPTY)


def _any(mask: pa.Array) -> bool:
    return bool(pc.any(mask).as_py())


class Column:
    """Makes one column's cells, a page at a time: `cells(values)` gives each value's `<c>`
    element (null for an empty value: no cell) and how many texts were cut. The usual shapes
    of each kind are Arrow kernels over the whole column; every other value goes through
    `slow_cell`, the rule itself. Its constants are Arrow scalars made once (making one costs
    as much as a kernel over a page)."""

    def __init__(self, kind: str, style: str):
        if kind not in XLSX_CELLS:
            raise ValueError(f"no xlsx cells for kind {kind!r}")
        self.kind, self.style = kind, style
        self.number = pa.scalar(f"<c{style}><v>"), pa.scalar("</v></c>")
        self.text = pa.scalar(f'<c{style} t="inlineStr"><is>'), pa.scalar("</t></is></c>")
        self.plain_text = pa.scalar(f'<c{style} t="inlineStr"><is><t>')
        self.true, self.false = (pa.scalar(f'<c{style} t="b"><v>{v}</v></c>') for v in (1, 0))

    def cells(self, values: pa.Array) -> tuple[pa.Array, int]:
        if self.kind == "bool":  # "true" or "false" (XLSX_CELLS: anything but "true" is false)
            return pc.if_else(pc.equal(values, TRUE), self.true, self.false), 0
        if self.kind == "text":
            return self._texts(values)
        if self.kind in MOMENT_SHAPE:
            return self._moments(values)
        return self._numbers(values)

    def _as_text(self, values: pa.Array) -> pa.Array:
        """Text cells of values that need no escaping (digits, signs, dashes, colons)."""
        return _join(self.plain_text, values, self.text[1])

    def _slow(self, cells: pa.Array, slow: pa.Array, values: pa.Array) -> tuple[pa.Array, int]:
        """The cells where `slow` is true made by `slow_cell`; how many texts were cut."""
        slow = pc.fill_null(slow, False)
        if not _any(slow):
            return cells, 0
        made = [slow_cell(text, self.kind, self.style)
                for text in pc.filter(values, slow).to_pylist()]
        cells = pc.replace_with_mask(cells, slow, pa.array(["<c" + c for c, _ in made],
                                                           pa.string()))
        return cells, sum(cut for _, cut in made)

    def _texts(self, values: pa.Array) -> tuple[pa.Array, int]:
        cells = _join(self.plain_text, values, self.text[1])
        special = pc.or_(pc.match_substring_regex(values, SPECIAL_TEXT),
                         pc.greater(pc.binary_length(values), LONG_TEXT))
        if not _any(special):
            return cells, 0
        some = pc.filter(values, special)  # escaped with kernels, or one by one (SLOW_TEXT)
        slow = pc.or_(pc.match_substring_regex(some, SLOW_TEXT),
                      pc.greater(pc.binary_length(some), LONG_TEXT))
        escaped = some
        for char, entity in (*XML_ESCAPES, ("\r", "_x000D_")):
            if _any(pc.match_substring(escaped, char)):
                escaped = pc.replace_substring(escaped, char, entity)
        preserve = pc.match_substring_regex(escaped, EDGE_SPACE)
        made = _join(self.text[0], pc.if_else(preserve, T_PRESERVE, T_OPEN), escaped,
                     self.text[1])
        made, cut = self._slow(made, slow, some)
        return pc.replace_with_mask(cells, special, made), cut

    def _numbers(self, values: pa.Array) -> tuple[pa.Array, int]:
        cells = _join(self.number[0], values, self.number[1])
        rest = pc.invert(pc.match_substring_regex(values, FEW_DIGITS))
        if not _any(rest):
            return cells, 0
        values_rest = pc.filter(values, rest)
        digits = pc.utf8_length(pc.utf8_trim(
            pc.replace_substring_regex(values_rest, r"[-.]", ""), "0"))  # significant digits
        plain = pc.match_substring_regex(values_rest, PLAIN_NUMBER)
        exact = pc.less_equal(digits, FIFTEEN)
        number = pc.and_(pc.and_(plain, exact),
                         pc.match_substring_regex(values_rest, SHORT_NUMBER))
        as_text = pc.and_(plain, pc.invert(exact))  # a double would lose digits: the text
        made = pc.if_else(number, pc.filter(cells, rest), self._as_text(values_rest))
        made, cut = self._slow(made, pc.invert(pc.or_(number, as_text)), values_rest)
        return pc.replace_with_mask(cells, rest, made), cut

    def _moments(self, values: pa.Array) -> tuple[pa.Array, int]:
        shaped = pc.match_substring_regex(values, MOMENT_SHAPE[self.kind])
        dated = pc.and_(shaped, pc.greater_equal(values, FIRST_DAY))
        moment = pc.strptime(pc.if_else(dated, values, NULL_TEXT), MOMENT_FORMAT[self.kind],
                             "s", error_is_null=True)
        seconds = pc.add(pc.cast(moment, pa.int64()), EPOCH_SECONDS)  # from 1899-12-30
        days = pc.divide(seconds, DAY)
        if self.kind == "datetime":  # as XlsxWriter: whole days plus the fraction of the day
            fraction = pc.divide(pc.cast(pc.subtract(seconds, pc.multiply(days, DAY)),
                                         pa.float64()), DAY_FLOAT)
            days = pc.add(pc.cast(days, pa.float64()), fraction)
        cells = _join(self.number[0], pc.cast(days, pa.string()), self.number[1])
        early = pc.and_(shaped, pc.invert(dated))  # before March 1900: the text
        if _any(early):
            cells = pc.if_else(early, self._as_text(values), cells)
        made = pc.or_(pc.is_valid(moment), early)
        return self._slow(cells, pc.and_(pc.is_valid(values), pc.invert(made)), values)


class ZipStream:
    """A zip written front to back on a stream that cannot seek: each entry's sizes and CRC
    follow its data (a data descriptor), the central directory comes last. No Zip64: like
    XlsxWriter without `use_zip64`, a file over 4 GiB is refused.

    An entry's data is deflated one page behind the caller (`jobs.behind`), so the next page
    is made meanwhile; every other write waits for it."""

    DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, 00:00: the same bytes for the same rows

    def __init__(self, out: BinaryIO):
        self.out, self.offset, self.entries = out, 0, []
        self.name, self.start, self.crc, self.size, self.packed = b"", 0, 0, 0, 0
        self.deflate = None
        self.behind = OneBehind("xlsx-deflate")

    def _write(self, data) -> None:
        self.out.write(data)
        self.offset += len(data)

    def wait(self) -> None:
        self.behind.wait()

    def begin(self, name: str) -> None:
        self.wait()
        self.name, self.start = name.encode(), self.offset
        self.crc, self.size, self.packed = 0, 0, 0
        self.deflate = isal_zlib.compressobj(DEFLATE_LEVEL, isal_zlib.DEFLATED, -15)
        self._write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0x08, 8, 0, self.DOS_DATE,
                                0, 0, 0, len(self.name), 0) + self.name)

    def write(self, data) -> None:
        """Deflate `data` (kept alive until done) into the open entry, in the background."""
        self.wait()
        if self.size + len(data) >= 1 << 32:
            raise TooManyRows("An xlsx file holds at most 4 GiB of sheet; choose csv or "
                              "csv.gz, or narrow the filters.")
        self.behind.submit(self._deflate, data)

    def _deflate(self, data) -> None:
        self.crc = isal_zlib.crc32(data, self.crc)
        self.size += len(data)
        packed = self.deflate.compress(data)
        self.packed += len(packed)
        self._write(packed)

    def end(self) -> None:
        self.wait()
        packed = self.deflate.flush()
        self.packed += len(packed)
        self._write(packed)
        if max(self.packed, self.offset) >= 1 << 32:
            raise TooManyRows("An xlsx file holds at most 4 GiB; choose csv or csv.gz, or "
                              "narrow the filters.")
        self._write(struct.pack("<4s3L", b"PK\x07\x08", self.crc, self.packed, self.size))
        self.entries.append((self.name, self.crc, self.packed, self.size, self.start))

    def add(self, name: str, text: str) -> None:
        self.begin(name)
        self.write(text.encode())
        self.end()

    def close(self) -> None:
        self.wait()
        directory = self.offset
        for name, crc, packed, size, start in self.entries:
            self._write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0x08, 8, 0,
                                    self.DOS_DATE, crc, packed, size, len(name), 0, 0, 0, 0, 0,
                                    start) + name)
        self._write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(self.entries),
                                len(self.entries), self.offset - directory, directory, 0))
        self.behind.close()


class SheetWriter:
    """One worksheet streamed into an xlsx: the header row (bold, frozen, with filter buttons
    over every row), then `write_page` per CSV page, then `close` with the rows' count known.

    `columns` are (header, kind, scale, width) in order; `kind` is a dataset column's kind."""

    def __init__(self, out: BinaryIO, name: str, columns: list[tuple[str, str, int | None, int]]):
        self.zip, self.name, self.rows = ZipStream(out), name, 0
        scales = sorted({scale for _, kind, scale, _ in columns
                         if kind == "decimal" and scale is not None})
        self.scale_formats = [f"0.{'0' * scale}".rstrip(".") for scale in scales]
        self.columns = [Column(kind, self._style(kind, scale, scales))
                        for _, kind, scale, _ in columns]
        self.letters = [pa.scalar(column_letter(i)) for i in range(len(columns))]
        self.last = column_letter(len(columns) - 1)
        self.names = [f"c{i}" for i in range(len(columns))]
        self.zip.begin("xl/worksheets/sheet1.xml")
        header = "".join(f'<c s="{BOLD}" t="inlineStr"><is>{escape_text(text)}</is></c>'
                         for text, _, _, _ in columns)
        # Width in characters as XlsxWriter's set_column stored it (7-pixel digits, 5 px pad).
        cols = "".join(f'<col min="{i}" max="{i}" width="{(int(w * 7 + 0.5) + 5) * 256 // 7 / 256}"'
                       ' customWidth="1"/>' for i, (_, _, _, w) in enumerate(columns, 1))
        self.zip.write(f"{XML}{WORKSHEET_NS}{FROZEN_HEADER}<cols>{cols}</cols>"
                       f"<sheetData><row>{header}</row>".encode())

    @staticmethod
    def _style(kind: str, scale: int | None, scales: list[int]) -> str:
        if kind == "date":
            return f' s="{DATE}"'
        if kind == "datetime":
            return f' s="{DATETIME}"'
        if kind == "decimal" and scale is not None:
            return f' s="{FIRST_SCALE + scales.index(scale)}"'
        return ""

    def write_page(self, data: bytes) -> int:
        """Write the rows of one CSV page (no header; NULL and empty text are empty fields);
        return how many texts were cut to fit a cell."""
        if not data:
            return 0
        table = pa_csv.read_csv(
            pa.py_buffer(data),
            read_options=pa_csv.ReadOptions(column_names=self.names, use_threads=False,
                                            block_size=max(1 << 20, len(data) + 1)),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True,
                                              ignore_empty_lines=False),  # one NULL column
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(self.names, pa.string()), null_values=[""],
                strings_can_be_null=True, quoted_strings_can_be_null=True))
        first, cut, gap, numbers = self.rows + 2, 0, None, []

        def reference(i: int, tail: pa.Scalar) -> pa.Array:  # '<c r="B7"' and `tail`
            if not numbers:
                numbers.append(pc.cast(pa.array(range(first, first + table.num_rows)),
                                       pa.string()))
            return _join(R_OPEN, self.letters[i], numbers[0], tail)

        cells = []
        for i, column in enumerate(self.columns):
            values = table.column(i).combine_chunks()
            made, column_cut = column.cells(values)
            cut += column_cut
            if gap is not None and _any(pc.and_(gap, pc.is_valid(values))):
                made = pc.if_else(gap, _join(reference(i, QUOTE),  # after an empty cell: where
                                             pc.utf8_slice_codeunits(made, 2)), made)
            cells.append(made)
            empty = pc.is_null(values)
            gap = empty if gap is None else pc.or_(gap, empty)
        if pc.any(empty).as_py():  # a row ends in its last column, blank if need be (above)
            cells[-1] = pc.coalesce(cells[-1], reference(len(cells) - 1, BLANK_END))
        rows = pc.binary_join_element_wise(ROW_OPEN, *cells, ROW_CLOSE, EMPTY,
                                           null_handling="replace", null_replacement="")
        _, offsets, text = rows.buffers()  # the rows' XML, one after another: no copy
        offsets = memoryview(offsets).cast("i")
        self.zip.write(memoryview(text)[offsets[rows.offset]:offsets[rows.offset + len(rows)]])
        self.rows += len(rows)
        return cut

    def stop(self) -> None:
        """Wait for the write in flight, whatever came of it (`close` still raises its error):
        after an export stops, nothing writes its file."""
        self.zip.behind.settle()

    def close(self) -> None:
        """The end of the sheet (the filter over the header and every row), then the rest of
        the package."""
        area = f"$A$1:${self.last}${self.rows + 1}"
        self.zip.write(f'</sheetData><autoFilter ref="{area.replace("$", "")}"/>'
                       f'{SHEET_END}'.encode())
        self.zip.end()
        name = escape_xml(self.name).replace('"', "&quot;")
        quoted = "'" + self.name.replace("'", "''") + "'"
        self.zip.add("xl/workbook.xml", (
            f'{XML}<workbook xmlns="{MAIN}" xmlns:r="{RELS}"><bookViews><workbookView/>'
            f'</bookViews><sheets><sheet name="{name}" sheetId="1" r:id="rId1"/></sheets>'
            f'<definedNames><definedName name="_xlnm._FilterDatabase" localSheetId="0" '
            f'hidden="1">{escape_xml(quoted)}!{area}'
            f'</definedName></definedNames></workbook>'))
        formats = "".join(f'<numFmt numFmtId="{166 + i}" formatCode="{code}"/>'
                          for i, code in enumerate(self.scale_formats))
        xfs = "".join(f'<xf numFmtId="{166 + i}" fontId="0" fillId="0" borderId="0" xfId="0" '
                      'applyNumberFormat="1"/>' for i in range(len(self.scale_formats)))
        self.zip.add("xl/styles.xml", (
            f'{XML}<styleSheet xmlns="{MAIN}"><numFmts count="{2 + len(self.scale_formats)}">'
            '<numFmt numFmtId="164" formatCode="yyyy-mm-dd"/>'
            f'<numFmt numFmtId="165" formatCode="yyyy-mm-dd hh:mm:ss"/>{formats}</numFmts>'
            '<fonts count="2"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font>'
            '<font><b/><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
            '<fills count="2"><fill><patternFill patternType="none"/></fill>'
            '<fill><patternFill patternType="gray125"/></fill></fills>'
            '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border>'
            '</borders><cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" '
            'borderId="0"/></cellStyleXfs>'
            f'<cellXfs count="{FIRST_SCALE + len(self.scale_formats)}">'
            '<xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
            '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/>'
            '<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" '
            'applyNumberFormat="1"/><xf numFmtId="165" fontId="0" fillId="0" borderId="0" '
            f'xfId="0" applyNumberFormat="1"/>{xfs}</cellXfs><cellStyles count="1">'
            '<cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles></styleSheet>'))
        self.zip.add("xl/_rels/workbook.xml.rels", WORKBOOK_RELS)
        self.zip.add("docProps/app.xml", APP)
        self.zip.add("docProps/core.xml", CORE)
        self.zip.add("_rels/.rels", ROOT_RELS)
        self.zip.add("[Content_Types].xml", CONTENT_TYPES)
        self.zip.close()
