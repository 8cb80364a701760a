r"""Which deflate could make csv.gz as fast as csv? Each maintained fast deflate, at each of its
fast levels, on an export's own csv cut into the engine's gzip members (a member a page of
EXPORT_BATCH_ROWS rows, jobs.formats), against `gzip -6` of the whole file run in the same turns.

    .venv/bin/python bench/deflaters.py EXPORT.csv [--csv-seconds 0.42] [--rows-per-page 10000]

Deflating is CPU the export's own pages would use: with every core busy writing csv for
`--csv-seconds` (the engine's csv time of the same rows, bench/export.py), a csv.gz takes about
that plus the deflate's one-thread time shared out over the cores, so its speed is at best
csv / (csv + deflate / cores) of csv's. The table prints that bound per deflate; issue 19 asks
for 0.8× at no more than 1.1× gzip -6's size. libdeflate is measured when the `deflate` package
is installed (it is not a dependency: its binding holds the GIL while it compresses).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import isal.isal_zlib
from export import Run, best_of, measure  # bench/export.py: runs in turns, a tool's run
from zlib_ng import zlib_ng


def deflaters() -> dict[str, Callable[[bytes], bytes]]:
    found = {f"zlib-ng {level}": lambda data, level=level: zlib_ng.compress(data, level, wbits=31)
             for level in (1, 2, 3, 4, 6)}
    found.update({f"isal {level}": lambda data, level=level: isal.isal_zlib.compress(
        data, level, wbits=31) for level in (1, 2, 3)})
    try:
        import deflate
    except ImportError:
        return found
    found.update({f"libdeflate {level}": lambda data, level=level: deflate.gzip_compress(
        data, level) for level in (1, 3, 4, 6)})
    return found


def members(csv: bytes, rows: int) -> list[bytes]:
    """The header, then pages of `rows` rows (a newline inside quotes is not a row's end)."""
    pages, page, in_quotes, count = [], [], False, 0
    for line in csv.split(b"\n")[:-1]:
        page.append(line)
        in_quotes ^= line.count(b'"') % 2 == 1
        if not in_quotes:
            count += 1
            if count == 1 or count % rows == 1:  # the header is a member of its own
                pages.append(b"\n".join(page) + b"\n")
                page = []
    if page:
        pages.append(b"\n".join(page) + b"\n")
    return pages


def deflated(compress: Callable[[bytes], bytes], pages: list[bytes]) -> Run:
    """Seconds and bytes of every page deflated in one thread (as bench/export.py's Run)."""
    start = time.perf_counter()
    size = sum(len(compress(page)) for page in pages)
    return time.perf_counter() - start, 0, 0, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="an export's csv file")
    parser.add_argument("--rows-per-page", type=int, default=10_000)
    parser.add_argument("--csv-seconds", type=float, help="the engine's csv time, same rows")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = args.csv.read_bytes()
    pages = members(data, args.rows_per_page)
    compressors = deflaters()
    with tempfile.TemporaryDirectory() as work:  # in turns: this machine's speed drifts
        gzip6 = partial(measure, ["gzip", "-6", "-c", str(args.csv)], dict(os.environ),
                        Path(work) / "whole.csv.gz")
        results = best_of(args.repeat, gzip6, *(partial(deflated, compress, pages)
                                                for compress in compressors.values()))
    reference = results[0][3]
    print(f"{len(data):,} bytes of csv in {len(pages):,} members; {args.cores} cores"
          + (f"; csv export {args.csv_seconds:.2f} s" if args.csv_seconds else ""))
    print(f"\n{'deflate (one thread)':26} {'seconds':>8} {'MB/s':>6} {'bytes':>12} "
          f"{'× gzip -6':>9} {'≤ 1.1×':>6} {'csv.gz / csv speed, at best':>28}")
    for name, (seconds, _, _, size) in zip(["gzip -6 (the whole file)", *compressors], results,
                                           strict=True):
        bound = ""
        if args.csv_seconds and name in compressors:
            bound = f"{args.csv_seconds / (args.csv_seconds + seconds / args.cores):.2f}×"
        print(f"{name:26} {seconds:>8.3f} {len(data) / seconds / 1e6:>6.0f} {size:>12,} "
              f"{size / reference:>8.3f}× {'yes' if size <= 1.1 * reference else 'no':>6} "
              f"{bound:>28}")

if __name__ == "__main__":
    main()
