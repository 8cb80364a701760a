"""Read the next pages while the caller writes the current one (the standard library only)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

Page = TypeVar("Page")


class KeyedPage(Protocol):
    rows: int
    last_key: object


Keyed = TypeVar("Keyed", bound=KeyedPage)


def read_ahead(fetch: Callable[[object], tuple[Page, object] | None],
               after: object) -> Iterator[Page]:
    """The pages of `fetch(after)` -> (page, next key) or None at the end, each one fetched in
    a thread while the caller handles the page before it. Closing the iterator waits for the
    fetch under way, so nothing reads the connection after it is handed back."""
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(fetch, after)
        while (fetched := pending.result()) is not None:
            page, after = fetched
            pending = pool.submit(fetch, after)
            yield page


def side_by_side(end_after: Callable[[object], object],
                 fetch: Callable[[object, object], Keyed | None], after: object, size: int,
                 in_flight: int) -> Iterator[Keyed]:
    """Pages as key ranges read `in_flight` at a time, each in a thread: `end_after(key)` is
    the `size`-th key after `key` (None when fewer are left: a page without an end, LIMIT
    `size`), looked up first, so that the next pages can be read while this one is written;
    `fetch(start, end)` the page after `start` up to `end` (None when it holds no row). The
    page without an end is the last, unless it comes back full (rows added meanwhile): then
    the pages go on after it. Pages come in key order whatever order they were read in.
    One page more than `in_flight` is asked for: pages end in any order, and a thread done
    early starts on it at once rather than wait for the caller to take the page before. The
    next end is looked up in a thread of its own as soon as the one before is known: a lookup
    costs about as long as writing a page, and the caller's thread only writes.
    Closing the iterator, or an error of `fetch`, waits for the pages under way."""
    with ThreadPoolExecutor(in_flight, thread_name_prefix="page") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="page-end") as looking:
        pending: deque = deque()  # (page being read, is it the last)
        start, more = after, True
        next_end: Future | None = None  # end_after(start), looked up while the caller writes

        def fill() -> None:
            nonlocal start, more, next_end
            while more and len(pending) < in_flight + 1:  # + 1: see the docstring
                end = (next_end or looking.submit(end_after, start)).result()
                next_end = looking.submit(end_after, end) if end is not None else None
                pending.append((pool.submit(fetch, start, end), end is None))
                start, more = end, end is not None

        try:
            fill()
            while pending:
                future, last = pending.popleft()
                page = future.result()
                if page is not None and last and page.rows == size:
                    start, more = page.last_key, True
                fill()  # `in_flight` pages read, one waiting, while the caller writes this one
                if page is not None:  # None: a range emptied meanwhile, or nothing left
                    yield page
        finally:  # the page waiting is not read: only those under way are waited for
            for future, _ in pending:
                future.cancel()
            if next_end is not None:
                next_end.cancel()
